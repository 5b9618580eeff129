//! GEMM on the CPU through the `gemm` crate (runtime-dispatched AVX2/FMA/AVX-512 kernels),
//! with strides doing the transposes, so no operand is ever copied.

use gemm::Parallelism;
use ondol_core::backend::Gemm;

/// Row-major strides `(row, col)` of `op(X)` where X is stored `[rows, cols]` and
/// `op(X)` is X or its transpose.
fn strides(trans: bool, stored_cols: usize) -> (isize, isize) {
    if trans { (1, stored_cols as isize) } else { (stored_cols as isize, 1) }
}

/// `C = alpha op(A) op(B) + beta C` for each batch entry. Large problems use every rayon
/// thread; `single_thread` is for callers that already parallelise over many small GEMMs.
pub fn gemm(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32], single_thread: bool) {
    let (a_rows, a_cols) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
    let (b_rows, b_cols) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
    let need = |stride: usize, len: usize| (g.batch - 1) * stride + len;
    assert!(a.len() >= need(g.stride_a, a_rows * a_cols), "gemm: A too short for {g:?}");
    assert!(b.len() >= need(g.stride_b, b_rows * b_cols), "gemm: B too short for {g:?}");
    assert!(c.len() >= need(g.stride_c, g.m * g.n), "gemm: C too short for {g:?}");
    let (a_rs, a_cs) = strides(g.trans_a, a_cols);
    let (b_rs, b_cs) = strides(g.trans_b, b_cols);
    let parallelism = if single_thread { Parallelism::None } else { Parallelism::Rayon(0) };
    for i in 0..g.batch {
        // SAFETY: the asserts above bound every element each batch entry touches.
        unsafe {
            raw_gemm(
                g,
                c.as_mut_ptr().add(i * g.stride_c),
                g.n as isize,
                a.as_ptr().add(i * g.stride_a),
                (a_rs, a_cs),
                b.as_ptr().add(i * g.stride_b),
                (b_rs, b_cs),
                parallelism,
            );
        }
    }
}

/// One GEMM on raw strided operands: C (`[m, n]`, row stride `c_rs`, unit column stride).
/// The strides of A and B are those of op(A) and op(B) (`(row, column)`), so they alone
/// express any transpose: `g.trans_a` and `g.trans_b` are not read here.
///
/// # Safety
/// Every element addressed by the shapes and strides must be valid, and C must not alias
/// A or B or be written concurrently by anyone else.
#[allow(clippy::too_many_arguments)]
pub unsafe fn raw_gemm(
    g: Gemm,
    c: *mut f32,
    c_rs: isize,
    a: *const f32,
    (a_rs, a_cs): (isize, isize),
    b: *const f32,
    (b_rs, b_cs): (isize, isize),
    parallelism: Parallelism,
) {
    // The gemm crate computes dst = alpha * dst + beta * lhs * rhs: its names are swapped.
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            g.m,
            g.n,
            g.k,
            c,
            1,
            c_rs,
            g.beta != 0.0,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            g.beta,
            g.alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A row-major matrix inside a slice, or the transpose of one: element (r, c) at
/// `data[r * rs + c * cs]`. The operand of [`matmul`]; it borrows, so it never copies.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// The elements a `rows × cols` matrix with rows `row_stride` apart spans from `start`, as the
/// range of the slice it lies in (panics on overflow, or on strides the GEMM's `isize` cannot
/// hold).
fn span(start: usize, rows: usize, cols: usize, row_stride: usize) -> std::ops::Range<usize> {
    assert!(cols <= row_stride || rows <= 1, "a matrix's rows of {cols} overlap at stride {row_stride}");
    assert!(isize::try_from(row_stride).is_ok(), "row stride {row_stride} exceeds isize");
    let len = match rows == 0 || cols == 0 {
        true => Some(0),
        false => (rows - 1).checked_mul(row_stride).and_then(|v| v.checked_add(cols)),
    };
    let end = len.and_then(|len| start.checked_add(len)).expect("a matrix's span overflows usize");
    start..end
}

impl<'a> Mat<'a> {
    /// The `rows × cols` matrix starting at `data[start]`, its rows `row_stride` apart (panics
    /// if it does not fit in `data`).
    pub fn new(data: &'a [f32], start: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data: &data[span(start, rows, cols, row_stride)], rows, cols, rs: row_stride, cs: 1 }
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }
}

/// The destination of [`matmul`]: a row-major matrix inside a mutable slice.
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// As [`Mat::new`], writable.
    pub fn new(data: &'a mut [f32], start: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data: &mut data[span(start, rows, cols, row_stride)], rows, cols, rs: row_stride }
    }
}

/// `C = alpha A B + beta C` on the calling thread, for loops that run many small products in
/// parallel (the SSD's chunks). `beta == 0` never reads C.
pub fn matmul(c: MatMut, a: Mat, b: Mat, alpha: f32, beta: f32) {
    assert!(
        a.rows == c.rows && b.cols == c.cols && a.cols == b.rows,
        "matmul: [{}, {}] x [{}, {}] into [{}, {}]",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    let g = Gemm { alpha, beta, ..Gemm::new(c.rows, c.cols, a.cols, false, false) };
    // SAFETY: every view was bounds-checked against its slice when it was made, and C is a
    // unique borrow, so it aliases neither operand.
    unsafe {
        raw_gemm(
            g,
            c.data.as_mut_ptr(),
            c.rs as isize,
            a.data.as_ptr(),
            (a.rs as isize, a.cs as isize),
            b.data.as_ptr(),
            (b.rs as isize, b.cs as isize),
            Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `C = alpha A B + beta C` in f64 by the definition, on views given as (rows, cols, element).
    fn reference(
        a: &dyn Fn(usize, usize) -> f32,
        b: &dyn Fn(usize, usize) -> f32,
        (m, k, n): (usize, usize, usize),
    ) -> Vec<f64> {
        (0..m * n).map(|i| (0..k).map(|l| a(i / n, l) as f64 * b(l, i % n) as f64).sum()).collect()
    }

    #[test]
    fn strided_and_transposed_views_multiply_by_the_definition() {
        let data: Vec<f32> = (0..400).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        // (m, k, n) with empty and single dimensions; A and B read at an offset with a row
        // stride wider than their rows, straight or transposed.
        for (m, k, n) in [(5, 7, 3), (1, 4, 6), (6, 1, 2), (3, 0, 4), (0, 3, 2), (4, 5, 0)] {
            for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
                let stride = 9;
                let a = if trans_a { Mat::new(&data, 3, k, m, stride).t() } else { Mat::new(&data, 3, m, k, stride) };
                let b =
                    if trans_b { Mat::new(&data, 101, n, k, stride).t() } else { Mat::new(&data, 101, k, n, stride) };
                let at = |r: usize, c: usize| if trans_a { data[3 + c * stride + r] } else { data[3 + r * stride + c] };
                let bt =
                    |r: usize, c: usize| if trans_b { data[101 + c * stride + r] } else { data[101 + r * stride + c] };
                let want = reference(&at, &bt, (m, k, n));
                let mut c = vec![0.5f32; 2 + m * 11];
                matmul(MatMut::new(&mut c, 2, m, n, 11), a, b, 2.0, -1.0);
                for i in 0..m * n {
                    let got = c[2 + (i / n) * 11 + i % n] as f64;
                    let expect = 2.0 * want[i] - 0.5;
                    assert!(
                        (got - expect).abs() <= 1e-5 * (1.0 + expect.abs()),
                        "{m}x{k}x{n} {trans_a} {trans_b}: {got} vs {expect}"
                    );
                }
                // Outside the destination's rows and columns nothing changed.
                let inside = |j: usize| j >= 2 && (j - 2) / 11 < m && (j - 2) % 11 < n;
                assert!((0..c.len()).filter(|&j| !inside(j)).all(|j| c[j] == 0.5), "{m}x{k}x{n}: wrote outside C");
            }
        }
    }

    #[test]
    #[should_panic(expected = "range end index")]
    fn a_view_past_its_slice_panics() {
        let data = [0.0f32; 10];
        let _ = Mat::new(&data, 2, 3, 3, 3);
    }
}
