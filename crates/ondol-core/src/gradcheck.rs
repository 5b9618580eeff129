//! Central finite differences for testing backward passes.
//!
//! Backward ops are checked element by element: perturb one input by +-h, evaluate the
//! scalar loss (accumulated in f64 so the difference of two nearby values keeps its digits),
//! and compare (L(x+h) - L(x-h)) / 2h with the analytic gradient. f32 forward passes limit the
//! accuracy to roughly eps_f32 * |L| / h, which sets the tolerances callers pass.

use crate::Rng;

/// Result of one gradient check: the worst element and how far off it was.
#[derive(Debug)]
pub struct GradCheck {
    pub checked: usize,
    pub worst_index: usize,
    pub worst_error: f64,
    pub analytic: f64,
    pub numeric: f64,
}

/// Compares `analytic[i]` with the central difference of `loss` at `x[i]` for `samples`
/// indices drawn with `seed` (all indices if `samples >= x.len()`). The error of an element
/// is `|a - n| / (atol + rtol * max(|a|, |n|))`; the check passes when every error is <= 1.
#[allow(clippy::too_many_arguments)]
pub fn check(
    x: &mut [f32],
    analytic: &[f32],
    loss: impl FnMut(&[f32]) -> f64,
    h: f32,
    rtol: f64,
    atol: f64,
    samples: usize,
    seed: u64,
) -> GradCheck {
    let indices = sample_indices(0..x.len(), samples, seed);
    check_indices(x, analytic, loss, h, rtol, atol, &indices)
}

/// `n` indices drawn uniformly from `range` with `seed`, or all of them if `n >= range.len()`.
pub fn sample_indices(range: std::ops::Range<usize>, n: usize, seed: u64) -> Vec<usize> {
    if n >= range.len() {
        return range.collect();
    }
    let mut rng = Rng::new(seed);
    (0..n).map(|_| range.start + rng.below(range.len() as u64) as usize).collect()
}

/// [`check`] at the given indices.
pub fn check_indices(
    x: &mut [f32],
    analytic: &[f32],
    mut loss: impl FnMut(&[f32]) -> f64,
    h: f32,
    rtol: f64,
    atol: f64,
    indices: &[usize],
) -> GradCheck {
    assert_eq!(x.len(), analytic.len());
    let mut out = GradCheck { checked: 0, worst_index: 0, worst_error: 0.0, analytic: 0.0, numeric: 0.0 };
    for &i in indices {
        let orig = x[i];
        x[i] = orig + h;
        let plus = loss(x);
        x[i] = orig - h;
        let minus = loss(x);
        x[i] = orig;
        // The step actually taken, after f32 rounding of orig +- h.
        let step = (orig + h) as f64 - (orig - h) as f64;
        let numeric = (plus - minus) / step;
        let a = analytic[i] as f64;
        let err = (a - numeric).abs() / (atol + rtol * a.abs().max(numeric.abs()));
        out.checked += 1;
        // A NaN error is the worst there is (and stays so): `err > worst` alone skips it.
        if !out.worst_error.is_nan() && (err.is_nan() || err > out.worst_error) {
            out = GradCheck { checked: out.checked, worst_index: i, worst_error: err, analytic: a, numeric };
        }
    }
    out
}

impl GradCheck {
    /// Panics with a readable report if any element was out of tolerance.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.worst_error <= 1.0,
            "{what}: gradient mismatch at index {}: analytic {:.6e}, numeric {:.6e} ({} elements checked)",
            self.worst_index,
            self.analytic,
            self.numeric,
            self.checked
        );
    }
}

/// `n` normal samples scaled by `std`, for test inputs.
pub fn randn(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| (rng.normal() * std as f64) as f32).collect()
}

/// `sum_i w_i * y_i` in f64: the scalar loss whose gradient with respect to y is w.
pub fn dot(w: &[f32], y: &[f32]) -> f64 {
    w.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// The largest of `errors`, NaN if any is NaN: folding with `f64::max` skips a NaN, and a
/// check `worst <= tol` then passes on garbage.
pub fn worst(errors: impl IntoIterator<Item = f64>) -> f64 {
    errors.into_iter().fold(0.0, |m, e| if m.is_nan() || e.is_nan() { f64::NAN } else { m.max(e) })
}

/// The largest `|a_i - b_i|`, NaN if any difference is NaN (see [`worst`]).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: lengths");
    worst(a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_is_the_worst_error() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert!(max_abs_diff(&[1.0, f32::NAN, 3.0], &[1.0, 2.0, 9.0]).is_nan());
        assert!(worst([0.5, f64::NAN, 2.0]).is_nan());
        let mut x = vec![1.0f32];
        let nan_grad = check_indices(&mut x, &[f32::NAN], |x| x[0] as f64, 1e-3, 1e-3, 1e-6, &[0]);
        assert!(nan_grad.worst_error.is_nan(), "a NaN gradient fails the check");
    }
}
