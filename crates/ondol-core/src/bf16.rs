//! bfloat16 as its raw 16 bits: the storage type of mixed-precision buffers and of Hugging
//! Face checkpoints. The rounding is the CUDA kernels' `from_float<bf16>` (kernels/common.cuh),
//! so host and device conversions give the same bits.

/// f32 to bf16 bits, rounding to nearest even; a NaN stays a (quiet) NaN.
pub fn from_f32(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// bf16 bits to f32 (exact).
pub fn to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even_and_keeps_nan() {
        assert_eq!(from_f32(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(from_f32(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties go to even (1 + 2^-6).
        assert_eq!(from_f32(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(to_f32(from_f32(-2.5)), -2.5);
        assert!(to_f32(from_f32(f32::NAN)).is_nan());
        assert_eq!(to_f32(from_f32(f32::INFINITY)), f32::INFINITY);
    }
}
