//! ondol-model: models built from a config. Each model owns a [`ParamLayout`] (every
//! parameter in one flat buffer, named as Hugging Face names it) and computes forward and
//! backward through any [`ondol_core::Backend`]. It is correct at world size 1 and knows
//! nothing of parallelism: that is layered on top.

pub mod config;
pub mod params;
pub mod transformer;

pub use config::{Arch, ModelConfig};
pub use params::{Init, ParamInfo, ParamLayout, Path};
pub use transformer::{KvCache, Transformer, Workspace};
