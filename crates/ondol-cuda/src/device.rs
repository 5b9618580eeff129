//! [`Device`]: what the CUDA backend needs of the machine that runs its kernels. Two
//! implement it: the GPU ([`crate::gpu::Gpu`]: cudarc, NVRTC cubins, cuBLASLt) and the SIMT
//! emulator ([`crate::emu::Emulator`]: the same kernels compiled for the CPU), so every
//! kernel and every line of the backend that launches it can be checked on a machine with no
//! GPU.

use crate::memory::{DevMut, DevRef, Dtype, Memory};
use cudarc::driver::{CudaStream, LaunchConfig};
use ondol_core::backend::Gemm;
use std::sync::Arc;

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device address (0 for a null pointer).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    /// The argument's bytes as the kernel's parameter holds them.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        match *self {
            Arg::Ptr(p) => p.to_ne_bytes().to_vec(),
            Arg::I32(x) => x.to_ne_bytes().to_vec(),
            Arg::I64(x) => x.to_ne_bytes().to_vec(),
            Arg::F32(x) => x.to_ne_bytes().to_vec(),
        }
    }
}

/// What a GEMM does to its product on the way out (cuBLASLt's epilogue): every form but
/// `None` is for one batch with `beta == 0`, and its vectors and `pre` have the output's type.
#[derive(Debug)]
pub(crate) enum Epilogue<'a> {
    /// `c = alpha product + beta c`.
    None,
    /// `c = product + bias`, the bias (`g.n` values) on every row.
    Bias(DevRef<'a>),
    /// `pre = product (+ bias)`, `c = gelu(pre)`, GELU's tanh approximation: a linear layer
    /// and its activation, `pre` (the output's shape) kept for backward.
    Gelu { bias: Option<DevRef<'a>>, pre: DevMut<'a> },
    /// `c = product * gelu'(pre)`: GELU's backward applied to the gradient the GEMM makes.
    GeluBackward { pre: DevRef<'a> },
}

pub(crate) trait Device: Send + Sync {
    /// The device's name ("NVIDIA H100 80GB HBM3", ...).
    fn name(&self) -> String;
    /// The architecture the kernels were built for ("80", "90a", or "emu").
    fn arch(&self) -> &str;
    /// Streaming multiprocessors, for sizing grids.
    fn sms(&self) -> usize;
    /// The most dynamic shared memory a block may have (with the opt-in above 48 KiB; static
    /// shared memory counts against it too, but no kernel has more than a few hundred bytes).
    fn max_shared_bytes(&self) -> u32;
    /// `bytes` zeroed bytes and their device address (no memory and 0 for none).
    fn alloc_zeroed(&self, bytes: usize) -> Result<(Option<Memory>, u64), String>;
    /// Copies `src` to the device address `dst`, in order with the kernels; `src` has been
    /// read when this returns.
    fn copy_in(&self, dst: u64, src: &[u8]);
    /// Copies `dst.len()` bytes from the device address `src` once everything issued before
    /// has run.
    fn copy_out(&self, dst: &mut [u8], src: u64);
    /// Launches `family`'s kernel `name`. A failure is a bug (a kernel missing from its file,
    /// a launch the device refuses, a deadlock in the emulator), so it panics naming the
    /// kernel.
    fn launch(&self, family: &str, name: &str, cfg: LaunchConfig, args: &[Arg]);
    /// `c = alpha op(a) op(b) + beta c`, see [`Gemm`], with `epilogue` applied. Returns false,
    /// having written nothing, where the device's GEMM library has no algorithm for this
    /// shape with this epilogue (the caller then runs the epilogue as a pass of its own, or a
    /// plain GEMM on gemm.cu's kernel).
    fn gemm(&self, g: Gemm, a: DevRef, b: DevRef, epilogue: Epilogue, c: DevMut) -> bool;
    /// Waits for everything issued so far.
    fn synchronize(&self);
    /// Bytes in use and in total, where the device can tell.
    fn memory(&self) -> Option<(u64, u64)>;
    /// Bytes of the buffers allocated and not yet freed, where the device counts them exactly
    /// (the emulator; a GPU's pool rounds and reserves).
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// The CUDA stream every kernel runs on (a GPU's; the emulator has none).
    fn cuda_stream(&self) -> Option<Arc<CudaStream>> {
        None
    }
    /// Whether device addresses are host memory (the emulator's).
    fn host_memory(&self) -> bool {
        false
    }

    /// A grid-stride launch over `n` elements: 256 threads a block, at most 16 blocks per SM
    /// (none for no elements).
    fn flat(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).min(16 * self.sms());
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Why a GPU with `max_shared` bytes of shared memory a block would refuse this launch, if it
/// would: more shared memory than that, more than 1,024 threads a block, or more than 65,535
/// blocks along y or z (x takes 2^31 - 1). Both devices check it before a launch: the emulator so that a launch whose
/// geometry grows with a shape fails in the tests first, the GPU so that the panic names the
/// limit (the driver says only "invalid argument").
pub(crate) fn launch_limit(cfg: &LaunchConfig, max_shared: u32) -> Option<String> {
    let (_, y, z) = cfg.grid_dim;
    if cfg.shared_mem_bytes > max_shared {
        Some(format!("{} bytes of shared memory (this GPU has {max_shared})", cfg.shared_mem_bytes))
    } else if cfg.block_dim.0 * cfg.block_dim.1 * cfg.block_dim.2 > 1024 {
        Some(format!("block {:?} (at most 1,024 threads)", cfg.block_dim))
    } else if y > 65_535 || z > 65_535 || cfg.grid_dim.0 > i32::MAX as u32 {
        Some(format!("grid {:?} (y and z at most 65,535, x at most 2^31 - 1)", cfg.grid_dim))
    } else {
        None
    }
}

/// The bytes of a slice of plain numbers.
pub(crate) fn bytes_of<T: Copy>(x: &[T]) -> &[u8] {
    // SAFETY: only instantiated with f32, u16 and u32 (no padding, any bit pattern is valid as
    // bytes); the view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

/// The bytes of a mutable slice of plain numbers.
pub(crate) fn bytes_of_mut<T: Copy>(x: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32, u16 or u32.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}

/// The operands every GEMM path takes (cuBLASLt, the emulator's loop, gemm.cu's kernel): A and
/// B of one type, C of theirs or f32 (from bf16: weight gradients), and views long enough for
/// every batch. A mismatch is a bug in the caller, so it panics naming the operand.
pub(crate) fn check_gemm_operands(g: &Gemm, a: &DevRef, b: &DevRef, c: &DevMut) {
    assert_eq!(a.dtype, b.dtype, "gemm: A and B differ in type");
    assert!(
        a.dtype == c.dtype || (a.dtype == Dtype::Bf16 && c.dtype == Dtype::F32),
        "gemm: {:?} inputs cannot write a {:?} output",
        a.dtype,
        c.dtype
    );
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return;
    }
    let last = |stride: usize, size: usize| (g.batch - 1) * stride + size;
    assert!(a.len >= last(g.stride_a, g.m * g.k), "gemm: A holds {} values", a.len);
    assert!(b.len >= last(g.stride_b, g.k * g.n), "gemm: B holds {} values", b.len);
    assert!(c.len >= last(g.stride_c, g.m * g.n), "gemm: C holds {} values", c.len);
}
