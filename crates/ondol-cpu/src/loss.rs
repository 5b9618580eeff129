//! Fused softmax cross-entropy over a `[rows, vocab]` logit matrix.
//!
//! One pass finds the row max, one computes exp and its sum (the exponentials are kept in
//! the logit buffer), and one turns them into the gradient in place, so the matrix is
//! never copied: 3 reads and 2 writes of rows * vocab floats, one exp per element.

use crate::math::exp;
use rayon::prelude::*;

pub fn cross_entropy(logits: &mut [f32], targets: &[u32], losses: &mut [f32], vocab: usize, grad_scale: Option<f32>) {
    assert_eq!(logits.len(), targets.len() * vocab);
    assert_eq!(losses.len(), targets.len());
    logits.par_chunks_mut(vocab).zip(targets.par_iter().zip(losses.par_iter_mut())).for_each(|(row, (&t, loss))| {
        let t = t as usize;
        assert!(t < vocab, "target {t} outside the vocabulary of {vocab}");
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
        }
    });
}
