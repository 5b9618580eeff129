//! Which piece of a model one rank holds, and the one interface through which tensor-parallel
//! pieces meet.
//!
//! A [`Part`] is a contiguous range of layers (a pipeline stage), cut into `tp` tensor-parallel
//! shards the way Megatron cuts them: attention heads, MLP hidden units, Mamba-2 heads and
//! groups, and the vocabulary are divided among the shards; norms are replicated. The model
//! built for a part computes that part's share and calls [`TensorParallel`] at the points
//! where the shards' partial results must be summed; it never sees a communicator.

use crate::config::{Arch, LayerKind, ModelConfig};
use ondol_core::backend::Backend;
use ondol_core::{Error, Result};
use std::ops::Range;

/// One rank's piece of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// This rank's tensor-parallel shard and how many there are.
    pub tp_rank: usize,
    pub tp: usize,
    /// The layers it runs.
    pub layers: Range<usize>,
    /// Whether it holds the token embedding (the first pipeline stage) and the final norm,
    /// head and loss (the last).
    pub first: bool,
    pub last: bool,
    /// Megatron's sequence parallelism (only with `tp > 1`): between the mixers, each shard
    /// holds `1 / tp` of the micro-batch's tokens, so the residual stream and the norms'
    /// activations are split too. The shards all-gather the tokens before each mixer and the
    /// head, and reduce-scatter the mixers' outputs instead of all-reducing them.
    pub sequence_parallel: bool,
    /// The output head's rows of this shard's vocabulary are padded with zero rows to a
    /// multiple of this (1: none), so that the head's GEMMs and the logit rows are aligned:
    /// GPT-2's 50257 rows leave every logit row 2-byte aligned, which keeps cuBLASLt off its
    /// fast kernels (nanoGPT and llm.c pad to 50304 for this). The padded columns' logits are
    /// no token's: the loss skips them and gives them no gradient.
    pub vocab_align: usize,
}

impl Part {
    /// The whole model on one rank.
    pub fn whole(cfg: &ModelConfig) -> Self {
        Self::new(cfg, 0, 1, 0..cfg.n_layers)
    }

    /// Shard `tp_rank` of `tp` of the layers `layers`, the first and last of `n_layers`.
    pub fn new(cfg: &ModelConfig, tp_rank: usize, tp: usize, layers: Range<usize>) -> Self {
        let (first, last) = (layers.start == 0, layers.end == cfg.n_layers);
        Self { tp_rank, tp, layers, first, last, sequence_parallel: false, vocab_align: 1 }
    }

    /// The same part with the tokens split between the mixers too (a no-op without tp).
    pub fn with_sequence_parallel(self, on: bool) -> Self {
        Self { sequence_parallel: on && self.tp > 1, ..self }
    }

    /// The same part with its head's vocabulary rows padded to a multiple of `align`.
    pub fn with_vocab_align(self, align: usize) -> Self {
        Self { vocab_align: align.max(1), ..self }
    }

    /// The rows (tokens) of a micro-batch of `rows` that this shard's residual stream holds:
    /// all of them, or its `1 / tp` slice under sequence parallelism.
    pub fn stream_rows(&self, rows: usize) -> Range<usize> {
        if self.sequence_parallel { self.even(rows) } else { 0..rows }
    }

    /// This shard's share of `n` units that `tp` divides.
    pub fn even(&self, n: usize) -> Range<usize> {
        let per = n / self.tp;
        self.tp_rank * per..(self.tp_rank + 1) * per
    }

    /// The token ids this shard's embedding and head rows hold: the vocabulary split as evenly
    /// as it goes, the first `vocab % tp` shards holding one more.
    pub fn vocab(&self, vocab: usize) -> Range<usize> {
        let (per, extra) = (vocab / self.tp, vocab % self.tp);
        let start = self.tp_rank * per + self.tp_rank.min(extra);
        start..start + per + usize::from(self.tp_rank < extra)
    }

    /// The rows of this shard's output head: its vocabulary rows, padded to `vocab_align`.
    pub fn head_rows(&self, vocab: usize) -> usize {
        self.vocab(vocab).len().next_multiple_of(self.vocab_align)
    }

    /// Refuses layouts the model cannot be cut into, naming the `parallelism` key to change.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let tp = self.tp;
        if self.layers.is_empty() || self.layers.end > cfg.n_layers {
            return Err(Error::config(
                "parallelism.pp",
                format!("a stage must hold at least one of the model's {} layers", cfg.n_layers),
            ));
        }
        if tp == 1 {
            return Ok(());
        }
        let divides = |what: &str, n: usize| -> Result<()> {
            if n.is_multiple_of(tp) {
                return Ok(());
            }
            Err(Error::config("parallelism.tp", format!("{tp} does not divide {what} = {n}; choose a tp that does")))
        };
        if cfg.vocab_size < tp {
            return Err(Error::config(
                "parallelism.tp",
                format!("{tp} is more than model.vocab_size = {}: every shard needs a vocabulary row", cfg.vocab_size),
            ));
        }
        let kinds = cfg.layer_kinds();
        if kinds.contains(&LayerKind::Attention) {
            divides("model.n_heads", cfg.n_heads)?;
            let kv = cfg.kv_heads();
            if !kv.is_multiple_of(tp) && !tp.is_multiple_of(kv) {
                return Err(Error::config(
                    "parallelism.tp",
                    format!(
                        "{tp} and model.n_kv_heads = {kv}: one must divide the other (kv heads are split or shared)"
                    ),
                ));
            }
        }
        if kinds.contains(&LayerKind::Mlp) {
            divides("the MLP width (model.ffn_hidden)", cfg.ffn())?;
        }
        if kinds.contains(&LayerKind::Mamba) {
            if cfg.arch == Arch::Mamba {
                divides("the Mamba channels (model.ssm.expand x model.d_model)", cfg.ssm_inner())?;
            } else {
                divides("the Mamba-2 heads (expand x d_model / ssm.head_dim)", cfg.ssm_heads())?;
                divides("model.ssm.n_groups", cfg.ssm.n_groups)?;
            }
        }
        Ok(())
    }
}

/// Where tensor-parallel shards of a model meet: the model calls it only when `tp > 1`.
pub trait TensorParallel<B: Backend> {
    /// `buf` becomes the sum of every shard's `buf`: row-parallel outputs in forward (Megatron's
    /// g), gradients of column-parallel inputs in backward (f).
    fn all_reduce(&mut self, be: &B, buf: &mut B::Buf) -> Result<()>;
    /// Every shard's `part` (equal lengths), concatenated in rank order.
    fn all_gather(&mut self, part: &[f32]) -> Result<Vec<f32>>;
    /// Sequence parallel: `whole` becomes every shard's `part` (its slice of the tokens),
    /// concatenated in rank order; before a mixer in forward, and for gradients in backward.
    fn all_gather_rows(&mut self, be: &B, part: &B::Buf, whole: &mut B::Buf) -> Result<()>;
    /// Sequence parallel: `part` becomes this shard's slice of the sum of every shard's `whole`;
    /// mixer outputs in forward (in place of the all-reduce), gradients of gathered inputs in
    /// backward.
    fn reduce_scatter_rows(&mut self, be: &B, whole: &B::Buf, part: &mut B::Buf) -> Result<()>;
    /// Backward has finished the gradients of the parameters `range` (a block's, the head's,
    /// the embeddings') for this micro-batch: a data-parallel layer may start reducing them
    /// while backward goes on. Ranges come in descending order and together cover the part.
    fn grads_ready(&mut self, _be: &B, _grads: &B::Buf, _range: Range<usize>) -> Result<()> {
        Ok(())
    }
}

/// The only shard: nothing to meet.
pub struct Alone;

impl<B: Backend> TensorParallel<B> for Alone {
    fn all_reduce(&mut self, _: &B, _: &mut B::Buf) -> Result<()> {
        Ok(())
    }
    fn all_gather(&mut self, part: &[f32]) -> Result<Vec<f32>> {
        Ok(part.to_vec())
    }
    fn all_gather_rows(&mut self, be: &B, part: &B::Buf, whole: &mut B::Buf) -> Result<()> {
        be.fill(be.all_mut(whole), 0.0);
        be.add_assign(be.all_mut(whole), be.all(part));
        Ok(())
    }
    fn reduce_scatter_rows(&mut self, be: &B, whole: &B::Buf, part: &mut B::Buf) -> Result<()> {
        self.all_gather_rows(be, whole, part)
    }
}
