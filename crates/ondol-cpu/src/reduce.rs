//! Deterministic parallel reductions. rayon's `reduce` associates floating-point sums in
//! an order that depends on work stealing, which would make two runs of the same seed
//! differ in the last bits. Here rows are cut into chunks of a fixed size, each chunk is
//! reduced into its own partial in parallel, and the partials are summed in chunk order:
//! the same bits on every run and for any thread count.

use rayon::prelude::*;

/// Rows per chunk: big enough to amortise the partial buffer, small enough to spread work.
pub const CHUNK_ROWS: usize = 64;

/// `acc[c] += sum over rows of f(row)[c]`, where `f(rows, partial)` adds the contribution of
/// a contiguous row range into a zeroed `partial` of `acc.len()`.
pub fn column_sums<F>(rows: usize, acc: &mut [f32], f: F)
where
    F: Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
{
    let width = acc.len();
    let chunks = rows.div_ceil(CHUNK_ROWS);
    let mut partials = vec![0.0f32; chunks * width];
    partials.par_chunks_mut(width.max(1)).enumerate().for_each(|(c, partial)| {
        let start = c * CHUNK_ROWS;
        f(start..(start + CHUNK_ROWS).min(rows), partial);
    });
    for partial in partials.chunks(width.max(1)) {
        for (a, p) in acc.iter_mut().zip(partial) {
            *a += p;
        }
    }
}

/// A sum over a slice in f64, chunked in a fixed order.
pub fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64 + Sync) -> f64 {
    const CHUNK: usize = 1 << 14;
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| {
            // Four f32x8-friendly lanes of f64 keep the compiler vectorising.
            let mut lanes = [0.0f64; 4];
            let mut it = c.chunks_exact(4);
            for q in &mut it {
                for (l, v) in lanes.iter_mut().zip(q) {
                    *l += f(*v);
                }
            }
            let tail: f64 = it.remainder().iter().map(|v| f(*v)).sum();
            lanes.iter().sum::<f64>() + tail
        })
        .collect();
    partials.iter().sum()
}
