//! RMSNorm and LayerNorm, one row per token.
//!
//! Forward saves per-row statistics (rstd, and mean for LayerNorm) so backward never
//! recomputes a reduction. Backward accumulates into `dx` because a norm's input is the
//! residual stream, whose gradient already holds the skip path's contribution; weight and
//! bias gradients accumulate as every parameter gradient does. Per row: forward reads x once
//! and writes out once (2 * dim * 4 bytes); backward reads dout and x and updates dx.

use crate::math::{dot, sigmoid, silu};
use crate::reduce::column_sums;
use crate::simd::dispatched;
use ondol_core::backend::AttnShape;
use rayon::prelude::*;

pub fn rmsnorm_forward(x: &[f32], w: &[f32], out: &mut [f32], rstd: &mut [f32], dim: usize, eps: f32) {
    assert_eq!(w.len(), dim);
    assert!(x.len() == out.len() && x.len() == rstd.len() * dim);
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(rstd.par_iter_mut()).for_each(|((o, x), r)| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        *r = 1.0 / (ms + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
            *o = x * *r * w;
        }
    });
}

/// y = x * r * w with r = (mean(x^2) + eps)^(-1/2):
/// dx = r * (w dy) - r^3 / dim * x * sum(w dy x);  dw += dy * x * r.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(dout: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32], dw: &mut [f32], dim: usize) {
    assert!(dout.len() == x.len() && dx.len() == x.len() && x.len() == rstd.len() * dim);
    dx.par_chunks_mut(dim).zip(dout.par_chunks(dim).zip(x.par_chunks(dim))).zip(rstd.par_iter()).for_each(
        |((dx, (dy, x)), &r)| {
            let dot: f32 = dy.iter().zip(w).zip(x).map(|((dy, w), x)| dy * w * x).sum();
            let c = r * r * r * dot / dim as f32;
            for (((dx, dy), w), x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx += r * w * dy - c * x;
            }
        },
    );
    column_sums(rstd.len(), dw, |rows, part| {
        for row in rows {
            let r = rstd[row];
            let (dy, x) = (&dout[row * dim..][..dim], &x[row * dim..][..dim]);
            for ((p, dy), x) in part.iter_mut().zip(dy).zip(x) {
                *p += dy * x * r;
            }
        }
    });
}

/// Qwen3's q_norm and k_norm: RMSNorm of each of the first H + Hkv heads of every fused qkv
/// row, q's heads with `w[..D]` and k's with `w[D..]`; v's heads are copied.
pub fn qk_norm_forward(qkv: &[f32], w: &[f32], out: &mut [f32], rstd: &mut [f32], s: AttnShape, eps: f32) {
    let (d, width, normed) = (s.head_dim, s.qkv_width(), s.n_heads + s.n_kv_heads);
    assert!(w.len() == 2 * d && qkv.len() == s.rows() * width && out.len() == qkv.len());
    assert_eq!(rstd.len(), s.rows() * normed);
    out.par_chunks_mut(width).zip(qkv.par_chunks(width)).zip(rstd.par_chunks_mut(normed)).for_each(|((o, x), r)| {
        let (heads, v) = o.split_at_mut(normed * d);
        v.copy_from_slice(&x[normed * d..]);
        for (h, ((o, x), r)) in heads.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(r).enumerate() {
            let w = head_weight(w, h, s);
            *r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * *r * w;
            }
        }
    });
}

/// In place: `dqkv` holds d(out) and becomes d(qkv); per head, as [`rmsnorm_backward`] with
/// dx written rather than accumulated, and dw summed into q's or k's half of `dw`.
pub fn qk_norm_backward(dqkv: &mut [f32], qkv: &[f32], w: &[f32], rstd: &[f32], dw: &mut [f32], s: AttnShape) {
    let (d, width, normed) = (s.head_dim, s.qkv_width(), s.n_heads + s.n_kv_heads);
    assert!(w.len() == 2 * d && dw.len() == 2 * d && qkv.len() == s.rows() * width && dqkv.len() == qkv.len());
    assert_eq!(rstd.len(), s.rows() * normed);
    // dw first, from d(out), which the second pass overwrites.
    column_sums(s.rows(), dw, |rows, part| {
        for row in rows {
            let (dy, x) = (&dqkv[row * width..][..normed * d], &qkv[row * width..][..normed * d]);
            for (h, (dy, x)) in dy.chunks_exact(d).zip(x.chunks_exact(d)).enumerate() {
                let r = rstd[row * normed + h];
                let part = if h < s.n_heads { &mut part[..d] } else { &mut part[d..] };
                for ((p, dy), x) in part.iter_mut().zip(dy).zip(x) {
                    *p += dy * x * r;
                }
            }
        }
    });
    dqkv.par_chunks_mut(width).zip(qkv.par_chunks(width)).zip(rstd.par_chunks(normed)).for_each(|((dx, x), r)| {
        for (h, ((dx, x), &r)) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(r).enumerate() {
            let w = head_weight(w, h, s);
            let dot: f32 = dx.iter().zip(w).zip(x).map(|((dy, w), x)| dy * w * x).sum();
            let c = r * r * r * dot / d as f32;
            for ((dx, w), x) in dx.iter_mut().zip(w).zip(x) {
                *dx = r * w * *dx - c * x;
            }
        }
    });
}

/// The norm weight of head `h` of a qkv row: q's for the first H heads, k's after.
fn head_weight(w: &[f32], h: usize, s: AttnShape) -> &[f32] {
    let d = s.head_dim;
    if h < s.n_heads { &w[..d] } else { &w[d..] }
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    dim: usize,
    eps: f32,
) {
    assert!(w.len() == dim && b.len() == dim);
    assert!(x.len() == out.len() && x.len() == rstd.len() * dim && mean.len() == rstd.len());
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
        |((o, x), (m, r))| {
            let mu = x.iter().sum::<f32>() / dim as f32;
            let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / dim as f32;
            *m = mu;
            *r = 1.0 / (var + eps).sqrt();
            for (((o, x), w), b) in o.iter_mut().zip(x).zip(w).zip(b) {
                *o = (x - mu) * *r * w + b;
            }
        },
    );
}

/// With xhat = (x - mean) * r and g = w dy:
/// dx = r * (g - mean(g) - xhat * mean(g xhat));  dw += dy xhat;  db += dy.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dim: usize,
) {
    assert!(dout.len() == x.len() && dx.len() == x.len() && x.len() == rstd.len() * dim);
    dx.par_chunks_mut(dim)
        .zip(dout.par_chunks(dim).zip(x.par_chunks(dim)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|((dx, (dy, x)), (&mu, &r))| {
            let (mut g_mean, mut gx_mean) = (0.0f32, 0.0f32);
            for ((dy, w), x) in dy.iter().zip(w).zip(x) {
                let g = dy * w;
                g_mean += g;
                gx_mean += g * (x - mu) * r;
            }
            g_mean /= dim as f32;
            gx_mean /= dim as f32;
            for (((dx, dy), w), x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx += r * (dy * w - g_mean - (x - mu) * r * gx_mean);
            }
        });
    // dw and db in one pass over the rows: partials hold [dw | db].
    let mut both = vec![0.0f32; 2 * dim];
    column_sums(rstd.len(), &mut both, |rows, part| {
        let (pw, pb) = part.split_at_mut(dim);
        for row in rows {
            let (mu, r) = (mean[row], rstd[row]);
            let (dy, x) = (&dout[row * dim..][..dim], &x[row * dim..][..dim]);
            for (((pw, pb), dy), x) in pw.iter_mut().zip(pb.iter_mut()).zip(dy).zip(x) {
                *pw += dy * (x - mu) * r;
                *pb += dy;
            }
        }
    });
    for (d, s) in dw.iter_mut().zip(&both[..dim]) {
        *d += s;
    }
    for (d, s) in db.iter_mut().zip(&both[dim..]) {
        *d += s;
    }
}

/// Mamba-2's gated RMSNorm over groups of `group` values: g = x silu(z), out = g r w with
/// r = (mean_group(g^2) + eps)^(-1/2) saved per group.
#[allow(clippy::too_many_arguments)]
pub fn gated_rmsnorm_forward(
    x: &[f32],
    z: &[f32],
    w: &[f32],
    out: &mut [f32],
    rstd: &mut [f32],
    group: usize,
    eps: f32,
) {
    let width = w.len();
    assert!(x.len() == out.len() && x.len() == z.len() && x.len() == rstd.len() * group && width.is_multiple_of(group));
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width).zip(z.par_chunks(width)))
        .zip(rstd.par_chunks_mut(width / group))
        .for_each(|((o, (x, z)), r)| gated_rmsnorm_row(x, z, w, o, r, group, eps));
}

dispatched! {
    /// One row of [`gated_rmsnorm_forward`]: g into `o`, then each group scaled in place.
    fn gated_rmsnorm_row(x: &[f32], z: &[f32], w: &[f32], o: &mut [f32], rstd: &mut [f32], group: usize, eps: f32) -> () {
        o.iter_mut().zip(x).zip(z).for_each(|((o, x), z)| *o = x * silu(*z));
        for ((o, w), r) in o.chunks_exact_mut(group).zip(w.chunks_exact(group)).zip(rstd) {
            *r = 1.0 / (dot(o, o) / group as f32 + eps).sqrt();
            o.iter_mut().zip(w).for_each(|(o, w)| *o *= *r * w);
        }
    }
}

/// Backward of [`gated_rmsnorm_forward`]: the RMSNorm backward at g (see
/// [`rmsnorm_backward`]), then dx = dg silu(z), dz = dg x silu'(z). Writes dx and dz,
/// accumulates dw.
#[allow(clippy::too_many_arguments)]
pub fn gated_rmsnorm_backward(
    dout: &[f32],
    x: &[f32],
    z: &[f32],
    w: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dz: &mut [f32],
    dw: &mut [f32],
    group: usize,
) {
    let width = w.len();
    let per_row = width / group;
    assert!(dout.len() == x.len() && dx.len() == x.len() && dz.len() == x.len() && x.len() == rstd.len() * group);
    dx.par_chunks_mut(width)
        .zip(dz.par_chunks_mut(width))
        .zip(dout.par_chunks(width).zip(x.par_chunks(width).zip(z.par_chunks(width))))
        .zip(rstd.par_chunks(per_row))
        .for_each_init(
            || vec![0.0f32; width],
            |gw, (((dx, dz), (dy, (x, z))), r)| gated_rmsnorm_row_backward(dy, x, z, w, r, dx, dz, gw, group),
        );
    column_sums(rstd.len() / per_row, dw, |rows, part| {
        for row in rows {
            let at = row * width..(row + 1) * width;
            let r = &rstd[row * per_row..(row + 1) * per_row];
            gated_rmsnorm_row_dw(&dout[at.clone()], &x[at.clone()], &z[at], r, part, group);
        }
    });
}

dispatched! {
    #[allow(clippy::too_many_arguments)]
    /// One row of [`gated_rmsnorm_backward`]'s dx and dz; `gw` is scratch of the row's width.
    /// sigmoid(z) and g are computed once, into dz and dx, and read back.
    fn gated_rmsnorm_row_backward(
        dy: &[f32],
        x: &[f32],
        z: &[f32],
        w: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        dz: &mut [f32],
        gw: &mut [f32],
        group: usize,
    ) -> () {
        for ((((s, g), gw), (x, z)), w) in dz.iter_mut().zip(dx.iter_mut()).zip(gw.iter_mut()).zip(x.iter().zip(z)).zip(w) {
            *s = sigmoid(*z);
            *g = x * (z * *s); // x silu(z), as the forward rounds it
            *gw = *g * w;
        }
        let groups = dx.chunks_exact_mut(group).zip(dz.chunks_exact_mut(group));
        for (k, ((dx, dz), &r)) in groups.zip(rstd).enumerate() {
            let cols = k * group..(k + 1) * group;
            let (dy, x, z, w) = (&dy[cols.clone()], &x[cols.clone()], &z[cols.clone()], &w[cols.clone()]);
            let c = r * r * r * dot(dy, &gw[cols]) / group as f32;
            for (((dx, dz), (dy, w)), (x, z)) in dx.iter_mut().zip(dz.iter_mut()).zip(dy.iter().zip(w)).zip(x.iter().zip(z)) {
                let (g, s) = (*dx, *dz);
                let dg = r * w * dy - c * g;
                *dx = dg * z * s;
                *dz = dg * x * s * (1.0 + z * (1.0 - s));
            }
        }
    }
}

dispatched! {
    /// One row's term of the weight gradient, dw += dy g r.
    fn gated_rmsnorm_row_dw(dy: &[f32], x: &[f32], z: &[f32], rstd: &[f32], part: &mut [f32], group: usize) -> () {
        for (k, (part, &r)) in part.chunks_exact_mut(group).zip(rstd).enumerate() {
            let cols = k * group..(k + 1) * group;
            let terms = dy[cols.clone()].iter().zip(&x[cols.clone()]).zip(&z[cols]);
            part.iter_mut().zip(terms).for_each(|(p, ((dy, x), z))| *p += dy * x * silu(*z) * r);
        }
    }
}
