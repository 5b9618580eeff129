//! Rotary embedding and causal grouped-query attention on the CPU.
//!
//! Layout: q, k and v are read in place from the fused projection `[rows, (H + 2 Hkv) D]`
//! (row `b * T + t`), out is `[rows, H D]`, lse is `[B, H, T]`. The GEMMs address heads
//! through strides, so nothing is transposed or copied.
//!
//! Forward, per (batch, head) and per block of `BLOCK` queries: S = scale Q K^T over the keys
//! from the block's first query's first key (0, or its document's start) up to the block's end
//! (neither the causal triangle above the block nor earlier documents are computed), masked
//! softmax, O = P V. Only the log-sum-exp of each row is saved; backward recomputes P from it,
//! as flash attention does, so memory stays O(T) per head instead of O(T^2).
//!
//! Backward runs per (batch, kv head) so the query heads that share a kv head accumulate
//! into its dK and dV without races:
//!   dV += P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dO * O));  dQ = scale dS K;
//!   dK += scale dS^T Q.
//! FLOPs: forward 4 T^2 D per head (half skipped by causality, up to one block), backward 2.5x.

use crate::SharedMut;
use crate::dense::raw_gemm;
use crate::math::{exp, max, sum};
use crate::simd::dispatched;
use gemm::Parallelism;
use ondol_core::backend::{AttnShape, Gemm, valid_first_keys};
use rayon::prelude::*;

/// Queries per block: the unit of causal skipping and of scratch memory (BLOCK x T floats).
const BLOCK: usize = 64;

pub fn rope(qkv: &mut [f32], cos_sin: &[f32], s: AttnShape, inverse: bool, q_scale: f32) {
    let (d, half) = (s.head_dim, s.head_dim / 2);
    let width = s.qkv_width();
    assert_eq!(qkv.len(), s.rows() * width);
    assert!(cos_sin.len() >= s.seq * half * 2, "rope table shorter than the sequence");
    let sign = if inverse { -1.0 } else { 1.0 };
    qkv.par_chunks_mut(width).enumerate().for_each(|(row, x)| {
        let table = &cos_sin[(row % s.seq) * half * 2..][..half * 2];
        // q heads and k heads are contiguous: rotate the first (H + Hkv) heads, not v.
        for (h, head) in x[..(s.n_heads + s.n_kv_heads) * d].chunks_exact_mut(d).enumerate() {
            let scale = if h < s.n_heads { q_scale } else { 1.0 };
            let (x1, x2) = head.split_at_mut(half);
            for ((a, b), cs) in x1.iter_mut().zip(x2.iter_mut()).zip(table.chunks_exact(2)) {
                let (c, sn) = (scale * cs[0], scale * sign * cs[1]);
                let (u, v) = (*a, *b);
                *a = u * c - v * sn;
                *b = v * c + u * sn;
            }
        }
    });
}

/// Column offsets of a query head and of its kv head's k and v within a qkv row.
fn head_columns(s: AttnShape, h: usize) -> (usize, usize, usize) {
    let g = h / (s.n_heads / s.n_kv_heads);
    let d = s.head_dim;
    (h * d, (s.n_heads + g) * d, (s.n_heads + s.n_kv_heads + g) * d)
}

/// S[nq, nk] = scale * Q[q0..q0+nq] K[0..nk]^T for one head, in `scores` (row stride nk).
///
/// # Safety
/// `q` and `k` must address `q0 + nq` and `nk` rows of `head_dim` at row stride `width`.
unsafe fn scores(q: *const f32, k: *const f32, width: usize, s: AttnShape, nq: usize, nk: usize, out: &mut [f32]) {
    let mut g = Gemm::new(nq, nk, s.head_dim, false, true);
    g.alpha = 1.0 / (s.head_dim as f32).sqrt();
    let w = width as isize;
    // SAFETY: forwarded from the caller; `out` holds nq * nk elements.
    // op(B) = K^T: element (p, j) is K[j, p], so row stride 1 and column stride w.
    unsafe { raw_gemm(g, out.as_mut_ptr(), nk as isize, q, (w, 1), k, (1, w), Parallelism::None) }
}

/// The keys a block of `nq` queries from `q0` attends: from the block's first query's first
/// key (`first_keys` is non-decreasing) to its last query; and each row's live columns of that
/// range (`live[i] = (first key, key after the query)`, relative to the range's start).
fn block_keys(first_keys: Option<&[u32]>, q0: usize, nq: usize, live: &mut Vec<(usize, usize)>) -> (usize, usize) {
    let first = |t: usize| first_keys.map_or(0, |f| f[t] as usize);
    let k0 = first(q0);
    live.clear();
    live.extend((q0..q0 + nq).map(|t| (first(t) - k0, t + 1 - k0)));
    (k0, q0 + nq)
}

/// `first_keys` of batch entry `b` (see `Backend::attention_forward`).
fn entry_first_keys(first_keys: Option<&[u32]>, s: AttnShape, b: usize) -> Option<&[u32]> {
    first_keys.map(|f| &f[b * s.seq..][..s.seq])
}

pub fn attention_forward(qkv: &[f32], out: &mut [f32], lse: &mut [f32], s: AttnShape, first_keys: Option<&[u32]>) {
    let (t, d, width, owidth) = (s.seq, s.head_dim, s.qkv_width(), s.q_width());
    assert!(s.n_heads.is_multiple_of(s.n_kv_heads));
    assert_eq!(qkv.len(), s.rows() * width);
    assert_eq!(out.len(), s.rows() * owidth);
    assert_eq!(lse.len(), s.batch * s.n_heads * t);
    assert!(first_keys.is_none_or(|f| valid_first_keys(f, s)), "attention: first keys out of order");
    let out_ptr = SharedMut::new(out);
    lse.par_chunks_mut(t).enumerate().for_each(|(task, lse)| {
        let (b, h) = (task / s.n_heads, task % s.n_heads);
        let (qc, kc, vc) = head_columns(s, h);
        let base = &qkv[b * t * width..];
        let first_keys = entry_first_keys(first_keys, s, b);
        let (mut p, mut live) = (vec![0.0f32; BLOCK.min(t) * t], Vec::with_capacity(BLOCK));
        for q0 in (0..t).step_by(BLOCK) {
            let nq = BLOCK.min(t - q0);
            let (k0, k1) = block_keys(first_keys, q0, nq, &mut live);
            let nk = k1 - k0;
            let p = &mut p[..nq * nk];
            // SAFETY: q rows q0..q0+nq and k rows k0..k1 lie inside this batch's qkv rows.
            unsafe {
                let k = base[k0 * width + kc..].as_ptr();
                scores(base[q0 * width + qc..].as_ptr(), k, width, s, nq, nk, p);
            }
            masked_softmax(p, nk, &live, &mut lse[q0..q0 + nq]);
            let g = Gemm::new(nq, d, nk, false, false);
            let o_rs = owidth as isize;
            // SAFETY: task (b, h) alone writes out rows b*t + q0.. at columns h*d..h*d+d.
            unsafe {
                let o = out_ptr.get().add((b * t + q0) * owidth + h * d);
                let v = base[k0 * width + vc..].as_ptr();
                raw_gemm(g, o, o_rs, p.as_ptr(), (nk as isize, 1), v, (width as isize, 1), Parallelism::None);
            }
        }
    });
}

dispatched! {
    /// The softmax of a block of score rows (`[nq, nk]`) in place over each row's live
    /// columns (`live`, see [`block_keys`]), the others zeroed; each row's log-sum-exp goes
    /// to `lse`.
    fn masked_softmax(p: &mut [f32], nk: usize, live: &[(usize, usize)], lse: &mut [f32]) -> () {
        for ((row, &(lo, hi)), lse) in p.chunks_exact_mut(nk).zip(live).zip(lse) {
            let (before, rest) = row.split_at_mut(lo);
            let (live, after) = rest.split_at_mut(hi - lo);
            let max = max(live);
            live.iter_mut().for_each(|v| *v = exp(*v - max));
            let total = sum(live);
            let inv = 1.0 / total;
            live.iter_mut().for_each(|v| *v *= inv);
            before.fill(0.0);
            after.fill(0.0);
            *lse = max + total.ln();
        }
    }
}

dispatched! {
    /// [`masked_softmax`] again from the saved log-sum-exp (backward's recompute).
    fn masked_probabilities(p: &mut [f32], nk: usize, live: &[(usize, usize)], lse: &[f32]) -> () {
        for ((row, &(lo, hi)), &l) in p.chunks_exact_mut(nk).zip(live).zip(lse) {
            let (before, rest) = row.split_at_mut(lo);
            let (live, after) = rest.split_at_mut(hi - lo);
            live.iter_mut().for_each(|v| *v = exp(*v - l));
            before.fill(0.0);
            after.fill(0.0);
        }
    }
}

pub fn attention_backward(
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    dqkv: &mut [f32],
    s: AttnShape,
    first_keys: Option<&[u32]>,
) {
    let (t, d, width, owidth) = (s.seq, s.head_dim, s.qkv_width(), s.q_width());
    let group = s.n_heads / s.n_kv_heads;
    assert_eq!(dqkv.len(), qkv.len());
    assert_eq!(dout.len(), out.len());
    assert!(first_keys.is_none_or(|f| valid_first_keys(f, s)), "attention: first keys out of order");
    let scale = 1.0 / (d as f32).sqrt();
    let dqkv_ptr = SharedMut::new(dqkv);
    (0..s.batch * s.n_kv_heads).into_par_iter().for_each(|task| {
        let (b, g) = (task / s.n_kv_heads, task % s.n_kv_heads);
        let base = &qkv[b * t * width..];
        let dbase = dqkv_ptr.get().wrapping_add(b * t * width);
        let (_, kc, vc) = head_columns(s, g * group);
        let first_keys = entry_first_keys(first_keys, s, b);
        // SAFETY (all writes below): task (b, g) alone owns rows b*t.. of dqkv at the
        // columns of kv head g and of its query heads g*group..(g+1)*group.
        unsafe {
            for r in 0..t {
                std::ptr::write_bytes(dbase.add(r * width + kc), 0, d);
                std::ptr::write_bytes(dbase.add(r * width + vc), 0, d);
            }
        }
        let mut p = vec![0.0f32; BLOCK.min(t) * t];
        let mut dp = vec![0.0f32; BLOCK.min(t) * t];
        let mut live = Vec::with_capacity(BLOCK);
        let w = width as isize;
        for h in g * group..(g + 1) * group {
            let (qc, _, _) = head_columns(s, h);
            let lse = &lse[(b * s.n_heads + h) * t..][..t];
            let o_off = b * t * owidth + h * d;
            for q0 in (0..t).step_by(BLOCK) {
                let nq = BLOCK.min(t - q0);
                let (k0, k1) = block_keys(first_keys, q0, nq, &mut live);
                let nk = k1 - k0;
                let (p, dp) = (&mut p[..nq * nk], &mut dp[..nq * nk]);
                // Keys k0..k1 of this head: their k, v, dk and dv columns.
                let (kb, vb) = (k0 * width + kc, k0 * width + vc);
                // SAFETY: all operands address rows of this batch entry; see above for writes.
                unsafe {
                    scores(base[q0 * width + qc..].as_ptr(), base[kb..].as_ptr(), width, s, nq, nk, p);
                    masked_probabilities(p, nk, &live, &lse[q0..q0 + nq]);
                    let dout_blk = dout[o_off + q0 * owidth..].as_ptr();
                    let ow = owidth as isize;
                    // dV[k0..k1] += P^T dO
                    let gv = Gemm::new(nk, d, nq, true, false).accumulate();
                    raw_gemm(gv, dbase.add(vb), w, p.as_ptr(), (1, nk as isize), dout_blk, (ow, 1), Parallelism::None);
                    // dP = dO V^T
                    let gp = Gemm::new(nq, nk, d, false, true);
                    let v = base[vb..].as_ptr();
                    raw_gemm(gp, dp.as_mut_ptr(), nk as isize, dout_blk, (ow, 1), v, (1, w), Parallelism::None);
                    // dS = scale * P * (dP - rowsum(dO * O)), written over dP.
                    for i in 0..nq {
                        let row = o_off + (q0 + i) * owidth;
                        let delta: f32 = dout[row..row + d].iter().zip(&out[row..row + d]).map(|(a, b)| a * b).sum();
                        let (pr, dpr) = (&p[i * nk..][..nk], &mut dp[i * nk..][..nk]);
                        for (ds, pv) in dpr.iter_mut().zip(pr) {
                            *ds = scale * pv * (*ds - delta);
                        }
                    }
                    // dQ[q0..] = dS K
                    let gq = Gemm::new(nq, d, nk, false, false);
                    let k = base[kb..].as_ptr();
                    raw_gemm(
                        gq,
                        dbase.add(q0 * width + qc),
                        w,
                        dp.as_ptr(),
                        (nk as isize, 1),
                        k,
                        (w, 1),
                        Parallelism::None,
                    );
                    // dK[k0..k1] += dS^T Q
                    let gk = Gemm::new(nk, d, nq, true, false).accumulate();
                    let q = base[q0 * width + qc..].as_ptr();
                    raw_gemm(gk, dbase.add(kb), w, dp.as_ptr(), (1, nk as isize), q, (w, 1), Parallelism::None);
                }
            }
        }
    });
}

/// Attention of new queries over a growing key/value cache (inference), over the last
/// `window` keys where given. Decoding reads the whole cache once per token and does
/// O(pos * D) work per head, so a plain loop parallel over (batch, head) is as fast as
/// anything here.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    qkv: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    out: &mut [f32],
    s: AttnShape,
    pos: usize,
    max_seq: usize,
    window: Option<usize>,
) {
    let (n, d, width, kvw) = (s.seq, s.head_dim, s.qkv_width(), s.n_kv_heads * s.head_dim);
    assert!(pos + n <= max_seq, "KV cache of {max_seq} positions cannot hold {} tokens", pos + n);
    assert_eq!(k_cache.len(), s.batch * max_seq * kvw);
    assert_eq!(out.len(), s.rows() * s.q_width());
    let k0 = s.n_heads * d;
    for b in 0..s.batch {
        for i in 0..n {
            let row = &qkv[(b * n + i) * width..][..width];
            let at = (b * max_seq + pos + i) * kvw;
            k_cache[at..at + kvw].copy_from_slice(&row[k0..k0 + kvw]);
            v_cache[at..at + kvw].copy_from_slice(&row[k0 + kvw..k0 + 2 * kvw]);
        }
    }
    let (k_cache, v_cache) = (&*k_cache, &*v_cache);
    let scale = 1.0 / (d as f32).sqrt();
    let group = s.n_heads / s.n_kv_heads;
    let out_ptr = SharedMut::new(out);
    (0..s.batch * s.n_heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / s.n_heads, task % s.n_heads);
        let g = h / group;
        let mut scores = vec![0.0f32; pos + n];
        for i in 0..n {
            let q = &qkv[(b * n + i) * width + h * d..][..d];
            let keys = pos + i + 1;
            let first = window.map_or(0, |w| keys.saturating_sub(w));
            for (j, sc) in scores[..keys].iter_mut().enumerate().skip(first) {
                let k = &k_cache[(b * max_seq + j) * kvw + g * d..][..d];
                *sc = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
            }
            let max = scores[first..keys].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0;
            for sc in &mut scores[first..keys] {
                *sc = exp(*sc - max);
                sum += *sc;
            }
            // SAFETY: task (b, h) alone writes row b*n + i at columns h*d..h*d+d.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add((b * n + i) * s.q_width() + h * d), d) };
            o.fill(0.0);
            for (j, p) in scores[..keys].iter().enumerate().skip(first) {
                let v = &v_cache[(b * max_seq + j) * kvw + g * d..][..d];
                for (o, v) in o.iter_mut().zip(v) {
                    *o += p / sum * v;
                }
            }
        }
    });
}
