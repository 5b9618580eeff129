//! Token (and learned position) embeddings. Backward is a scatter-add: rows that share a
//! token add into the same table row, so it runs in parallel over column blocks (each task
//! walks every row in order for its columns): no races and the same bits on every run.

use crate::SharedMut;
use rayon::prelude::*;

/// The row of `id` in a table that holds `rows` ids from `first_id`, if it holds `id`.
fn row_of(id: u32, first_id: usize, rows: usize) -> Option<usize> {
    (id as usize).checked_sub(first_id).filter(|&r| r < rows)
}

pub fn embedding_forward(
    ids: &[u32],
    table: &[f32],
    first_id: usize,
    positions: Option<(&[f32], usize)>,
    out: &mut [f32],
    dim: usize,
) {
    assert_eq!(out.len(), ids.len() * dim);
    let rows = table.len() / dim;
    out.par_chunks_mut(dim).zip(ids.par_iter()).enumerate().for_each(|(r, (o, &id))| {
        match row_of(id, first_id, rows) {
            Some(row) => o.copy_from_slice(&table[row * dim..][..dim]),
            None => o.fill(0.0),
        }
        if let Some((pos, seq)) = positions {
            for (o, p) in o.iter_mut().zip(&pos[(r % seq) * dim..][..dim]) {
                *o += p;
            }
        }
    });
}

/// Columns per task in the scatter-adds.
const COLS: usize = 64;

/// `dtable[row_of(r)] += dout[r]` for every row `r` that has a table row.
fn scatter_add(dout: &[f32], dtable: &mut [f32], dim: usize, row_of: impl Fn(usize) -> Option<usize> + Sync) {
    let rows = dout.len() / dim;
    let dtable_cols = SharedMut::new(dtable);
    (0..dim.div_ceil(COLS)).into_par_iter().for_each(|blk| {
        let (c0, c1) = (blk * COLS, ((blk + 1) * COLS).min(dim));
        for r in 0..rows {
            let Some(dst) = row_of(r).map(|row| row * dim) else { continue };
            // SAFETY: task `blk` alone writes columns c0..c1 of every table row.
            let d = unsafe { std::slice::from_raw_parts_mut(dtable_cols.get().add(dst + c0), c1 - c0) };
            for (d, s) in d.iter_mut().zip(&dout[r * dim + c0..r * dim + c1]) {
                *d += s;
            }
        }
    });
}

pub fn embedding_backward(ids: &[u32], dout: &[f32], dtable: &mut [f32], first_id: usize, dim: usize) {
    assert_eq!(dout.len(), ids.len() * dim);
    let rows = dtable.len() / dim;
    scatter_add(dout, dtable, dim, |r| row_of(ids[r], first_id, rows));
}

pub fn position_embedding_backward(dout: &[f32], dpos: &mut [f32], seq: usize, dim: usize) {
    assert!(dpos.len() >= seq * dim);
    scatter_add(dout, dpos, dim, |r| Some(r % seq));
}
