//! ondol-model: models built from a config. Each model owns a [`ParamLayout`] (every
//! parameter in one flat buffer, named as Hugging Face names it) and computes forward and
//! backward through any [`ondol_core::Backend`]. It is correct at world size 1; a model can
//! also be built as one rank's [`Part`] (a pipeline stage's layers, a tensor-parallel shard of
//! each) and then calls [`TensorParallel`] where shards meet. It knows no communicator: that
//! is layered on top.

mod attention;
pub mod config;
mod elems;
mod layers;
mod mamba;
mod mamba2;
mod mlp;
pub mod model;
pub mod params;
pub mod part;

pub use config::{
    Arch, BlockNorms, LayerAttention, LayerKind, ModelConfig, MupConfig, RopeScaling, RopeScalingKind, SsmConfig,
};
pub use elems::Elems;
pub use model::{
    InferenceCache, LOSS_CHUNK_LOGITS, LOSS_CHUNK_MIN_ROWS, MicroBatch, Model, Scratch, Workspace, counted_keys,
    scratch_elems,
};
pub use params::{Init, ParamInfo, ParamLayout, Path, Placement};
pub use part::{Alone, Part, TensorParallel};
