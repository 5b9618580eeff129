//! Mamba's causal convolution, selective scan, SSD scan and gated RMSNorm against central
//! finite differences, for chunk sizes that do and do not divide the sequence length; the SSD
//! chunked form also against the plain sequential recurrence.

use ondol_core::gradcheck::{check, dot, randn};
use ondol_core::{Backend, ScanGrads, ScanInputs, ScanShape, SsdGrads, SsdInputs, SsdShape};
use ondol_cpu::CpuBackend;

const BE: CpuBackend = CpuBackend;

fn conv1d_forward(x: &[f32], w: &[f32], bias: &[f32], y: &mut [f32], len: usize, ch: usize) {
    BE.conv1d_forward(x, w, bias, y, len, ch);
}

const H: f32 = 1e-2;
const RTOL: f64 = 1e-2;
const ATOL: f64 = 1e-3;

#[test]
fn conv1d_backward_matches_finite_differences() {
    let (batch, len, ch, k) = (2, 7, 3, 4);
    let mut x = randn(batch * len * ch, 1.0, 1);
    // (the pre-activations land on both sides of SiLU's bend)
    let mut w = randn(ch * k, 0.5, 2);
    let mut bias = randn(ch, 0.5, 3);
    let dy = randn(x.len(), 1.0, 4);
    let mut y = vec![0.0; x.len()];
    let (mut dx, mut dw, mut db) = (vec![f32::NAN; x.len()], vec![0.0; w.len()], vec![0.0; ch]);
    BE.conv1d_backward(&dy, &x, &w, &bias, &mut dx, &mut dw, &mut db, len, ch);
    let (w0, b0) = (w.clone(), bias.clone());
    check(
        &mut x,
        &dx,
        |x| {
            conv1d_forward(x, &w0, &b0, &mut y, len, ch);
            dot(&dy, &y)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("conv1d dx");
    let x0 = x.clone();
    check(
        &mut w,
        &dw,
        |w| {
            conv1d_forward(&x0, w, &b0, &mut y, len, ch);
            dot(&dy, &y)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("conv1d dw");
    check(
        &mut bias,
        &db,
        |b| {
            conv1d_forward(&x0, &w0, b, &mut y, len, ch);
            dot(&dy, &y)
        },
        H,
        RTOL,
        ATOL,
        usize::MAX,
        0,
    )
    .assert_ok("conv1d dbias");
    // Causal: the output at t never depends on inputs after t.
    let mut later = x0.clone();
    later[(len - 1) * ch] += 5.0;
    let mut y2 = vec![0.0; x0.len()];
    conv1d_forward(&x0, &w0, &b0, &mut y, len, ch);
    conv1d_forward(&later, &w0, &b0, &mut y2, len, ch);
    assert_eq!(&y[..(len - 1) * ch], &y2[..(len - 1) * ch]);
}

/// Field by field, the inputs of a selective scan, owned.
struct Inputs {
    fields: [Vec<f32>; 8],
}

const SCAN_FIELDS: [&str; 8] = ["u", "delta", "delta_bias", "a_log", "b", "c", "d", "z"];

impl Inputs {
    fn new(s: ScanShape) -> Self {
        let (bl, ch, n) = (s.batch * s.len, s.channels, s.state);
        Self {
            fields: [
                randn(bl * ch, 1.0, 5),
                randn(bl * ch, 1.0, 6),
                randn(ch, 0.5, 7),
                randn(ch * n, 0.5, 8),
                randn(bl * n, 1.0, 9),
                randn(bl * n, 1.0, 10),
                randn(ch, 1.0, 11),
                randn(bl * ch, 1.0, 12),
            ],
        }
    }
    fn views(&self) -> ScanInputs<&[f32]> {
        let [u, delta, delta_bias, a_log, b, c, d, z] = self.fields.each_ref().map(|v| v.as_slice());
        ScanInputs { u, delta, delta_bias, a_log, b, c, d, z }
    }
}

fn scan_forward(x: &Inputs, s: ScanShape) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0; s.batch * s.len * s.channels];
    let mut states = vec![0.0; s.batch * s.saved() * s.channels * s.state];
    BE.selective_scan_forward(x.views(), &mut y, &mut states, s);
    (y, states)
}

#[test]
fn selective_scan_backward_matches_finite_differences_for_every_input() {
    for chunk in [1, 3, 4, 16] {
        let s = ScanShape { batch: 2, len: 10, channels: 3, state: 4, chunk };
        let mut x = Inputs::new(s);
        let dy = randn(s.batch * s.len * s.channels, 1.0, 13);
        let (y, states) = scan_forward(&x, s);
        // The chunked forward's output does not depend on the chunk size.
        assert_eq!(y, scan_forward(&x, ScanShape { chunk: 1, ..s }).0, "chunk {chunk} changed the output");
        let mut grads: [Vec<f32>; 8] = x.fields.each_ref().map(|f| vec![0.0; f.len()]);
        {
            let [u, delta, delta_bias, a_log, b, c, d, z] = grads.each_mut().map(|v| v.as_mut_slice());
            let g =
                ScanGrads { du: u, ddelta: delta, ddelta_bias: delta_bias, da_log: a_log, db: b, dc: c, dd: d, dz: z };
            BE.selective_scan_backward(&dy, x.views(), &states, g, s);
        }
        for (k, name) in SCAN_FIELDS.iter().enumerate() {
            let mut values = x.fields[k].clone();
            check(
                &mut values,
                &grads[k],
                |v| {
                    let saved = std::mem::replace(&mut x.fields[k], v.to_vec());
                    let y = scan_forward(&x, s).0;
                    x.fields[k] = saved;
                    dot(&dy, &y)
                },
                H,
                RTOL,
                ATOL,
                usize::MAX,
                0,
            )
            .assert_ok(&format!("d{name} (chunk {chunk})"));
        }
    }
}

/// The inputs of an SSD scan, owned: xbc, dt, dt_bias, a_log, d.
struct SsdData {
    fields: [Vec<f32>; 5],
}

const SSD_FIELDS: [&str; 5] = ["xbc", "dt", "dt_bias", "a_log", "d"];

impl SsdData {
    fn new(s: SsdShape, seed: u64) -> Self {
        Self {
            fields: [
                randn(s.rows() * s.xbc_width(), 1.0, seed),
                randn(s.rows() * s.heads, 1.0, seed + 1),
                randn(s.heads, 0.5, seed + 2),
                randn(s.heads, 0.5, seed + 3),
                randn(s.heads, 1.0, seed + 4),
            ],
        }
    }
    fn views(&self) -> SsdInputs<&[f32]> {
        let [xbc, dt, dt_bias, a_log, d] = self.fields.each_ref().map(|v| v.as_slice());
        SsdInputs { xbc, dt, dt_bias, a_log, d }
    }
}

fn ssd_forward(x: &SsdData, s: SsdShape) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0; s.rows() * s.inner()];
    let mut states = vec![0.0; s.states_len()];
    BE.ssd_forward(x.views(), &mut y, &mut states, s);
    (y, states)
}

/// The recurrence one token at a time, in f64: H = exp(dt A) H + dt x B^T, y = H C + D x, with
/// dt = softplus(dt_raw + dt_bias).
fn ssd_sequential(x: &SsdData, s: SsdShape) -> Vec<f64> {
    let [xbc, dt, dt_bias, a_log, d] = &x.fields;
    let (w, inner, (p, n)) = (s.xbc_width(), s.inner(), (s.head_dim, s.state));
    let mut y = vec![0.0f64; s.rows() * inner];
    for bi in 0..s.batch {
        for h in 0..s.heads {
            let g = h / (s.heads / s.groups);
            let a = -(a_log[h] as f64).exp();
            let mut state = vec![0.0f64; p * n];
            for t in 0..s.len {
                let row = bi * s.len + t;
                let v = (dt[row * s.heads + h] + dt_bias[h]) as f64;
                let step = if v > 20.0 { v } else { v.exp().ln_1p() };
                let xv = |i: usize| xbc[row * w + h * p + i] as f64;
                let bv = |k: usize| xbc[row * w + inner + g * n + k] as f64;
                let cv = |k: usize| xbc[row * w + inner + s.groups * n + g * n + k] as f64;
                for i in 0..p {
                    let mut acc = d[h] as f64 * xv(i);
                    for k in 0..n {
                        let hs = &mut state[i * n + k];
                        *hs = (step * a).exp() * *hs + step * xv(i) * bv(k);
                        acc += *hs * cv(k);
                    }
                    y[row * inner + h * p + i] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn ssd_chunked_form_equals_the_sequential_recurrence() {
    // Lengths that are and are not multiples of the chunk; one and several groups.
    let cases = [(12, 4, 2, 1), (13, 4, 4, 2), (9, 16, 2, 2), (7, 1, 2, 1), (20, 6, 4, 1)];
    for (len, chunk, heads, groups) in cases {
        let s = SsdShape { batch: 2, len, heads, head_dim: 3, groups, state: 5, chunk };
        let x = SsdData::new(s, 40 + len as u64);
        let (y, _) = ssd_forward(&x, s);
        let want = ssd_sequential(&x, s);
        let worst =
            ondol_core::gradcheck::worst(y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs() / (1.0 + b.abs())));
        assert!(worst < 2e-5, "len {len} chunk {chunk} heads {heads} groups {groups}: worst {worst:.2e}");
    }
}

#[test]
fn ssd_backward_matches_finite_differences_for_every_input() {
    for (len, chunk, heads, groups) in [(9, 4, 2, 1), (8, 3, 4, 2), (6, 16, 2, 2)] {
        let s = SsdShape { batch: 2, len, heads, head_dim: 3, groups, state: 4, chunk };
        let mut x = SsdData::new(s, 60 + len as u64);
        let dy = randn(s.rows() * s.inner(), 1.0, 70);
        let (_, states) = ssd_forward(&x, s);
        let mut grads: [Vec<f32>; 5] = x.fields.each_ref().map(|f| vec![0.0; f.len()]);
        {
            let [dxbc, ddt, ddt_bias, da_log, dd] = grads.each_mut().map(|v| v.as_mut_slice());
            BE.ssd_backward(&dy, x.views(), &states, SsdGrads { dxbc, ddt, ddt_bias, da_log, dd }, s);
        }
        for (k, name) in SSD_FIELDS.iter().enumerate() {
            let mut values = x.fields[k].clone();
            check(
                &mut values,
                &grads[k],
                |v| {
                    let saved = std::mem::replace(&mut x.fields[k], v.to_vec());
                    let y = ssd_forward(&x, s).0;
                    x.fields[k] = saved;
                    dot(&dy, &y)
                },
                H,
                RTOL,
                ATOL,
                usize::MAX,
                0,
            )
            .assert_ok(&format!("ssd d{name} (len {len}, chunk {chunk}, groups {groups})"));
        }
    }
}

#[test]
fn gated_rmsnorm_backward_matches_finite_differences() {
    for group in [12, 4] {
        let (rows, width) = (5, 12);
        let (mut x, mut z, mut w) = (randn(rows * width, 1.0, 80), randn(rows * width, 1.5, 81), randn(width, 1.0, 82));
        let dout = randn(rows * width, 1.0, 83);
        let mut out = vec![0.0; x.len()];
        let mut rstd = vec![0.0; rows * width / group];
        BE.gated_rmsnorm_forward(&x, &z, &w, &mut out, &mut rstd, group, 1e-5);
        let (mut dx, mut dz, mut dw) = (vec![f32::NAN; x.len()], vec![f32::NAN; z.len()], vec![0.0; width]);
        BE.gated_rmsnorm_backward(&dout, &x, &z, &w, &rstd, &mut dx, &mut dz, &mut dw, group);
        let mut loss = |x: &[f32], z: &[f32], w: &[f32]| {
            let mut r = vec![0.0; rows * width / group];
            BE.gated_rmsnorm_forward(x, z, w, &mut out, &mut r, group, 1e-5);
            dot(&dout, &out)
        };
        let (x0, z0, w0) = (x.clone(), z.clone(), w.clone());
        check(&mut x, &dx, |v| loss(v, &z0, &w0), H, RTOL, ATOL, usize::MAX, 0).assert_ok("gated norm dx");
        check(&mut z, &dz, |v| loss(&x0, v, &w0), H, RTOL, ATOL, usize::MAX, 0).assert_ok("gated norm dz");
        check(&mut w, &dw, |v| loss(&x0, &z0, v), H, RTOL, ATOL, usize::MAX, 0).assert_ok("gated norm dw");
    }
}

/// Rows `range` of every sequence of a `[batch, len, width]` buffer, as `[batch, range, width]`.
fn tokens(v: &[f32], batch: usize, len: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    let width = v.len() / (batch * len);
    (0..batch).flat_map(|b| v[(b * len + range.start) * width..(b * len + range.end) * width].to_vec()).collect()
}

/// Writes `part` (`[batch, range, width]`) into rows `range` of every sequence of `whole`.
fn put_tokens(whole: &mut [f32], part: &[f32], batch: usize, len: usize, range: std::ops::Range<usize>) {
    let width = whole.len() / (batch * len);
    for (b, rows) in part.chunks(range.len() * width).enumerate() {
        whole[(b * len + range.start) * width..(b * len + range.end) * width].copy_from_slice(rows);
    }
}

/// Pieces of a 9-token sequence as inference feeds them: a prompt, then single tokens and a
/// short run (shorter than the convolution's window).
const PIECES: [std::ops::Range<usize>; 4] = [0..4, 4..5, 5..7, 7..9];

fn assert_near(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let worst =
        ondol_core::gradcheck::worst(got.iter().zip(want).map(|(a, b)| ((a - b).abs() / (1.0 + b.abs())) as f64));
    assert!(got.len() == want.len() && worst <= tol as f64, "{what}: worst relative error {worst:.2e}");
}

#[test]
fn recurrent_forms_continue_sequences_piece_by_piece() {
    let (batch, len, ch, k) = (2, 9, 3, 4);
    let (x, w, bias) = (randn(batch * len * ch, 1.0, 60), randn(ch * k, 0.5, 61), randn(ch, 0.5, 62));
    let mut want = vec![0.0; x.len()];
    BE.conv1d_forward(&x, &w, &bias, &mut want, len, ch);
    let (mut got, mut carry) = (vec![0.0; x.len()], vec![0.0; batch * (k - 1) * ch]);
    for piece in PIECES {
        let mut y = vec![0.0; batch * piece.len() * ch];
        BE.conv1d_recurrent(&tokens(&x, batch, len, piece.clone()), &w, &bias, &mut carry, &mut y, piece.len(), ch);
        put_tokens(&mut got, &y, batch, len, piece);
    }
    assert_near("conv1d_recurrent", &got, &want, 1e-6);
    assert_eq!(carry, tokens(&x, batch, len, len - (k - 1)..len), "the carry keeps the last K - 1 inputs");

    let s = ScanShape { batch, len, channels: ch, state: 4, chunk: 4 };
    let x = Inputs::new(s);
    let (want, states) = scan_forward(&x, s);
    let (mut got, mut h) = (vec![0.0; want.len()], vec![0.0; batch * ch * s.state]);
    for piece in PIECES {
        let [u, delta, delta_bias, a_log, b, c, d, z] = x.fields.each_ref().map(|v| v.as_slice());
        let cut = |v: &[f32]| tokens(v, batch, len, piece.clone());
        let (u, delta, b, c, z) = (cut(u), cut(delta), cut(b), cut(c), cut(z));
        let inputs = ScanInputs { u: &u[..], delta: &delta[..], delta_bias, a_log, b: &b[..], c: &c[..], d, z: &z[..] };
        let mut y = vec![0.0; batch * piece.len() * ch];
        BE.selective_scan_recurrent(inputs, &mut y, &mut h, ScanShape { len: piece.len(), ..s });
        put_tokens(&mut got, &y, batch, len, piece);
    }
    assert_eq!(got, want, "selective_scan_recurrent: the forward's bits");
    let last = s.saved() - 1;
    let finals: Vec<f32> =
        states.chunks(s.saved() * ch * s.state).flat_map(|seq| seq[last * ch * s.state..].to_vec()).collect();
    assert_eq!(h, finals, "selective_scan_recurrent: the forward's last saved state");

    let s = SsdShape { batch, len, heads: 4, head_dim: 3, groups: 2, state: 5, chunk: 4 };
    let x = SsdData::new(s, 70);
    let (_, states) = ssd_forward(&x, s);
    let want: Vec<f32> = ssd_sequential(&x, s).iter().map(|&v| v as f32).collect();
    let pn = s.inner() * s.state;
    let (mut got, mut carry) = (vec![0.0; want.len()], vec![0.0; batch * pn]);
    for piece in PIECES {
        let [xbc, dt, dt_bias, a_log, d] = x.fields.each_ref().map(|v| v.as_slice());
        let (xbc, dt) = (tokens(xbc, batch, len, piece.clone()), tokens(dt, batch, len, piece.clone()));
        let mut y = vec![0.0; batch * piece.len() * s.inner()];
        let inputs = SsdInputs { xbc: &xbc[..], dt: &dt[..], dt_bias, a_log, d };
        BE.ssd_recurrent(inputs, &mut y, &mut carry, SsdShape { len: piece.len(), ..s });
        put_tokens(&mut got, &y, batch, len, piece);
    }
    assert_near("ssd_recurrent y", &got, &want, 2e-5);
    let last = s.saved() - 1;
    let finals: Vec<f32> = states.chunks(s.saved() * pn).flat_map(|seq| seq[last * pn..].to_vec()).collect();
    assert_near("ssd_recurrent state", &carry, &finals, 2e-5);
}
