//! ondol-parallel: one rank of a (dp, pp, tp) layout. [`Engine`] holds the rank's model
//! chunks (a tensor-parallel shard of one or more pipeline stages), runs a pipeline
//! [`schedule`] over its micro-batches with activations and gradients passed between stages,
//! sums tensor-parallel partial results through the model's [`ondol_model::TensorParallel`]
//! hook, averages gradients over data-parallel replicas (or reduce-scatters them, ZeRO-1), and
//! applies AdamW with the true global gradient norm. Checkpoints see whole tensors by global
//! name whatever the layout ([`Engine::whole_state`], [`Engine::load_whole`]).
//!
//! # Communication per optimizer step
//! For `P` parameters, micro-batches of `r = batch x seq` rows of width `d`, `m` micro-batches,
//! `L` layers, `V` vocabulary, `v` chunks per pipeline rank, in elements ("floats"): of the
//! compute type for activations and their gradients (4 bytes in f32, 2 in bf16), f32 for the
//! parameters' gradients and the loss's statistics:
//! - tp: two all-reduces of `r d` per transformer layer forward and two backward (one per
//!   block each way), one each way for the embedding and head, and `3 r` floats gathered for
//!   the vocab-parallel loss: `m (4 L + 2) r d` floats per rank at `2 (tp - 1) / tp` bus
//!   factor each (ring all-reduce).
//! - tp with sequence parallelism: an all-gather (`(tp - 1) / tp` of `r d` per rank) before
//!   each mixer and the head, a reduce-scatter (the same) after each mixer and the embedding;
//!   backward gathers the norm output again and the output gradient, and reduce-scatters the
//!   input gradient: `m (10 L + 5) r d (tp - 1) / tp` floats, a quarter more than without,
//!   for `1 / tp` of the residual stream and norm activations per rank.
//! - pp: each stage boundary carries `r d` forward and `r d` backward per micro-batch (`r d /
//!   tp` under sequence parallelism), `v` times
//!   around the ring when interleaved: `2 m v r d` floats sent per rank (`2 m (v - 1) r d` on
//!   the first and last when not wrapping).
//! - dp: the rank's parameter shard `P / (tp pp)` all-reduced (or reduce-scattered and
//!   all-gathered under ZeRO-1: the same bytes), `2 (dp - 1) / dp` of it per rank.

mod engine;
pub mod schedule;

pub use engine::{Engine, Evaluation, HEAD_ROW_ALIGN, Layout, StepOutcome};
pub use schedule::ScheduleKind;
