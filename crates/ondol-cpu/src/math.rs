//! Scalar math written so the compiler vectorises it (AVX2/FMA here): a branch-free `exp`
//! and the activation functions built on it. libm's `expf` is a call per element and does
//! not vectorise; softmax over a 2048 x 8192 logit matrix alone would spend ~100 ms in it.

/// e^x for f32, relative error below 2e-7 over the whole finite range; saturates to 0 below
/// -87.3 (to ~1e-38) and at e^88 above 88. Cody-Waite range reduction, degree-6 polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by adding and subtracting 1.5 * 2^23: plain float arithmetic that
    // vectorises on any x86-64, where `f32::round` is a libm call without SSE4.1.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // exp(r) on |r| <= ln2/2, Taylor coefficients (minimax-close at this degree).
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // Scale by 2^n through the exponent bits; n is in [-126, 127] after the clamp. The low
    // mantissa bits of `shifted` hold n already: integer arithmetic on them vectorises, where
    // `n as i32` (saturating) is a scalar conversion per lane.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// x * sigmoid(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// d silu(x) / dx = s (1 + x (1 - s)) with s = sigmoid(x).
#[inline(always)]
pub fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// ln(x) for finite x > 0 (normal), relative error below 2e-7: x = 2^k m with m in
/// [sqrt(1/2), sqrt(2)), then ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, as an odd
/// series to s^9. Branch-free (integer arithmetic on the bits), so loops of it vectorise.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    const SQRT_HALF_BITS: u32 = 0x3f35_04f3;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let shifted = x.to_bits().wrapping_sub(SQRT_HALF_BITS);
    let k = (shifted as i32 >> 23) as f32;
    let m = f32::from_bits((shifted & 0x007f_ffff) + SQRT_HALF_BITS);
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let series = 1.0 + z * (1.0 / 3.0 + z * (1.0 / 5.0 + z * (1.0 / 7.0 + z * (1.0 / 9.0))));
    k * LN2_HI + (2.0 * s * series + k * LN2_LO)
}

/// ln(1 + y) for y >= 0, accurate for small y too: u = 1 + y rounds, and the correction
/// (y - (u - 1)) / u restores what the rounding lost (exact for y below 2^-24, where u = 1).
#[inline(always)]
pub fn ln_1p(y: f32) -> f32 {
    let u = 1.0 + y;
    ln(u) + (y - (u - 1.0)) / u
}

/// log(1 + e^x), linear above 20 as PyTorch's `F.softplus` (threshold 20) is; its derivative
/// is `sigmoid(x)`.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { ln_1p(exp(x)) }
}

/// The dot product of `a` and `b` (of one length) in the fixed order of [`sum`].
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            lanes[j] += x[j] * y[j];
        }
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
}

/// The sum of `x` in a fixed order that vectorises: eight running lanes, then their tree.
/// (A plain sequential sum is one dependent add per element: LLVM may not reorder it.)
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v);
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
}

/// The largest element of `x` (-inf if empty), in eight lanes so it vectorises (the result
/// does not depend on the order).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, v)| *l = l.max(*v));
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// tanh through exp, stable for large |x|.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp(-2.0 * x.abs());
    let t = (1.0 - e) / (1.0 + e);
    t.copysign(x)
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_K: f32 = 0.044_715;

/// GELU, tanh approximation (GPT-2's `gelu_new`).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_C * (x + GELU_K * x * x * x)))
}

/// d gelu(x) / dx.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let u = GELU_C * (x + GELU_K * x * x * x);
    let t = tanh(u);
    let du = GELU_C * (1.0 + 3.0 * GELU_K * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = ondol_core::gradcheck::worst([worst, rel]);
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.336_55));
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn ln_and_softplus_match_libm() {
        let mut worst = 0.0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            let rel = ((ln(x) as f64 - (x as f64).ln()) / (x as f64).ln().abs().max(1.0)).abs();
            worst = ondol_core::gradcheck::worst([worst, rel]);
            x *= 1.000_37;
        }
        assert!(worst < 3e-7, "ln: worst error {worst}");
        let mut worst = 0.0f64;
        let mut x = -80.0f32;
        while x < 25.0 {
            let want = (x as f64).exp().ln_1p();
            worst = ondol_core::gradcheck::worst([worst, ((softplus(x) as f64 - want) / want).abs()]);
            x += 0.001_73;
        }
        assert!(worst < 6e-7, "softplus: worst relative error {worst}");
    }

    #[test]
    fn lane_sums_match_a_sequential_sum() {
        for n in [0, 1, 7, 8, 16, 23] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(&x) as f64 - want).abs() < 1e-6, "{n} values");
            let d: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            assert!((dot(&x, &x) as f64 - d).abs() < 1e-6, "dot of {n} values");
        }
    }

    #[test]
    fn activations_match_f64_definitions() {
        for i in -400..400 {
            let x = i as f32 * 0.025;
            let xd = x as f64;
            let t = (0.797_884_560_802_865_4 * (xd + 0.044_715 * xd.powi(3))).tanh();
            let g = 0.5 * xd * (1.0 + t);
            assert!((gelu(x) as f64 - g).abs() < 1e-6, "gelu({x})");
            assert!((tanh(x) as f64 - xd.tanh()).abs() < 1e-6, "tanh({x})");
            assert!((sigmoid(x) as f64 - 1.0 / (1.0 + (-xd).exp())).abs() < 1e-6);
            let h = 1e-3;
            let fd = (gelu(x + h) as f64 - gelu(x - h) as f64) / (2.0 * h as f64);
            assert!((gelu_grad(x) as f64 - fd).abs() < 2e-3, "gelu'({x})");
        }
    }
}
