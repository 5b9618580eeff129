//! Mamba's causal depthwise convolution and selective scan against central finite
//! differences, for chunk sizes that do and do not divide the sequence length.

use ondol_core::gradcheck::{check, dot, randn};
use ondol_core::{Backend, ScanShape};
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
    let mut w = randn(ch * k, 0.5, 2);
    let mut bias = randn(ch, 0.5, 3);
    let dy = randn(x.len(), 1.0, 4);
    let mut y = vec![0.0; x.len()];
    let (mut dx, mut dw, mut db) = (vec![f32::NAN; x.len()], vec![0.0; w.len()], vec![0.0; ch]);
    BE.conv1d_backward(&dy, &x, &w, &mut dx, &mut dw, &mut db, len, ch);
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

struct Inputs {
    u: Vec<f32>,
    delta: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d: Vec<f32>,
}

fn inputs(s: ScanShape) -> Inputs {
    let (bl, ch, n) = (s.batch * s.len, s.channels, s.state);
    Inputs {
        u: randn(bl * ch, 1.0, 5),
        // Positive step sizes, as softplus makes them.
        delta: randn(bl * ch, 0.3, 6).iter().map(|v| 0.4 + v.abs()).collect(),
        // Negative A, as -exp(A_log) makes it.
        a: randn(ch * n, 0.5, 7).iter().map(|v| -(0.2 + v.abs())).collect(),
        b: randn(bl * n, 1.0, 8),
        c: randn(bl * n, 1.0, 9),
        d: randn(ch, 1.0, 10),
    }
}

fn forward(x: &Inputs, s: ScanShape) -> Vec<f32> {
    let mut y = vec![0.0; s.batch * s.len * s.channels];
    let mut states = vec![0.0; s.batch * s.saved() * s.channels * s.state];
    BE.selective_scan_forward(&x.u, &x.delta, &x.a, &x.b, &x.c, &x.d, &mut y, &mut states, s);
    y
}

#[test]
fn selective_scan_backward_matches_finite_differences_for_every_input() {
    for chunk in [1, 3, 4, 16] {
        let s = ScanShape { batch: 2, len: 10, channels: 3, state: 4, chunk };
        let mut x = inputs(s);
        let dy = randn(s.batch * s.len * s.channels, 1.0, 11);
        let mut y = vec![0.0; dy.len()];
        let mut states = vec![0.0; s.batch * s.saved() * s.channels * s.state];
        BE.selective_scan_forward(&x.u, &x.delta, &x.a, &x.b, &x.c, &x.d, &mut y, &mut states, s);
        // The chunked forward's output does not depend on the chunk size.
        let reference = forward(&x, ScanShape { chunk: 1, ..s });
        assert_eq!(y, reference, "chunk {chunk} changed the output");
        let (mut du, mut ddelta) = (vec![f32::NAN; dy.len()], vec![f32::NAN; dy.len()]);
        let (mut db, mut dc) = (vec![f32::NAN; x.b.len()], vec![f32::NAN; x.c.len()]);
        let (mut da, mut dd) = (vec![0.0; x.a.len()], vec![0.0; x.d.len()]);
        BE.selective_scan_backward(
            &dy,
            &x.u,
            &x.delta,
            &x.a,
            &x.b,
            &x.c,
            &x.d,
            &states,
            &mut du,
            &mut ddelta,
            &mut da,
            &mut db,
            &mut dc,
            &mut dd,
            s,
        );
        macro_rules! fd {
            ($field:ident, $grad:expr, $name:expr) => {{
                let mut values = x.$field.clone();
                let grad = $grad.clone();
                check(
                    &mut values,
                    &grad,
                    |v| {
                        let saved = std::mem::replace(&mut x.$field, v.to_vec());
                        let y = forward(&x, s);
                        x.$field = saved;
                        dot(&dy, &y)
                    },
                    H,
                    RTOL,
                    ATOL,
                    usize::MAX,
                    0,
                )
                .assert_ok(&format!("{} (chunk {chunk})", $name));
            }};
        }
        fd!(u, du, "du");
        fd!(delta, ddelta, "ddelta");
        fd!(a, da, "dA");
        fd!(b, db, "dB");
        fd!(c, dc, "dC");
        fd!(d, dd, "dD");
    }
}
