//! Fused softmax cross-entropy over a `[rows, vocab]` logit matrix (rows `stride` apart: the
//! columns past `vocab` are a padded head's, skipped, with a zero gradient).
//!
//! One pass finds the row max, one computes exp and its sum (the exponentials are kept in
//! the logit buffer), and one turns them into the gradient in place, so the matrix is
//! never copied: 3 reads and 2 writes of rows * vocab floats, one exp per element.
//!
//! The vocab-parallel version splits that in two around a collective: each shard's row
//! statistics (max, sum of exp, target logit), then, given the combined log-sum-exp, the
//! gradient: 2 reads and 1 write, two exps per element.
//!
//! A row whose target is `IGNORED_TARGET` is not read: loss 0, statistics (0, 0, 0), gradient 0.

use crate::math::exp;
use ondol_core::IGNORED_TARGET;
use ondol_core::backend::LogitColumns;
use rayon::prelude::*;

pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[u32],
    losses: &mut [f32],
    columns: LogitColumns,
    grad_scale: Option<f32>,
) {
    let LogitColumns { vocab, stride } = columns;
    assert!(vocab <= stride && logits.len() == targets.len() * stride);
    assert_eq!(losses.len(), targets.len());
    logits.par_chunks_mut(stride).zip(targets.par_iter().zip(losses.par_iter_mut())).for_each(|(row, (&t, loss))| {
        if t == IGNORED_TARGET {
            *loss = 0.0;
            if grad_scale.is_some() {
                row.fill(0.0);
            }
            return;
        }
        let t = t as usize;
        assert!(t < vocab, "target {t} outside the vocabulary of {vocab}");
        let (row, padding) = row.split_at_mut(vocab);
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let target_logit = row[t];
        // Eight partial sums let the compiler keep the exp loop in vector registers.
        let mut lanes = [0.0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v - max);
                *l += *v;
            }
        }
        let mut sum: f32 = chunks
            .into_remainder()
            .iter_mut()
            .map(|v| {
                *v = exp(*v - max);
                *v
            })
            .sum();
        sum += lanes.iter().sum::<f32>();
        *loss = max + sum.ln() - target_logit;
        if let Some(scale) = grad_scale {
            let k = scale / sum;
            row.iter_mut().for_each(|v| *v *= k);
            row[t] -= scale;
            padding.fill(0.0);
        }
    });
}

/// The shard's column of `t`, if it holds `t`.
fn column(t: u32, first_id: usize, vocab: usize) -> Option<usize> {
    (t as usize).checked_sub(first_id).filter(|&c| c < vocab)
}

pub fn cross_entropy_stats(logits: &[f32], targets: &[u32], stats: &mut [f32], first_id: usize, columns: LogitColumns) {
    let LogitColumns { vocab, stride } = columns;
    assert!(vocab <= stride && logits.len() == targets.len() * stride);
    assert_eq!(stats.len(), 3 * targets.len());
    logits.par_chunks(stride).zip(targets.par_iter().zip(stats.par_chunks_mut(3))).for_each(|(row, (&t, out))| {
        if t == IGNORED_TARGET {
            out.fill(0.0);
            return;
        }
        let row = &row[..vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut lanes = [0.0f32; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            lanes.iter_mut().zip(c).for_each(|(l, v)| *l += exp(v - max));
        }
        let sum = chunks.remainder().iter().map(|v| exp(v - max)).sum::<f32>() + lanes.iter().sum::<f32>();
        out[0] = max;
        out[1] = sum;
        out[2] = column(t, first_id, vocab).map_or(0.0, |c| row[c]);
    });
}

pub fn cross_entropy_grad(
    logits: &mut [f32],
    targets: &[u32],
    lse: &[f32],
    first_id: usize,
    columns: LogitColumns,
    scale: f32,
) {
    let LogitColumns { vocab, stride } = columns;
    assert!(vocab <= stride && logits.len() == targets.len() * stride);
    assert_eq!(lse.len(), targets.len());
    logits.par_chunks_mut(stride).zip(targets.par_iter().zip(lse.par_iter())).for_each(|(row, (&t, &lse))| {
        if t == IGNORED_TARGET {
            row.fill(0.0);
            return;
        }
        let (row, padding) = row.split_at_mut(vocab);
        row.iter_mut().for_each(|v| *v = scale * exp(*v - lse));
        if let Some(c) = column(t, first_id, vocab) {
            row[c] -= scale;
        }
        padding.fill(0.0);
    });
}
