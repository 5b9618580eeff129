//! Pointwise activations: SwiGLU (`silu(gate) * up`, gate and up the halves of one
//! `[rows, 2F]` buffer), GELU (tanh approximation) and squared ReLU. Memory-bound: forward reads 2F and
//! writes F floats per row; backward reads dout and the saved input and writes dinput.

use crate::math::{gelu, gelu_grad, sigmoid};
use crate::simd::dispatched;
use ondol_core::Activation;
use rayon::prelude::*;

/// Elements per parallel task for flat pointwise loops.
const FLAT_CHUNK: usize = 1 << 14;

pub fn swiglu_forward(gate_up: &[f32], out: &mut [f32], width: usize) {
    assert_eq!(gate_up.len(), 2 * out.len());
    out.par_chunks_mut(width).zip(gate_up.par_chunks(2 * width)).for_each(|(o, gu)| swiglu_row(gu, o));
}

dispatched! {
    /// One row of [`swiglu_forward`].
    fn swiglu_row(gate_up: &[f32], out: &mut [f32]) -> () {
        let (g, u) = gate_up.split_at(out.len());
        out.iter_mut().zip(g).zip(u).for_each(|((o, g), u)| *o = g * sigmoid(*g) * u);
    }
}

/// With s = sigmoid(g): d/dg [g s u] = u s (1 + g (1 - s)), d/du = g s.
pub fn swiglu_backward(dout: &[f32], gate_up: &[f32], dgate_up: &mut [f32], width: usize) {
    assert!(gate_up.len() == 2 * dout.len() && dgate_up.len() == gate_up.len());
    dgate_up
        .par_chunks_mut(2 * width)
        .zip(gate_up.par_chunks(2 * width).zip(dout.par_chunks(width)))
        .for_each(|(dgu, (gu, dy))| swiglu_row_backward(dy, gu, dgu));
}

dispatched! {
    /// One row of [`swiglu_backward`].
    fn swiglu_row_backward(dout: &[f32], gate_up: &[f32], dgate_up: &mut [f32]) -> () {
        let (dg, du) = dgate_up.split_at_mut(dout.len());
        let (g, u) = gate_up.split_at(dout.len());
        for ((((dg, du), g), u), dy) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dout) {
            let s = sigmoid(*g);
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
            *du = dy * g * s;
        }
    }
}

#[inline(always)]
fn apply(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => gelu(x),
        Activation::Relu2 => x.max(0.0) * x.max(0.0),
    }
}

#[inline(always)]
fn derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => gelu_grad(x),
        Activation::Relu2 => 2.0 * x.max(0.0),
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
