//! AdamW over a flat buffer (Loshchilov & Hutter: decay decoupled from the gradient).
//! Per element: read p, g, m, v; write p, m, v: 28 bytes of traffic, ~15 FLOPs.

use ondol_core::AdamWParams;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWParams) {
    assert!(p.len() == g.len() && p.len() == m.len() && p.len() == v.len());
    let step = hp.step.max(1) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(step);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(step);
    let step_size = (hp.lr as f64 / bc1) as f32;
    let inv_bc2_sqrt = (1.0 / bc2.sqrt()) as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * hp.grad_scale;
                *m = hp.beta1 * *m + (1.0 - hp.beta1) * g;
                *v = hp.beta2 * *v + (1.0 - hp.beta2) * g * g;
                let denom = v.sqrt() * inv_bc2_sqrt + hp.eps;
                *p = *p * decay - step_size * *m / denom;
            }
        });
}
