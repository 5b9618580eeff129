//! TcpComm against the communicator suite (`suite/mod.rs`): ranks are threads here, each with
//! its own [`TcpNet`] over loopback, connected through a real rendezvous store, exactly as
//! launched processes connect. Plus what only a network has: a peer whose process ends.

mod suite;

use ondol_comm::{CommError, Communicator, Mesh, RankComms, StoreClient, StoreServer, TcpComm, TcpNet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use suite::{Spawner, on_threads};

struct Tcp;

/// The nets of a job of `n` ranks, connected concurrently (as processes would be).
fn nets(n: usize, timeout: Duration) -> Vec<Arc<TcpNet>> {
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let addr = server.addr().to_string();
    let nets = on_threads((0..n).collect(), |rank| {
        let mut store = StoreClient::connect(&addr, rank, timeout).unwrap();
        TcpNet::connect(&mut store, n, timeout).unwrap()
    });
    drop(server);
    nets
}

impl Spawner for Tcp {
    type C = TcpComm;
    fn group(&self, n: usize, timeout: Duration) -> Vec<TcpComm> {
        nets(n, timeout).iter().map(TcpComm::world).collect()
    }
    fn mesh(&self, mesh: Mesh, timeout: Duration) -> Vec<RankComms<TcpComm>> {
        nets(mesh.world(), timeout).iter().map(|net| RankComms::tcp(mesh, net).unwrap()).collect()
    }
}

communicator_suite!(Tcp);

#[test]
fn a_rank_whose_process_ends_fails_the_waiting_ranks_at_once_naming_it() {
    let mut comms = Tcp.group(3, Duration::from_secs(30));
    drop(comms.pop());
    let start = Instant::now();
    // Each survivor keeps its connections until both have failed, so that neither sees the
    // other leave first.
    let errors = on_threads(comms, |c| (c.all_reduce_sum(&mut [1.0; 8]).unwrap_err(), c));
    assert!(start.elapsed() < Duration::from_secs(5), "waited {:?}, not failed at once", start.elapsed());
    for (e, _) in errors {
        assert!(matches!(e, CommError::Lost { peer: 2, .. }), "{e}");
        assert!(e.to_string().contains("all_reduce_sum on group [0, 1, 2]: rank 2"), "{e}");
    }
}

#[test]
fn a_mesh_that_does_not_cover_the_launched_processes_is_refused() {
    let net = nets(1, Duration::from_secs(5)).remove(0);
    let e = RankComms::tcp(Mesh::new(2, 1, 1).unwrap(), &net).err().unwrap().to_string();
    assert!(e.contains("the world has 1"), "{e}");
}
