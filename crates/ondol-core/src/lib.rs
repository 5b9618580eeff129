//! ondol-core: the vocabulary every other crate speaks: errors, the seeded RNG,
//! the [`Backend`] contract (every op the models need, forward and backward), and
//! FLOP counting conventions.

pub mod backend;
pub mod bf16;
pub mod error;
pub mod gradcheck;
pub mod rng;
pub mod say;
pub mod testdata;

pub use backend::{
    Activation, AdamWParams, AttnShape, Backend, DeviceSlice, IGNORED_TARGET, ScanGrads, ScanInputs, ScanShape,
    SsdGrads, SsdInputs, SsdShape,
};
pub use error::{Error, Result};
pub use rng::Rng;
