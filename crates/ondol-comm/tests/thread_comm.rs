//! ThreadComm against the communicator suite (`suite/mod.rs`), and how groups are partitioned.

mod suite;

use ondol_comm::{Mesh, RankComms, ThreadComm};
use std::time::Duration;
use suite::{Spawner, TIMEOUT};

struct Threads;

impl Spawner for Threads {
    type C = ThreadComm;
    fn group(&self, n: usize, timeout: Duration) -> Vec<ThreadComm> {
        ThreadComm::group(n, timeout)
    }
    fn mesh(&self, mesh: Mesh, timeout: Duration) -> Vec<RankComms<ThreadComm>> {
        RankComms::threads(mesh, timeout).unwrap()
    }
}

communicator_suite!(Threads);

#[test]
fn partition_refuses_overlapping_or_incomplete_groups() {
    let err = |groups: &[Vec<usize>]| ThreadComm::partition(4, groups, TIMEOUT).unwrap_err().to_string();
    assert!(err(&[vec![0, 1], vec![1, 2, 3]]).contains("rank 1 is in more than one group"));
    assert!(err(&[vec![0, 1], vec![2]]).contains("rank 3 is in no group"));
    assert!(err(&[vec![0, 1], vec![2, 3, 4]]).contains("rank 4 is outside the world of 4 ranks"));
}
