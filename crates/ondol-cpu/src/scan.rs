//! Mamba's sequence mixers on the CPU: the causal depthwise convolution and the selective
//! scan (Mamba-1), forward and backward.
//!
//! Layouts: activations `[batch, len, channels]` (row per token, like every other op); the
//! scan's B and C are `[batch, len, state]`, A is `[channels, state]`, D is `[channels]`.
//!
//! Selective scan, per sequence and channel d, state h of `state` values:
//!   h_t = exp(delta_t A_d) * h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t + D_d u_t.
//! Forward keeps only the states at chunk boundaries (`states`, `[batch, len / chunk + 1,
//! channels, state]`); backward recomputes each chunk's states from its boundary and runs the
//! adjoint recurrence backwards through it, so memory is O(len / chunk) states, not O(len).
//! FLOPs: about 9 per (token, channel, state) forward and 2x that backward.

use ondol_core::ScanShape;
use rayon::prelude::*;

/// `y[b, t, d] = bias[d] + sum_k w[d, k] x[b, t - (K-1) + k, d]`, zero before the sequence.
pub fn conv1d_forward(x: &[f32], w: &[f32], bias: &[f32], y: &mut [f32], len: usize, channels: usize) {
    let k = w.len() / channels;
    y.par_chunks_mut(len * channels).zip(x.par_chunks(len * channels)).for_each(|(y, x)| {
        for t in 0..len {
            let row = &mut y[t * channels..(t + 1) * channels];
            row.copy_from_slice(bias);
            for j in 0..k {
                let Some(src) = (t + j).checked_sub(k - 1) else { continue };
                let xs = &x[src * channels..(src + 1) * channels];
                for (d, (o, xv)) in row.iter_mut().zip(xs).enumerate() {
                    *o += w[d * k + j] * xv;
                }
            }
        }
    });
}

/// Writes `dx`; accumulates `dw` and `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    dbias: &mut [f32],
    len: usize,
    channels: usize,
) {
    let k = w.len() / channels;
    let per_seq = len * channels;
    dx.par_chunks_mut(per_seq).zip(dy.par_chunks(per_seq)).for_each(|(dx, dy)| {
        dx.fill(0.0);
        for t in 0..len {
            for j in 0..k {
                let Some(src) = (t + j).checked_sub(k - 1) else { continue };
                for d in 0..channels {
                    dx[src * channels + d] += w[d * k + j] * dy[t * channels + d];
                }
            }
        }
    });
    // Parameter gradients sum over sequences in order (deterministic).
    for (x, dy) in x.chunks(per_seq).zip(dy.chunks(per_seq)) {
        for t in 0..len {
            for d in 0..channels {
                let g = dy[t * channels + d];
                dbias[d] += g;
                for j in 0..k {
                    if let Some(src) = (t + j).checked_sub(k - 1) {
                        dw[d * k + j] += g * x[src * channels + d];
                    }
                }
            }
        }
    }
}

/// One step of the recurrence in place, for every channel of token `row`:
/// `h = exp(delta A) * h + delta B u`. Forward and the backward recompute share it, so the two
/// produce the same bits.
#[allow(clippy::too_many_arguments)]
fn advance(h: &mut [f32], row: usize, u: &[f32], delta: &[f32], a: &[f32], b: &[f32], ch: usize, n: usize) {
    let bt = &b[row * n..(row + 1) * n];
    for (d, hd) in h.chunks_exact_mut(n).enumerate() {
        let (dt, ut) = (delta[row * ch + d], u[row * ch + d]);
        for ((h, a), b) in hd.iter_mut().zip(&a[d * n..(d + 1) * n]).zip(bt) {
            *h = (dt * a).exp() * *h + dt * b * ut;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn selective_scan_forward(
    u: &[f32],
    delta: &[f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    d_skip: &[f32],
    y: &mut [f32],
    states: &mut [f32],
    s: ScanShape,
) {
    let (l, ch, n) = (s.len, s.channels, s.state);
    assert_eq!(states.len(), s.batch * s.saved() * ch * n);
    y.par_chunks_mut(l * ch).zip(states.par_chunks_mut(s.saved() * ch * n)).enumerate().for_each(|(bi, (y, saved))| {
        let mut h = vec![0.0f32; ch * n];
        saved[..ch * n].fill(0.0);
        for t in 0..l {
            let row = bi * l + t;
            let ct = &c[row * n..(row + 1) * n];
            advance(&mut h, row, u, delta, a, b, ch, n);
            for d in 0..ch {
                let acc: f32 = ct.iter().zip(&h[d * n..(d + 1) * n]).map(|(c, h)| c * h).sum();
                y[t * ch + d] = acc + d_skip[d] * u[row * ch + d];
            }
            if (t + 1) % s.chunk == 0 || t + 1 == l {
                let slot = (t + 1).div_ceil(s.chunk);
                saved[slot * ch * n..(slot + 1) * ch * n].copy_from_slice(&h);
            }
        }
    });
}

/// Writes `du`, `ddelta`, `db`, `dc`; accumulates `da` and `dd`.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_backward(
    dy: &[f32],
    u: &[f32],
    delta: &[f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    d_skip: &[f32],
    states: &[f32],
    du: &mut [f32],
    ddelta: &mut [f32],
    da: &mut [f32],
    db: &mut [f32],
    dc: &mut [f32],
    dd: &mut [f32],
    s: ScanShape,
) {
    let (l, ch, n) = (s.len, s.channels, s.state);
    // Per sequence: (da, dd) partials, reduced in sequence order below.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = du
        .par_chunks_mut(l * ch)
        .zip(ddelta.par_chunks_mut(l * ch))
        .zip(db.par_chunks_mut(l * n).zip(dc.par_chunks_mut(l * n)))
        .enumerate()
        .map(|(bi, ((du, ddelta), (db, dc)))| {
            let (mut pa, mut pd) = (vec![0.0f32; ch * n], vec![0.0f32; ch]);
            let saved = &states[bi * s.saved() * ch * n..(bi + 1) * s.saved() * ch * n];
            let mut dh = vec![0.0f32; ch * n]; // dL/dh_t from later steps, carried backwards
            let mut chunk_h = vec![0.0f32; (s.chunk + 1) * ch * n];
            for chunk in (0..l.div_ceil(s.chunk)).rev() {
                let (t0, t1) = (chunk * s.chunk, ((chunk + 1) * s.chunk).min(l));
                // Recompute h_{t0-1}..h_{t1-1} from the boundary state.
                chunk_h[..ch * n].copy_from_slice(&saved[chunk * ch * n..(chunk + 1) * ch * n]);
                for t in t0..t1 {
                    let (prev, next) = chunk_h.split_at_mut((t - t0 + 1) * ch * n);
                    next[..ch * n].copy_from_slice(&prev[(t - t0) * ch * n..]);
                    advance(&mut next[..ch * n], bi * l + t, u, delta, a, b, ch, n);
                }
                for t in (t0..t1).rev() {
                    let row = bi * l + t;
                    let h_prev = &chunk_h[(t - t0) * ch * n..(t - t0 + 1) * ch * n];
                    let h_t = &chunk_h[(t - t0 + 1) * ch * n..(t - t0 + 2) * ch * n];
                    let (bt, ct) = (&b[row * n..(row + 1) * n], &c[row * n..(row + 1) * n]);
                    let (dbt, dct) = (&mut db[t * n..(t + 1) * n], &mut dc[t * n..(t + 1) * n]);
                    dbt.fill(0.0);
                    dct.fill(0.0);
                    for d in 0..ch {
                        let (dt, ut, g) = (delta[row * ch + d], u[row * ch + d], dy[row * ch + d]);
                        pd[d] += g * ut;
                        let (mut du_acc, mut ddt_acc) = (g * d_skip[d], 0.0f32);
                        for i in 0..n {
                            let k = d * n + i;
                            dct[i] += g * h_t[k];
                            let adj = dh[k] + g * ct[i]; // dL/dh_t
                            let decay = (dt * a[k]).exp();
                            pa[k] += adj * dt * decay * h_prev[k];
                            ddt_acc += adj * (a[k] * decay * h_prev[k] + bt[i] * ut);
                            dbt[i] += adj * dt * ut;
                            du_acc += adj * dt * bt[i];
                            dh[k] = adj * decay; // dL/dh_{t-1} through h_t
                        }
                        du[t * ch + d] = du_acc;
                        ddelta[t * ch + d] = ddt_acc;
                    }
                }
            }
            (pa, pd)
        })
        .collect();
    for (pa, pd) in partials {
        da.iter_mut().zip(&pa).for_each(|(x, p)| *x += p);
        dd.iter_mut().zip(&pd).for_each(|(x, p)| *x += p);
    }
}
