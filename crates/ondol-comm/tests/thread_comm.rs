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

/// Queued collectives read their buffers when queued and write them at `wait_queued`, as late
/// as NCCL's side stream may: a write between the two is overwritten (all-reduce) or kept
/// (a reduce's non-roots, whose buffers NCCL leaves alone).
#[test]
fn queued_collectives_read_at_queue_time_and_write_at_the_wait() {
    use ondol_comm::Communicator;
    use ondol_core::DeviceSlice;
    let slice = |v: &mut [f32]| DeviceSlice { ptr: v.as_mut_ptr() as u64, len: v.len(), bf16: false, host: true };
    let got = suite::on_threads(ThreadComm::group(2, TIMEOUT), |c| {
        let rank = c.rank() as f32;
        let (mut all, mut one) = ([1.0 + rank; 3], [10.0 + rank; 2]);
        c.queue_all_reduce_device(slice(&mut all)).unwrap();
        c.queue_reduce_device(slice(&mut one), 0).unwrap();
        // Not yet summed; then written over before the wait.
        let before = (all, one);
        all = [100.0; 3];
        one = [7.0; 2];
        c.wait_queued().unwrap();
        (before, all, one)
    });
    for (rank, ((before_all, before_one), all, one)) in got.into_iter().enumerate() {
        let r = rank as f32;
        assert_eq!((before_all, before_one), ([1.0 + r; 3], [10.0 + r; 2]), "rank {rank}: summed before the wait");
        assert_eq!(all, [3.0; 3], "rank {rank}: the all-reduce of the values at queue time");
        assert_eq!(one, if rank == 0 { [21.0; 2] } else { [7.0; 2] }, "rank {rank}: the reduce into rank 0");
    }
}
