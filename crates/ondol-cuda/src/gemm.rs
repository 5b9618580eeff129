//! GEMMs through cuBLASLt: bf16 (or f32) inputs, fp32 accumulation, an f32 or bf16 output,
//! and the epilogues that save a pass over the output: a linear layer's bias, GELU after it
//! (keeping its input for backward), and GELU's backward on the gradient GEMM (applied before
//! the output is rounded; see [`Epilogue`]).
//!
//! ondol's matrices are row-major; cuBLASLt's are column-major. A row-major `[r, c]` buffer is
//! the column-major `[c, r]` matrix, its transpose, so `C = op(A) op(B)` is computed as
//! `C^T = op(B)^T op(A)^T`: cuBLASLt's first operand is our B, its second our A, and no
//! data moves. One plan (descriptors, layouts and the heuristic's algorithm) is built per
//! shape, type and pointer alignment, and reused for the rest of the run.

use crate::device::{Epilogue, check_gemm_operands};
use crate::memory::{DevMut, DevRef, Dtype};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream};
use ondol_core::backend::Gemm;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// cuBLAS's recommended workspace for Hopper (32 MiB covers Ampere too).
const WORKSPACE_BYTES: usize = 32 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    batch: usize,
    strides: [usize; 3],
    inputs: Dtype,
    output: Dtype,
    /// Alignment in bytes (up to 256) of A, B and C (of every batch's), the epilogue's matrix
    /// (GELU's input) and its bias (256 for none): algorithms that need more are excluded.
    align: [u32; 5],
    epilogue: sys::cublasLtEpilogue_t,
}

/// The cuBLASLt objects of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// Layouts of cuBLASLt's first operand (our B), second operand (our A) and C.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made in `Blas::plan` (null where it failed before making one), destroyed
        // once here. Errors on teardown are ignored.
        unsafe {
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = result::destroy_matrix_layout(l);
            }
        }
    }
}

pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    /// None where cuBLASLt has no algorithm for an epilogue of the shape.
    plans: Mutex<HashMap<PlanKey, Option<Plan>>>,
}

// SAFETY: a cuBLASLt handle may be used from any thread; the backend issues every call on
// its one stream, and the plan cache is behind a mutex.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.lock().expect("plan cache").clear();
        // SAFETY: created in `Blas::new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

fn cuda_type(d: Dtype) -> sys::cudaDataType {
    match d {
        Dtype::F32 => sys::cudaDataType::CUDA_R_32F,
        Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

/// The largest power of two (up to 256) that divides the address.
fn alignment(ptr: u64) -> u32 {
    1u32 << ptr.trailing_zeros().min(8)
}

/// The alignment every batch's matrix has: of the first, and of the stride between them.
fn batch_alignment(ptr: u64, stride: usize, dtype: Dtype, batch: usize) -> u32 {
    let step = if batch > 1 { (stride * dtype.bytes()) as u64 } else { 0 };
    alignment(ptr | step)
}

/// cuBLASLt's epilogue, and the device pointers it reads or writes: the bias and GELU's input.
fn lt_epilogue(e: &Epilogue) -> (sys::cublasLtEpilogue_t, Option<u64>, Option<u64>) {
    use sys::cublasLtEpilogue_t as E;
    match e {
        Epilogue::None => (E::CUBLASLT_EPILOGUE_DEFAULT, None, None),
        Epilogue::Bias(bias) => (E::CUBLASLT_EPILOGUE_BIAS, Some(bias.ptr), None),
        Epilogue::Gelu { bias: None, pre } => (E::CUBLASLT_EPILOGUE_GELU_AUX, None, Some(pre.ptr)),
        Epilogue::Gelu { bias: Some(bias), pre } => (E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS, Some(bias.ptr), Some(pre.ptr)),
        Epilogue::GeluBackward { pre } => (E::CUBLASLT_EPILOGUE_DGELU, None, Some(pre.ptr)),
    }
}

/// Sets a matmul descriptor attribute to `value`.
///
/// # Safety
/// `T` must be the type cuBLASLt documents for `attr`.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), result::CublasError> {
    // SAFETY: forwarded from the caller; the value is passed with its size.
    unsafe { result::set_matmul_desc_attribute(desc, attr, value as *const T as *const c_void, size_of::<T>()) }
}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self, String> {
        let handle = result::create_handle().map_err(|e| format!("cuBLASLt: {e:?}"))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| e.to_string())?;
        let workspace_ptr = cudarc::driver::DevicePtr::device_ptr(&workspace, stream).0;
        Ok(Self { handle, workspace, workspace_ptr, plans: Mutex::new(HashMap::new()) })
    }

    /// `c = alpha op(a) op(b) + beta c` (see [`Gemm`]) with `epilogue` (its bias on cuBLASLt's
    /// rows, which are our columns). Inputs f32 with an f32 output, or bf16 with a bf16 or
    /// f32 output (weight gradients accumulate in f32); the epilogue's vectors and matrix have
    /// the output's type. Returns false, running nothing, where cuBLASLt has no algorithm for
    /// this shape with this epilogue (the caller then adds the epilogue as a pass of its own,
    /// or runs a plain GEMM on gemm.cu's kernel).
    pub(crate) fn gemm(
        &self,
        stream: &CudaStream,
        g: Gemm,
        a: DevRef,
        b: DevRef,
        epilogue: Epilogue,
        c: DevMut,
    ) -> bool {
        check_gemm_operands(&g, &a, &b, &c);
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return true;
        }
        check_epilogue(&epilogue, g, &c);
        let (lt, bias, aux) = lt_epilogue(&epilogue);
        let key = PlanKey {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            batch: g.batch,
            strides: [g.stride_a, g.stride_b, g.stride_c],
            inputs: a.dtype,
            output: c.dtype,
            align: [
                batch_alignment(a.ptr, g.stride_a, a.dtype, g.batch),
                batch_alignment(b.ptr, g.stride_b, b.dtype, g.batch),
                batch_alignment(c.ptr, g.stride_c, c.dtype, g.batch),
                aux.map_or(256, alignment),
                bias.map_or(256, alignment),
            ],
            epilogue: lt,
        };
        let mut plans = self.plans.lock().expect("plan cache");
        let plan = plans.entry(key).or_insert_with(|| match self.plan(key, bias, aux) {
            Ok(plan) => Some(plan),
            Err(e) => {
                let instead = if lt == sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT {
                    "a CUDA-core kernel (kernels/gemm.cu) runs it"
                } else {
                    "the epilogue takes a pass of its own"
                };
                ondol_core::say!("ondol: cuBLASLt has no algorithm for {key:?} ({e}); {instead}");
                None
            }
        });
        let Some(found) = plan.as_ref() else { return false };
        // SAFETY: the attributes take device pointers; the plan's descriptor is used by this
        // call only (the cache's lock is held). The plan matches these buffers' shapes and
        // types (the key), the views are in bounds (checked above), and the workspace is ours
        // for the call's duration on this stream.
        let ran = unsafe {
            use sys::cublasLtMatmulDescAttributes_t as A;
            bias.map_or(Ok(()), |p| set_desc(found.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p))
                .and_then(|_| {
                    aux.map_or(Ok(()), |p| set_desc(found.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p))
                })
                .and_then(|_| {
                    result::matmul(
                        self.handle,
                        found.desc,
                        (&g.alpha) as *const f32 as *const c_void,
                        (&g.beta) as *const f32 as *const c_void,
                        b.ptr as *const c_void,
                        found.layouts[0],
                        a.ptr as *const c_void,
                        found.layouts[1],
                        c.ptr as *const c_void,
                        found.layouts[2],
                        c.ptr as *mut c_void,
                        found.layouts[2],
                        &found.algo,
                        self.workspace_ptr as *mut c_void,
                        WORKSPACE_BYTES,
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                })
        };
        // cuBLASLt checks a call's arguments before it launches anything, so a refusal (an
        // algorithm the heuristic offered that then turns these pointers down) ran nothing:
        // the plan is dropped and the caller's fallback runs, now and for later calls.
        if let Err(e) = ran {
            ondol_core::say!("ondol: cuBLASLt refused its own plan for {key:?} ({e:?}); the fallback runs it instead");
            *plan = None;
            return false;
        }
        true
    }

    /// The plan of `k`, its heuristic asked with the epilogue's pointers of the first call (it
    /// reads their alignment; later calls of the key have the same).
    fn plan(&self, k: PlanKey, bias: Option<u64>, aux: Option<u64>) -> Result<Plan, String> {
        let fail = |e: result::CublasError| format!("{e:?}");
        let input = cuda_type(k.inputs);
        // (rows, cols, leading dimension) of each column-major operand, and its batch stride.
        let first = if k.trans_b { (k.k, k.n, k.k) } else { (k.n, k.k, k.n) };
        let second = if k.trans_a { (k.m, k.k, k.m) } else { (k.k, k.m, k.k) };
        let out = (k.n, k.m, k.n);
        let specs =
            [(first, input, k.strides[1]), (second, input, k.strides[0]), (out, cuda_type(k.output), k.strides[2])];
        // Filled in as the objects are made, so that a failure frees what was made before it.
        // SAFETY: an all-zero algorithm is only a placeholder until the heuristic's is set.
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            layouts: [std::ptr::null_mut(); 3],
            algo: unsafe { std::mem::zeroed() },
        };
        for (slot, ((rows, cols, ld), ty, stride)) in plan.layouts.iter_mut().zip(specs) {
            let layout = result::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64).map_err(fail)?;
            *slot = layout;
            if k.batch > 1 {
                let (count, offset) = (k.batch as i32, stride as i64);
                // SAFETY: the attributes take an i32 and an i64, passed with their sizes.
                unsafe {
                    result::set_matrix_layout_attribute(
                        layout,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count) as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(fail)?;
                    result::set_matrix_layout_attribute(
                        layout,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&offset) as *const i64 as *const c_void,
                        8,
                    )
                    .map_err(fail)?;
                }
            }
        }
        let desc =
            result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                .map_err(fail)?;
        plan.desc = desc;
        let ops = [k.trans_b as i32, k.trans_a as i32];
        let pref = result::create_matmul_pref().map_err(fail)?;
        // SAFETY: every attribute gets a value of the type and size cuBLASLt documents; the
        // descriptors and layouts were created above and live in `plan`.
        let heuristic = || unsafe {
            for (attr, op) in [
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            ]
            .into_iter()
            .zip(&ops)
            {
                result::set_matmul_desc_attribute(desc, attr, op as *const i32 as *const c_void, 4).map_err(fail)?;
            }
            use sys::cublasLtMatmulDescAttributes_t as A;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &k.epilogue).map_err(fail)?;
            if let Some(bias) = bias {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias).map_err(fail)?;
            }
            if let Some(aux) = aux {
                // GELU's input has the output's layout: column-major [n, m], leading dimension n.
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux).map_err(fail)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(k.n as i64)).map_err(fail)?;
            }
            let workspace = WORKSPACE_BYTES as u64;
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace) as *const u64 as *const c_void,
                8,
            )
            .map_err(fail)?;
            // cuBLASLt's first operand is our B, its second our A; C and D are one buffer.
            let [a, b, c, ..] = k.align;
            for (attr, bytes) in [
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, b),
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, a),
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c),
                (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c),
            ] {
                result::set_matmul_pref_attribute(pref, attr, (&bytes) as *const u32 as *const c_void, 4)
                    .map_err(fail)?;
            }
            result::get_matmul_algo_heuristic(
                self.handle,
                desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                pref,
            )
            .map_err(fail)
        };
        let found = heuristic();
        // SAFETY: made above, destroyed once, whatever the heuristic said.
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        plan.algo = found?.algo;
        Ok(plan)
    }
}

/// Asserts an epilogue's operands fit the GEMM (a mismatch is the caller's bug).
fn check_epilogue(e: &Epilogue, g: Gemm, c: &DevMut) {
    let plain = || assert!(g.batch == 1 && g.beta == 0.0, "gemm: an epilogue needs one batch and beta 0 ({g:?})");
    let vector = |v: &DevRef| assert!(v.len == g.n && v.dtype == c.dtype, "gemm: bias {v:?} for {g:?}");
    let matrix = |ptr: u64, len: usize, dtype: Dtype| {
        assert!(len == g.m * g.n && dtype == c.dtype, "gemm: GELU's input ({len} {dtype:?}) for {g:?}");
        assert!(
            g.n.is_multiple_of(8) && ptr.is_multiple_of(16),
            "gemm: GELU's input needs rows of 8k, 16-byte aligned"
        );
    };
    match e {
        Epilogue::None => {}
        Epilogue::Bias(bias) => {
            plain();
            vector(bias);
        }
        Epilogue::Gelu { bias, pre } => {
            plain();
            bias.iter().for_each(vector);
            matrix(pre.ptr, pre.len, pre.dtype);
        }
        Epilogue::GeluBackward { pre } => {
            plain();
            matrix(pre.ptr, pre.len, pre.dtype);
        }
    }
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuBLASLt ({} plans, {} MiB workspace)",
            self.plans.lock().map_or(0, |p| p.values().flatten().count()),
            self.workspace.len() >> 20
        )
    }
}
