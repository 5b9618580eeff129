//! ondol-ckpt: checkpoints that are Hugging Face model directories, written atomically and
//! verified on load; Hugging Face config and safetensors import.

pub mod checkpoint;
pub mod hf;
pub mod tensors;

pub use checkpoint::{Layout, Loaded, Moments, Snapshot, TrainerState, Writer};
