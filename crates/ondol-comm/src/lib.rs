//! ondol-comm: how ranks talk. The [`Communicator`] contract the parallel layers are written
//! against; [`ThreadComm`], ranks as threads of one process (deterministic, testable on one CPU);
//! [`TcpComm`], ranks as processes connected over TCP (the same bits as ThreadComm);
//! `NcclComm` (feature `nccl`), ranks as processes with a GPU each;
//! the [`Mesh`] of tp x pp x dp groups and [`RankComms`], the one owner of a rank's
//! communicators; the rendezvous [`store`]; [`DistEnv`], a process's place in a job read from
//! torchrun or Slurm variables; and the [`launch`]er behind `ondol launch`.
//!
//! # Communication volume
//! What each collective moves per rank with the bandwidth-optimal ring algorithms NCCL uses, for a
//! buffer of `B` bytes (the full, unsharded size) over `p` ranks. These figures are what a
//! bandwidth estimate should be built from ("bus bandwidth" in nccl-tests):
//!
//! | operation        | bytes sent (= received) per rank | note                                   |
//! |------------------|----------------------------------|----------------------------------------|
//! | all-reduce       | `2 (p - 1) / p * B`              | a reduce-scatter followed by an all-gather |
//! | reduce-scatter   | `(p - 1) / p * B`                | `B` is the input; each rank keeps `B / p` |
//! | all-gather       | `(p - 1) / p * B`                | `B` is the output; each rank brings `B / p` |
//! | broadcast        | `B` (pipelined ring)             |                                        |
//! | send / recv      | `B`                              | point to point                          |
//!
//! So data parallelism with ZeRO-1 (reduce-scatter gradients, all-gather parameters) moves the
//! same bytes as a plain all-reduce, and each tensor-parallel all-reduce of activations costs
//! `2 (tp - 1) / tp` times their size.
//!
//! [`ThreadComm`] does not run a ring: it shares memory, and its cost is copying and summing
//! (see its module docs).

pub mod comm;
pub mod env;
pub mod error;
pub mod launch;
pub mod mesh;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod selftest;
pub mod store;
pub mod tcp;
pub mod thread;

pub use comm::Communicator;
pub use env::DistEnv;
pub use error::{CommError, TimeoutInfo};
pub use mesh::{Coords, Direction, Mesh, RankComms, RingEdge, ring_edges};
#[cfg(feature = "nccl")]
pub use nccl::NcclComm;
pub use store::{StoreClient, StoreServer};
pub use tcp::{TcpComm, TcpNet};
pub use thread::ThreadComm;
