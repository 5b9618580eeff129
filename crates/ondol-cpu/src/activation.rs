//! Pointwise activations: gated linear units (`act(gate) * up`, gate and up the halves of one
//! `[rows, 2F]` buffer: SwiGLU with SiLU, GeGLU with GELU), and plain GELU (tanh
//! approximation), squared ReLU and SiLU. Memory-bound: a GLU's forward reads 2F and writes F
//! floats per row; backward reads dout and the saved input and writes dinput.

use crate::math::{gelu, gelu_grad, sigmoid, silu};
use crate::simd::dispatched;
use ondol_core::Activation;
use rayon::prelude::*;

/// Elements per parallel task for flat pointwise loops.
const FLAT_CHUNK: usize = 1 << 14;

pub fn glu_forward(act: Activation, gate_up: &[f32], out: &mut [f32], width: usize) {
    assert_eq!(gate_up.len(), 2 * out.len());
    out.par_chunks_mut(width).zip(gate_up.par_chunks(2 * width)).for_each(|(o, gu)| glu_row(act, gu, o));
}

dispatched! {
    /// One row of [`glu_forward`].
    fn glu_row(act: Activation, gate_up: &[f32], out: &mut [f32]) -> () {
        let (g, u) = gate_up.split_at(out.len());
        out.iter_mut().zip(g).zip(u).for_each(|((o, g), u)| *o = apply(act, *g) * u);
    }
}

/// d/dg [act(g) u] = u act'(g), d/du = act(g).
pub fn glu_backward(act: Activation, dout: &[f32], gate_up: &[f32], dgate_up: &mut [f32], width: usize) {
    assert!(gate_up.len() == 2 * dout.len() && dgate_up.len() == gate_up.len());
    dgate_up
        .par_chunks_mut(2 * width)
        .zip(gate_up.par_chunks(2 * width).zip(dout.par_chunks(width)))
        .for_each(|(dgu, (gu, dy))| glu_row_backward(act, dy, gu, dgu));
}

dispatched! {
    /// One row of [`glu_backward`].
    fn glu_row_backward(act: Activation, dout: &[f32], gate_up: &[f32], dgate_up: &mut [f32]) -> () {
        let (dg, du) = dgate_up.split_at_mut(dout.len());
        let (g, u) = gate_up.split_at(dout.len());
        for ((((dg, du), g), u), dy) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dout) {
            let (a, da) = with_derivative(act, *g);
            *dg = dy * u * da;
            *du = dy * a;
        }
    }
}

/// `act(x)` and its derivative, sharing the exponential.
#[inline(always)]
fn with_derivative(act: Activation, x: f32) -> (f32, f32) {
    match act {
        Activation::Silu => {
            let s = sigmoid(x);
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
        _ => (apply(act, x), derivative(act, x)),
    }
}

#[inline(always)]
fn apply(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => gelu(x),
        Activation::Relu2 => x.max(0.0) * x.max(0.0),
        Activation::Silu => silu(x),
    }
}

#[inline(always)]
fn derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => gelu_grad(x),
        Activation::Relu2 => 2.0 * x.max(0.0),
        Activation::Silu => with_derivative(act, x).1,
    }
}

pub fn activation_forward(act: Activation, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    out.par_chunks_mut(FLAT_CHUNK).zip(x.par_chunks(FLAT_CHUNK)).for_each(|(o, x)| activation_chunk(act, x, o));
}

dispatched! {
    /// One chunk of [`activation_forward`].
    fn activation_chunk(act: Activation, x: &[f32], out: &mut [f32]) -> () {
        out.iter_mut().zip(x).for_each(|(o, x)| *o = apply(act, *x));
    }
}

pub fn activation_backward(act: Activation, dout: &[f32], x: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dout.len() && dx.len() == x.len());
    dx.par_chunks_mut(FLAT_CHUNK)
        .zip(x.par_chunks(FLAT_CHUNK).zip(dout.par_chunks(FLAT_CHUNK)))
        .for_each(|(dx, (x, dy))| activation_chunk_backward(act, dy, x, dx));
}

dispatched! {
    /// One chunk of [`activation_backward`].
    fn activation_chunk_backward(act: Activation, dout: &[f32], x: &[f32], dx: &mut [f32]) -> () {
        dx.iter_mut().zip(x).zip(dout).for_each(|((dx, x), dy)| *dx = dy * derivative(act, *x));
    }
}
