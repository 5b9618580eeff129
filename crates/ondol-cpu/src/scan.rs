//! Mamba's sequence mixers on the CPU: the causal depthwise convolution (with its SiLU), the
//! selective scan (Mamba-1) and the SSD chunked scan (Mamba-2), forward and backward.
//!
//! Layouts: activations `[batch, len, channels]` (row per token, like every other op); the
//! selective scan's B and C are `[batch, len, state]`, a_log is `[channels, state]`; the SSD
//! reads x, B and C from one fused `[rows, heads * head_dim + 2 * groups * state]` row.
//!
//! Selective scan, per sequence and channel d, state h of `state` values:
//!   h_t = exp(delta_t A_d) * h_{t-1} + delta_t B_t u_t,    y_t = (C_t . h_t + D_d u_t) silu(z_t).
//! Forward keeps only the states at chunk boundaries (`states`, `[batch, len / chunk + 1,
//! channels, state]`); backward recomputes each chunk's states from its boundary and runs the
//! adjoint recurrence backwards through it, so memory is O(len / chunk) states, not O(len).
//! FLOPs: about 9 per (token, channel, state) forward and 2x that backward.
//!
//! SSD: the same recurrence with one scalar decay per head and a state `[head_dim, state]`,
//! computed a chunk of Q tokens at a time in its quadratic form,
//!   y_i = sum_{j<=i} exp(L_i - L_j) dt_j (C_i . B_j) x_j + exp(L_i) H0 C_i + D x_i,
//! with L the running sum of dt A inside the chunk and H0 the state entering it. FLOPs per
//! (token, head), forward: 2 Q (N + P) for the intra-chunk part (the causal half of it is
//! needed, but the CPU's small GEMMs compute the whole Q x Q products and mask them) and 4 P N
//! for the state.

use crate::dense::{Mat, MatMut, matmul};
use crate::math::{dot, exp, sigmoid, silu, silu_grad, softplus, sum};
use crate::simd::dispatched;
use ondol_core::{ScanGrads, ScanInputs, ScanShape, SsdGrads, SsdInputs, SsdShape};
use rayon::prelude::*;

/// The weights tap-major, `[K, channels]` (they are stored `[channels, K]`), so every loop
/// over a row of activations runs over contiguous channels.
fn taps(w: &[f32], channels: usize) -> Vec<f32> {
    let k = w.len() / channels;
    (0..k).flat_map(|j| (0..channels).map(move |d| w[d * k + j])).collect()
}

dispatched! {
    /// The convolution before its SiLU, for one sequence (`taps` from [`taps`]).
    fn conv1d_pre(x: &[f32], taps: &[f32], bias: &[f32], pre: &mut [f32], channels: usize) -> () {
        let k = taps.len() / channels;
        for (t, row) in pre.chunks_exact_mut(channels).enumerate() {
            row.copy_from_slice(bias);
            for (j, tap) in taps.chunks_exact(channels).enumerate() {
                let Some(src) = (t + j).checked_sub(k - 1) else { continue };
                let xs = &x[src * channels..(src + 1) * channels];
                row.iter_mut().zip(tap).zip(xs).for_each(|((o, w), xv)| *o += w * xv);
            }
        }
    }
}

/// `y[b, t, d] = silu(bias[d] + sum_k w[d, k] x[b, t - (K-1) + k, d])`, zero before the sequence.
pub fn conv1d_forward(x: &[f32], w: &[f32], bias: &[f32], y: &mut [f32], len: usize, channels: usize) {
    let taps = taps(w, channels);
    y.par_chunks_mut(len * channels).zip(x.par_chunks(len * channels)).for_each(|(y, x)| {
        conv1d_pre(x, &taps, bias, y, channels);
        y.iter_mut().for_each(|v| *v = silu(*v));
    });
}

/// [`conv1d_forward`] continuing each sequence from `state` (`[batch, K - 1, channels]`, the
/// inputs before `x`), which becomes the sequence's last K - 1 inputs.
pub fn conv1d_recurrent(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    state: &mut [f32],
    y: &mut [f32],
    len: usize,
    channels: usize,
) {
    let k = w.len() / channels;
    let (per_seq, kept) = (len * channels, (k - 1) * channels);
    if kept == 0 {
        return conv1d_forward(x, w, bias, y, len, channels);
    }
    let taps = taps(w, channels);
    let seqs = y.par_chunks_mut(per_seq).zip(x.par_chunks(per_seq)).zip(state.par_chunks_mut(kept));
    seqs.for_each(|((y, x), state)| {
        // The kept inputs, then the new ones: the convolution over it from row K - 1 on.
        let window = [&state[..kept], x].concat();
        let mut pre = vec![0.0f32; window.len()];
        conv1d_pre(&window, &taps, bias, &mut pre, channels);
        y.iter_mut().zip(&pre[kept..]).for_each(|(y, p)| *y = silu(*p));
        state[..kept].copy_from_slice(&window[window.len() - kept..]);
    });
}

/// Writes `dx`; accumulates `dw` and `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    dbias: &mut [f32],
    len: usize,
    channels: usize,
) {
    let (k, per_seq) = (w.len() / channels, len * channels);
    let taps = taps(w, channels);
    // Per sequence: dx, and its tap-major dw and dbias partials.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(per_seq)
        .zip(dy.par_chunks(per_seq).zip(x.par_chunks(per_seq)))
        .map(|(dx, (dy, x))| conv1d_sequence_backward(dy, x, &taps, bias, dx, channels))
        .collect();
    // Parameter gradients sum over sequences in order (deterministic).
    for (dtaps, dbias_seq) in partials {
        dbias.iter_mut().zip(&dbias_seq).for_each(|(d, g)| *d += g);
        for (j, dtap) in dtaps.chunks_exact(channels).enumerate() {
            dtap.iter().enumerate().for_each(|(d, g)| dw[d * k + j] += g);
        }
    }
}

dispatched! {
    /// One sequence of [`conv1d_backward`]: writes dx, returns (d taps, d bias).
    fn conv1d_sequence_backward(
        dy: &[f32],
        x: &[f32],
        taps: &[f32],
        bias: &[f32],
        dx: &mut [f32],
        channels: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let k = taps.len() / channels;
        // Gradient at the pre-activation (the convolution is recomputed).
        let mut dpre = vec![0.0f32; dy.len()];
        conv1d_pre(x, taps, bias, &mut dpre, channels);
        dpre.iter_mut().zip(dy).for_each(|(p, g)| *p = g * silu_grad(*p));
        let (mut dtaps, mut dbias) = (vec![0.0f32; taps.len()], vec![0.0f32; channels]);
        dx.fill(0.0);
        for (t, g) in dpre.chunks_exact(channels).enumerate() {
            dbias.iter_mut().zip(g).for_each(|(d, g)| *d += g);
            for (j, (tap, dtap)) in taps.chunks_exact(channels).zip(dtaps.chunks_exact_mut(channels)).enumerate() {
                let Some(src) = (t + j).checked_sub(k - 1) else { continue };
                let (xs, dxs) = (&x[src * channels..(src + 1) * channels], &mut dx[src * channels..(src + 1) * channels]);
                dxs.iter_mut().zip(tap).zip(g).for_each(|((d, w), g)| *d += w * g);
                dtap.iter_mut().zip(xs).zip(g).for_each(|((d, xv), g)| *d += g * xv);
            }
        }
        (dtaps, dbias)
    }
}

/// `A = -exp(a_log)`, computed once per call.
fn decay_rates(a_log: &[f32]) -> Vec<f32> {
    a_log.iter().map(|v| -v.exp()).collect()
}

/// The step sizes `softplus(raw + bias)` of every channel of token `row`, into `steps` (one
/// vector pass, where a scalar softplus per channel would stall on its divisions).
#[inline(always)]
fn step_sizes(raw: &[f32], bias: &[f32], row: usize, steps: &mut [f32]) {
    let ch = steps.len();
    steps.iter_mut().zip(&raw[row * ch..(row + 1) * ch]).zip(bias).for_each(|((s, r), b)| *s = softplus(r + b));
}

/// One step of the recurrence in place, for every channel of token `row` with its step sizes
/// `steps`: `h = exp(delta A) * h + delta B u`. Forward and the backward recompute share it, so
/// the two produce the same bits.
#[inline(always)]
fn advance(h: &mut [f32], steps: &[f32], row: usize, x: &ScanInputs<&[f32]>, a: &[f32], n: usize) {
    let ch = steps.len();
    let bt = &x.b[row * n..(row + 1) * n];
    for (d, (hd, &dt)) in h.chunks_exact_mut(n).zip(steps).enumerate() {
        let ut = x.u[row * ch + d];
        for ((h, a), b) in hd.iter_mut().zip(&a[d * n..(d + 1) * n]).zip(bt) {
            *h = exp(dt * a) * *h + dt * b * ut;
        }
    }
}

/// `y_t = (C_t . h_t + D u_t) silu(z_t)` for every channel of token `row`, into `y` (the dots
/// per channel, then the gate as one vector pass).
#[inline(always)]
fn readout(h: &[f32], x: &ScanInputs<&[f32]>, row: usize, n: usize, y: &mut [f32]) {
    let ch = y.len();
    let ct = &x.c[row * n..(row + 1) * n];
    let (u, z) = (&x.u[row * ch..(row + 1) * ch], &x.z[row * ch..(row + 1) * ch]);
    for (((y, hd), d), u) in y.iter_mut().zip(h.chunks_exact(n)).zip(x.d).zip(u) {
        *y = dot(ct, hd) + d * u;
    }
    y.iter_mut().zip(z).for_each(|(y, z)| *y *= silu(*z));
}

pub fn selective_scan_forward(x: ScanInputs<&[f32]>, y: &mut [f32], states: &mut [f32], s: ScanShape) {
    assert_eq!(states.len(), s.batch * s.saved() * s.channels * s.state);
    let a = decay_rates(x.a_log);
    let seqs = y.par_chunks_mut(s.len * s.channels).zip(states.par_chunks_mut(s.saved() * s.channels * s.state));
    seqs.enumerate().for_each(|(bi, (y, saved))| scan_sequence(&x, &a, bi, y, saved, s));
}

dispatched! {
    /// Sequence `bi` of [`selective_scan_forward`], on the widest vector instructions.
    fn scan_sequence(x: &ScanInputs<&[f32]>, a: &[f32], bi: usize, y: &mut [f32], saved: &mut [f32], s: ScanShape) -> () {
        let (l, ch, n) = (s.len, s.channels, s.state);
        let (mut h, mut steps) = (vec![0.0f32; ch * n], vec![0.0f32; ch]);
        saved[..ch * n].fill(0.0);
        for t in 0..l {
            let row = bi * l + t;
            step_sizes(x.delta, x.delta_bias, row, &mut steps);
            advance(&mut h, &steps, row, x, a, n);
            readout(&h, x, row, n, &mut y[t * ch..(t + 1) * ch]);
            if (t + 1) % s.chunk == 0 || t + 1 == l {
                let slot = (t + 1).div_ceil(s.chunk);
                saved[slot * ch * n..(slot + 1) * ch * n].copy_from_slice(&h);
            }
        }
    }
}

/// The recurrence of [`selective_scan_forward`] from each sequence's `state` (`[batch,
/// channels, state]`), left at the state after its last token; the same bits as the forward.
pub fn selective_scan_recurrent(x: ScanInputs<&[f32]>, y: &mut [f32], state: &mut [f32], s: ScanShape) {
    let (l, ch, n) = (s.len, s.channels, s.state);
    assert_eq!(state.len(), s.batch * ch * n);
    let a = decay_rates(x.a_log);
    y.par_chunks_mut(l * ch).zip(state.par_chunks_mut(ch * n)).enumerate().for_each(|(bi, (y, h))| {
        let mut steps = vec![0.0f32; ch];
        for t in 0..l {
            let row = bi * l + t;
            step_sizes(x.delta, x.delta_bias, row, &mut steps);
            advance(h, &steps, row, &x, &a, n);
            readout(h, &x, row, n, &mut y[t * ch..(t + 1) * ch]);
        }
    });
}

/// Writes `du`, `ddelta`, `db`, `dc`, `dz`; accumulates `ddelta_bias`, `da_log` and `dd`.
pub fn selective_scan_backward(
    dy: &[f32],
    x: ScanInputs<&[f32]>,
    states: &[f32],
    g: ScanGrads<&mut [f32]>,
    s: ScanShape,
) {
    let (l, ch, n) = (s.len, s.channels, s.state);
    let a = decay_rates(x.a_log);
    let ScanGrads { du, ddelta, ddelta_bias, da_log, db, dc, dd, dz } = g;
    // Per sequence: (dA, dD) partials, reduced in sequence order below.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = du
        .par_chunks_mut(l * ch)
        .zip(ddelta.par_chunks_mut(l * ch).zip(dz.par_chunks_mut(l * ch)))
        .zip(db.par_chunks_mut(l * n).zip(dc.par_chunks_mut(l * n)))
        .enumerate()
        .map(|(bi, ((du, (ddelta, dz)), (db, dc)))| {
            let saved = &states[bi * s.saved() * ch * n..(bi + 1) * s.saved() * ch * n];
            scan_sequence_backward(dy, &x, &a, saved, bi, [du, ddelta, dz, db, dc], s)
        })
        .collect();
    // dA_log = dA * A; the bias gradient is the column sum of ddelta.
    for (pa, pd) in partials {
        da_log.iter_mut().zip(&pa).zip(&a).for_each(|((x, p), a)| *x += p * a);
        dd.iter_mut().zip(&pd).for_each(|(x, p)| *x += p);
    }
    for row in ddelta.chunks(ch) {
        ddelta_bias.iter_mut().zip(row).for_each(|(b, g)| *b += g);
    }
}

dispatched! {
    /// Sequence `bi` of [`selective_scan_backward`], from its saved states: writes its du,
    /// ddelta, dz, dB and dC and returns its (dA, dD) partials. The chunk's step sizes come
    /// from its recompute (one vector pass per token); the loop over channels does the gates
    /// and the states.
    fn scan_sequence_backward(
        dy: &[f32],
        x: &ScanInputs<&[f32]>,
        a: &[f32],
        saved: &[f32],
        bi: usize,
        grads: [&mut [f32]; 5],
        s: ScanShape,
    ) -> (Vec<f32>, Vec<f32>) {
        let [du, ddelta, dz, db, dc] = grads;
        let (l, ch, n) = (s.len, s.channels, s.state);
        let (mut pa, mut pd) = (vec![0.0f32; ch * n], vec![0.0f32; ch]);
        let mut dh = vec![0.0f32; ch * n]; // dL/dh_t from later steps, carried backwards
        // A chunk's states h_{t0-1}..h_{t1-1} and its tokens' step sizes.
        let (mut chunk_h, mut chunk_steps) = (vec![0.0f32; (s.chunk + 1) * ch * n], vec![0.0f32; s.chunk * ch]);
        let (mut ddt_terms, mut du_terms) = (vec![0.0f32; n], vec![0.0f32; n]);
        for chunk in (0..l.div_ceil(s.chunk)).rev() {
            let (t0, t1) = (chunk * s.chunk, ((chunk + 1) * s.chunk).min(l));
            // Recompute h_{t0-1}..h_{t1-1} from the boundary state.
            chunk_h[..ch * n].copy_from_slice(&saved[chunk * ch * n..(chunk + 1) * ch * n]);
            for t in t0..t1 {
                let (prev, next) = chunk_h.split_at_mut((t - t0 + 1) * ch * n);
                next[..ch * n].copy_from_slice(&prev[(t - t0) * ch * n..]);
                let steps = &mut chunk_steps[(t - t0) * ch..(t - t0 + 1) * ch];
                step_sizes(x.delta, x.delta_bias, bi * l + t, steps);
                advance(&mut next[..ch * n], steps, bi * l + t, x, a, n);
            }
            for t in (t0..t1).rev() {
                let row = bi * l + t;
                let h_prev = &chunk_h[(t - t0) * ch * n..(t - t0 + 1) * ch * n];
                let h_t = &chunk_h[(t - t0 + 1) * ch * n..(t - t0 + 2) * ch * n];
                let steps = &chunk_steps[(t - t0) * ch..(t - t0 + 1) * ch];
                let (bt, ct) = (&x.b[row * n..(row + 1) * n], &x.c[row * n..(row + 1) * n]);
                let (dbt, dct) = (&mut db[t * n..(t + 1) * n], &mut dc[t * n..(t + 1) * n]);
                dbt.fill(0.0);
                dct.fill(0.0);
                for (d, &dt) in steps.iter().enumerate() {
                    let (ut, zt) = (x.u[row * ch + d], x.z[row * ch + d]);
                    let out = dy[row * ch + d];
                    // Channel d's states, as slices of n (so the loop below vectorises:
                    // its sums over the states go through per-state terms).
                    let ds = d * n..(d + 1) * n;
                    let (dh, pa, a) = (&mut dh[ds.clone()], &mut pa[ds.clone()], &a[ds.clone()]);
                    let (h_t, h_prev) = (&h_t[ds.clone()], &h_prev[ds]);
                    dz[t * ch + d] = out * (dot(ct, h_t) + x.d[d] * ut) * silu_grad(zt);
                    let g = out * silu(zt); // dL/d(C.h + D u)
                    pd[d] += g * ut;
                    for i in 0..n {
                        dct[i] += g * h_t[i];
                        let adj = dh[i] + g * ct[i]; // dL/dh_t
                        let decay = exp(dt * a[i]);
                        pa[i] += adj * dt * decay * h_prev[i];
                        ddt_terms[i] = adj * (a[i] * decay * h_prev[i] + bt[i] * ut);
                        dbt[i] += adj * dt * ut;
                        du_terms[i] = adj * dt * bt[i];
                        dh[i] = adj * decay; // dL/dh_{t-1} through h_t
                    }
                    du[t * ch + d] = g * x.d[d] + sum(&du_terms);
                    // Through the softplus: d softplus(v) / dv = sigmoid(v).
                    ddelta[t * ch + d] = sum(&ddt_terms) * sigmoid(x.delta[row * ch + d] + x.delta_bias[d]);
                }
            }
        }
        (pa, pd)
    }
}

/// Where x, B and C of one head sit in the fused `[x | B | C]` rows of an SSD.
#[derive(Clone, Copy)]
struct SsdIndex {
    width: usize,
    inner: usize,
    p: usize,
    n: usize,
    x: usize,
    b: usize,
    c: usize,
}

/// The parts of a fused `[x | B | C]` row.
#[derive(Clone, Copy)]
enum Part {
    X,
    B,
    C,
}

impl SsdIndex {
    fn new(s: &SsdShape, head: usize) -> Self {
        let (inner, n) = (s.inner(), s.state);
        let group = head / (s.heads / s.groups);
        let b = inner + group * n;
        Self { width: s.xbc_width(), inner, p: s.head_dim, n, x: head * s.head_dim, b, c: b + s.groups * n }
    }
    fn x(&self, t: usize) -> std::ops::Range<usize> {
        t * self.width + self.x..t * self.width + self.x + self.p
    }
    fn b(&self, t: usize) -> std::ops::Range<usize> {
        t * self.width + self.b..t * self.width + self.b + self.n
    }
    fn c(&self, t: usize) -> std::ops::Range<usize> {
        t * self.width + self.c..t * self.width + self.c + self.n
    }
    /// Head columns of a `[rows, inner]` row (y, dy).
    fn y(&self, t: usize) -> std::ops::Range<usize> {
        t * self.inner + self.x..t * self.inner + self.x + self.p
    }
    /// `(start, columns)` of the head's `part` in row `t0` of `[x | B | C]` rows.
    fn block(&self, part: Part, t0: usize) -> (usize, usize) {
        let (col, cols) = match part {
            Part::X => (self.x, self.p),
            Part::B => (self.b, self.n),
            Part::C => (self.c, self.n),
        };
        (t0 * self.width + col, cols)
    }
    /// Rows `t0..t0 + q` of the head's `part` (x: `[q, P]`; B, C: `[q, N]`) as a matrix.
    fn rows<'a>(&self, xbc: &'a [f32], part: Part, t0: usize, q: usize) -> Mat<'a> {
        let (start, cols) = self.block(part, t0);
        Mat::new(xbc, start, q, cols, self.width)
    }
    /// As [`SsdIndex::rows`], of a gradient.
    fn rows_mut<'a>(&self, dxbc: &'a mut [f32], part: Part, t0: usize, q: usize) -> MatMut<'a> {
        let (start, cols) = self.block(part, t0);
        MatMut::new(dxbc, start, q, cols, self.width)
    }
    /// Rows `t0..t0 + q` of the head's columns of `[rows, inner]` (y, dy), `[q, P]`.
    fn y_rows<'a>(&self, y: &'a [f32], t0: usize, q: usize) -> Mat<'a> {
        Mat::new(y, t0 * self.inner + self.x, q, self.p, self.inner)
    }
    fn y_rows_mut<'a>(&self, y: &'a mut [f32], t0: usize, q: usize) -> MatMut<'a> {
        MatMut::new(y, t0 * self.inner + self.x, q, self.p, self.inner)
    }
}

/// Step sizes `softplus(raw + bias)` of head `head` over tokens `t0..t1` of a
/// sequence (`dt` is that sequence's `[len, heads]`), and their running decay sums
/// `L_i = sum_{k<=i} dt_k A`.
fn chunk_steps(dt: &[f32], bias: f32, a: f32, head: usize, s: &SsdShape, t0: usize, t1: usize) -> (Vec<f32>, Vec<f32>) {
    let steps: Vec<f32> = (t0..t1).map(|t| softplus(dt[t * s.heads + head] + bias)).collect();
    let decay = steps
        .iter()
        .scan(0.0f32, |acc, s| {
            *acc += s * a;
            Some(*acc)
        })
        .collect();
    (steps, decay)
}

pub fn ssd_forward(x: SsdInputs<&[f32]>, y: &mut [f32], states: &mut [f32], s: SsdShape) {
    assert!(y.len() == s.rows() * s.inner() && states.len() == s.states_len());
    let per_seq = s.saved() * s.heads * s.head_dim * s.state;
    let seqs = y.par_chunks_mut(s.len * s.inner()).zip(states.par_chunks_mut(per_seq));
    seqs.enumerate().for_each(|(bi, (y, saved))| ssd_sequence(&x, bi, y, saved, s));
}

dispatched! {
    /// Sequence `bi` of [`ssd_forward`], each chunk as three small matrix products.
    fn ssd_sequence(x: &SsdInputs<&[f32]>, bi: usize, y: &mut [f32], saved: &mut [f32], s: SsdShape) -> () {
        let (l, heads, (p, n), q_max) = (s.len, s.heads, (s.head_dim, s.state), s.chunk);
        let (width, pn) = (s.xbc_width(), p * n);
        let xbc = &x.xbc[bi * l * width..(bi + 1) * l * width];
        let dt = &x.dt[bi * l * heads..(bi + 1) * l * heads];
        // The chunk's decay-masked C B^T, [Q, Q], and its x rows scaled for the state update.
        let (mut weights, mut x_scaled) = (vec![0.0f32; q_max * q_max], vec![0.0f32; q_max * p]);
        for h in 0..heads {
            let at = SsdIndex::new(&s, h);
            let a = -x.a_log[h].exp();
            let mut state = vec![0.0f32; pn];
            saved[h * pn..(h + 1) * pn].fill(0.0);
            for chunk in 0..l.div_ceil(q_max) {
                let (t0, t1) = (chunk * q_max, ((chunk + 1) * q_max).min(l));
                let (steps, decay) = chunk_steps(dt, x.dt_bias[h], a, h, &s, t0, t1);
                let (q, last) = (t1 - t0, t1 - t0 - 1);
                let (xs, bs, cs) = (at.rows(xbc, Part::X, t0, q), at.rows(xbc, Part::B, t0, q), at.rows(xbc, Part::C, t0, q));
                // Carried state and skip: y_i = exp(L_i) H0 C_i + D x_i.
                matmul(at.y_rows_mut(y, t0, q), cs, Mat::new(&state, 0, p, n, n).t(), 1.0, 0.0);
                for i in 0..q {
                    let carried = exp(decay[i]);
                    let yi = &mut y[at.y(t0 + i)];
                    yi.iter_mut().zip(&xbc[at.x(t0 + i)]).for_each(|(yv, xv)| *yv = carried * *yv + x.d[h] * xv);
                }
                // Intra-chunk: y += W x with W_ij = exp(L_i - L_j) dt_j (C_i . B_j), j <= i.
                matmul(MatMut::new(&mut weights, 0, q, q, q_max), cs, bs.t(), 1.0, 0.0);
                for (i, row) in weights.chunks_exact_mut(q_max).take(q).enumerate() {
                    let (causal, later) = row[..q].split_at_mut(i + 1);
                    for ((w, lj), dtj) in causal.iter_mut().zip(&decay).zip(&steps) {
                        *w *= exp(decay[i] - lj) * dtj;
                    }
                    later.fill(0.0);
                }
                matmul(at.y_rows_mut(y, t0, q), Mat::new(&weights, 0, q, q, q_max), xs, 1.0, 1.0);
                // State update: H = exp(L_last) H0 + sum_j exp(L_last - L_j) dt_j x_j B_j^T.
                for j in 0..q {
                    let w = exp(decay[last] - decay[j]) * steps[j];
                    let row = &mut x_scaled[j * p..(j + 1) * p];
                    row.iter_mut().zip(&xbc[at.x(t0 + j)]).for_each(|(o, xv)| *o = w * xv);
                }
                let scaled = Mat::new(&x_scaled, 0, q, p, p);
                matmul(MatMut::new(&mut state, 0, p, n, n), scaled.t(), bs, 1.0, exp(decay[last]));
                let slot = chunk + 1;
                saved[(slot * heads + h) * pn..(slot * heads + h + 1) * pn].copy_from_slice(&state);
            }
        }
    }
}

/// The SSD token by token, `H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T`, `y_t = H_t C_t + D
/// x_t`, from each sequence's `state` (`[batch, heads, head_dim, state]`), left at the state
/// after its last token.
pub fn ssd_recurrent(x: SsdInputs<&[f32]>, y: &mut [f32], state: &mut [f32], s: SsdShape) {
    let (l, heads, (p, n)) = (s.len, s.heads, (s.head_dim, s.state));
    let (width, pn) = (s.xbc_width(), p * n);
    assert!(y.len() == s.rows() * s.inner() && state.len() == s.batch * heads * pn);
    y.par_chunks_mut(l * s.inner()).zip(state.par_chunks_mut(heads * pn)).enumerate().for_each(|(bi, (y, state))| {
        let xbc = &x.xbc[bi * l * width..(bi + 1) * l * width];
        let dt = &x.dt[bi * l * heads..(bi + 1) * l * heads];
        for (h, hs) in state.chunks_exact_mut(pn).enumerate() {
            let at = SsdIndex::new(&s, h);
            let a = -x.a_log[h].exp();
            for t in 0..l {
                let step = softplus(dt[t * heads + h] + x.dt_bias[h]);
                let decay = exp(step * a);
                let (bt, ct) = (&xbc[at.b(t)], &xbc[at.c(t)]);
                for ((row, xv), yv) in hs.chunks_exact_mut(n).zip(&xbc[at.x(t)]).zip(&mut y[at.y(t)]) {
                    row.iter_mut().zip(bt).for_each(|(h, b)| *h = decay * *h + step * xv * b);
                    *yv = dot(row, ct) + x.d[h] * xv;
                }
            }
        }
    });
}

/// Writes `dxbc` and `ddt`; accumulates `ddt_bias`, `da_log` and `dd`. Walks each head's
/// chunks in reverse, carrying dL/dH (the state leaving the chunk) and reading the state
/// entering each chunk from `states`; each term is the derivative of one term of the forward's
/// quadratic form (`L` enters through exp(L_i - L_j), the carried state and the state update).
pub fn ssd_backward(dy: &[f32], x: SsdInputs<&[f32]>, states: &[f32], g: SsdGrads<&mut [f32]>, s: SsdShape) {
    let (l, heads, width) = (s.len, s.heads, s.xbc_width());
    let SsdGrads { dxbc, ddt, ddt_bias, da_log, dd } = g;
    // Per sequence and head: d dt_bias, dA and dD, reduced in sequence order below.
    let partials: Vec<[Vec<f32>; 3]> = dxbc
        .par_chunks_mut(l * width)
        .zip(ddt.par_chunks_mut(l * heads))
        .enumerate()
        .map(|(bi, (dxbc, ddt))| ssd_sequence_backward(dy, &x, states, bi, dxbc, ddt, s))
        .collect();
    for [dbias, da, dskip] in partials {
        for h in 0..heads {
            ddt_bias[h] += dbias[h];
            // dA_log = dA * A.
            da_log[h] += da[h] * -x.a_log[h].exp();
            dd[h] += dskip[h];
        }
    }
}

dispatched! {
    /// Sequence `bi` of [`ssd_backward`]: writes its dxbc and ddt, returns its per-head
    /// (d dt_bias, dA, dD) partials. Each chunk's products are small matrix products.
    fn ssd_sequence_backward(
        dy: &[f32],
        x: &SsdInputs<&[f32]>,
        states: &[f32],
        bi: usize,
        dxbc: &mut [f32],
        ddt: &mut [f32],
        s: SsdShape,
    ) -> [Vec<f32>; 3] {
        let (l, heads, (p, n), q_max) = (s.len, s.heads, (s.head_dim, s.state), s.chunk);
        let (width, pn) = (s.xbc_width(), p * n);
        let xbc = &x.xbc[bi * l * width..(bi + 1) * l * width];
        let dt = &x.dt[bi * l * heads..(bi + 1) * l * heads];
        let dy = &dy[bi * l * s.inner()..(bi + 1) * l * s.inner()];
        let saved = &states[bi * s.saved() * heads * pn..(bi + 1) * s.saved() * heads * pn];
        let [mut dbias, mut da, mut dskip] = [vec![0.0f32; heads], vec![0.0f32; heads], vec![0.0f32; heads]];
        dxbc.fill(0.0);
        // Per chunk: C B^T and dy x^T ([Q, Q], masked in place into the weights of dx and of
        // dB, dC), and [Q, P] / [Q, N] products with a state.
        let (mut cb, mut gx) = (vec![0.0f32; q_max * q_max], vec![0.0f32; q_max * q_max]);
        let (mut by_state, mut dy_carried, mut u) = (vec![0.0f32; q_max * p], vec![0.0f32; q_max * p], vec![0.0f32; q_max * n]);
        for h in 0..heads {
            let at = SsdIndex::new(&s, h);
            let a = -x.a_log[h].exp();
            // dL/dH leaving the current chunk, and entering it (swapped after each chunk).
            let (mut dstate, mut dh0) = (vec![0.0f32; pn], vec![0.0f32; pn]);
            for chunk in (0..l.div_ceil(q_max)).rev() {
                let (t0, t1) = (chunk * q_max, ((chunk + 1) * q_max).min(l));
                let (q, last) = (t1 - t0, t1 - t0 - 1);
                let h0 = &saved[(chunk * heads + h) * pn..(chunk * heads + h + 1) * pn];
                let (steps, decay) = chunk_steps(dt, x.dt_bias[h], a, h, &s, t0, t1);
                let (mut ddecay, mut dsteps) = (vec![0.0f32; q], vec![0.0f32; q]);
                let (xs, bs, cs) = (at.rows(xbc, Part::X, t0, q), at.rows(xbc, Part::B, t0, q), at.rows(xbc, Part::C, t0, q));
                let dys = at.y_rows(dy, t0, q);
                let (h0m, dstate_m) = (Mat::new(h0, 0, p, n, n), Mat::new(&dstate, 0, p, n, n));
                // The state entering the chunk carried to its end: exp(L_last) H0.
                let total = exp(decay[last]);
                dh0.iter_mut().zip(&dstate).for_each(|(d, g)| *d = total * g);
                ddecay[last] += total * dot(&dstate, h0);
                // Skip term D x_i.
                for i in 0..q {
                    let dyi = &dy[at.y(t0 + i)];
                    dskip[h] += dot(dyi, &xbc[at.x(t0 + i)]);
                    dxbc[at.x(t0 + i)].iter_mut().zip(dyi).for_each(|(d, g)| *d += x.d[h] * g);
                }
                // Carried state exp(L_i) H0 C_i: with R = C H0^T and dYc = diag(exp L) dY,
                // dL_i = dYc_i . R_i, dH0 += dYc^T C, dC += dYc H0.
                matmul(MatMut::new(&mut by_state, 0, q, p, p), cs, h0m.t(), 1.0, 0.0);
                for i in 0..q {
                    let carried = exp(decay[i]);
                    let row = &mut dy_carried[i * p..(i + 1) * p];
                    row.iter_mut().zip(&dy[at.y(t0 + i)]).for_each(|(o, g)| *o = carried * g);
                    ddecay[i] += dot(row, &by_state[i * p..(i + 1) * p]);
                }
                let dyc = Mat::new(&dy_carried, 0, q, p, p);
                matmul(MatMut::new(&mut dh0, 0, p, n, n), dyc.t(), cs, 1.0, 1.0);
                matmul(at.rows_mut(dxbc, Part::C, t0, q), dyc, h0m, 1.0, 1.0);
                // Intra-chunk pairs j <= i, exp(L_i - L_j) dt_j (C_i . B_j)(dy_i . x_j): the
                // masks turn C B^T into the weights of dx (M) and dy x^T into those of dB, dC (W).
                matmul(MatMut::new(&mut cb, 0, q, q, q_max), cs, bs.t(), 1.0, 0.0);
                matmul(MatMut::new(&mut gx, 0, q, q, q_max), dys, xs.t(), 1.0, 0.0);
                for i in 0..q {
                    let (cb_row, gx_row) = (&mut cb[i * q_max..i * q_max + q], &mut gx[i * q_max..i * q_max + q]);
                    let mut to_i = 0.0f32;
                    for j in 0..=i {
                        let e = exp(decay[i] - decay[j]);
                        let both = e * cb_row[j] * gx_row[j];
                        let pair = both * steps[j];
                        to_i += pair;
                        ddecay[j] -= pair;
                        dsteps[j] += both;
                        cb_row[j] *= e * steps[j];
                        gx_row[j] *= e * steps[j];
                    }
                    ddecay[i] += to_i;
                    cb_row[i + 1..].fill(0.0);
                    gx_row[i + 1..].fill(0.0);
                }
                let (mx, wbc) = (Mat::new(&cb, 0, q, q, q_max), Mat::new(&gx, 0, q, q, q_max));
                matmul(at.rows_mut(dxbc, Part::X, t0, q), mx.t(), dys, 1.0, 1.0);
                matmul(at.rows_mut(dxbc, Part::B, t0, q), wbc.t(), cs, 1.0, 1.0);
                matmul(at.rows_mut(dxbc, Part::C, t0, q), wbc, bs, 1.0, 1.0);
                // State update H_end = exp(L_last) H0 + sum_j exp(L_last - L_j) dt_j x_j B_j^T:
                // with V = B dH^T and U = x dH, dx_j and dB_j gain their rows scaled.
                matmul(MatMut::new(&mut by_state, 0, q, p, p), bs, dstate_m.t(), 1.0, 0.0);
                matmul(MatMut::new(&mut u, 0, q, n, n), xs, dstate_m, 1.0, 0.0);
                for j in 0..q {
                    let (tj, w) = (t0 + j, exp(decay[last] - decay[j]));
                    let (vj, uj) = (&by_state[j * p..(j + 1) * p], &u[j * n..(j + 1) * n]);
                    let xv_dot = dot(&xbc[at.x(tj)], vj);
                    dsteps[j] += w * xv_dot;
                    ddecay[last] += w * steps[j] * xv_dot;
                    ddecay[j] -= w * steps[j] * xv_dot;
                    let scale = w * steps[j];
                    dxbc[at.x(tj)].iter_mut().zip(vj).for_each(|(d, v)| *d += scale * v);
                    dxbc[at.b(tj)].iter_mut().zip(uj).for_each(|(d, u)| *d += scale * u);
                }
                // L_i = sum_{k<=i} dt_k A: dL/d(dt_k A) is the suffix sum of dL/dL_i.
                let mut suffix = 0.0f32;
                for k in (0..q).rev() {
                    suffix += ddecay[k];
                    dsteps[k] += a * suffix;
                    da[h] += steps[k] * suffix;
                }
                // Through the softplus: d softplus(v) / dv = sigmoid(v).
                for k in 0..q {
                    let g = dsteps[k] * sigmoid(dt[(t0 + k) * heads + h] + x.dt_bias[h]);
                    ddt[(t0 + k) * heads + h] = g;
                    dbias[h] += g;
                }
                std::mem::swap(&mut dstate, &mut dh0);
            }
        }
        [dbias, da, dskip]
    }
}
