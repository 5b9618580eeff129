//! [`Elems`]: the size of a set of buffers, counted before they exist, in the two element
//! types a backend allocates: its compute type (`Backend::zeros`: f32 on the CPU, bf16 on a
//! GPU training in mixed precision) and f32 (`Backend::zeros_f32`: statistics and states
//! kept exact).

use std::iter::Sum;
use std::ops::Add;

/// Elements of the compute type and of f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Elems {
    pub compute: u64,
    pub f32: u64,
}

impl Elems {
    /// `n` elements of the compute type.
    pub fn compute(n: usize) -> Self {
        Self { compute: n as u64, f32: 0 }
    }

    /// `n` f32 elements.
    pub fn f32(n: usize) -> Self {
        Self { compute: 0, f32: n as u64 }
    }

    /// Bytes, with `compute_bytes` bytes per element of the compute type.
    pub fn bytes(self, compute_bytes: usize) -> u64 {
        self.compute * compute_bytes as u64 + 4 * self.f32
    }

    /// `n` copies.
    pub fn times(self, n: u64) -> Self {
        Self { compute: self.compute * n, f32: self.f32 * n }
    }
}

impl Add for Elems {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self { compute: self.compute + other.compute, f32: self.f32 + other.f32 }
    }
}

impl Sum for Elems {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), Add::add)
    }
}
