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

/// The elements a `rows × cols` matrix with rows `row_stride` apart spans.
fn span(rows: usize, cols: usize, row_stride: usize) -> usize {
    if rows == 0 || cols == 0 { 0 } else { (rows - 1) * row_stride + cols }
}

impl<'a> Mat<'a> {
    /// The `rows × cols` matrix starting at `data[start]`, its rows `row_stride` apart (panics
    /// if it does not fit in `data`).
    pub fn new(data: &'a [f32], start: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(cols <= row_stride || rows <= 1, "Mat: rows of {cols} overlap at stride {row_stride}");
        Self { data: &data[start..start + span(rows, cols, row_stride)], rows, cols, rs: row_stride, cs: 1 }
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
        assert!(cols <= row_stride || rows <= 1, "MatMut: rows of {cols} overlap at stride {row_stride}");
        Self { data: &mut data[start..start + span(rows, cols, row_stride)], rows, cols, rs: row_stride }
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
