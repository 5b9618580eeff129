//! The `ondol` binary's library: the run config, the trainer loop and its metrics, the run
//! directory's lock, stopping on a signal, and the data-preparation commands (`prepare_cli`). The
//! binary itself (main.rs) only parses arguments, wires these together and reports.

pub mod config;
pub mod launch;
pub mod metrics;
pub mod prepare_cli;
pub mod pretrained;
pub mod run_lock;
pub mod stop_signal;
pub mod trainer;
