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
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // exp(r) on |r| <= ln2/2, Taylor coefficients (minimax-close at this degree).
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // Scale by 2^n through the exponent bits; n is in [-126, 127] after the clamp.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
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

/// log(1 + e^x), linear above 20 as PyTorch's `F.softplus` (threshold 20) is; its derivative
/// is `sigmoid(x)`.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { exp(x).ln_1p() }
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
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.336_55));
        assert!(exp(-1000.0) < 1e-37);
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
