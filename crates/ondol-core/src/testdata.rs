//! Synthetic token data with signal, for tests that train: on uniform noise, AdamW turns
//! round-off into chaotic updates, and no two summation orders (parallel layouts, devices)
//! stay within tight tolerances for 20 steps.

use crate::Rng;

/// `micro` micro-batches of `batch` sequences of `seq` (input, target) token pairs from a
/// Markov source over `vocab` tokens (next = 3 x current + 1 mod vocab, or a random token
/// one time in five), drawn from `seed`. Inputs and targets are `[batch, seq]`, row-major;
/// each target row is its input row shifted by one.
pub fn markov_batches(seed: u64, micro: usize, batch: usize, seq: usize, vocab: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut rng = Rng::new(seed);
    let vocab = vocab as u64;
    (0..micro)
        .map(|_| {
            let mut t = rng.below(vocab);
            let tokens: Vec<u32> = (0..batch * (seq + 1))
                .map(|_| {
                    t = if rng.below(5) == 0 { rng.below(vocab) } else { (3 * t + 1) % vocab };
                    t as u32
                })
                .collect();
            let rows: Vec<&[u32]> = tokens.chunks(seq + 1).collect();
            let inputs = rows.iter().flat_map(|r| r[..seq].iter().copied()).collect();
            let targets = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
            (inputs, targets)
        })
        .collect()
}
