//! The `ondol` binary's library: the run config, the trainer loop and its metrics, the lock
//! of run and data directories, stopping on a signal, and the data-preparation commands (`prepare_cli`). The
//! binary itself (main.rs) only parses arguments, wires these together and reports.

pub mod config;
pub mod dir_lock;
pub mod launch;
pub mod metrics;
pub mod prepare_cli;
pub mod pretrained;
pub mod stop_signal;
pub mod trainer;
