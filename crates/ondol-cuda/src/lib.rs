//! ondol-cuda: the CUDA side of ondol. It opens a device (and says plainly when there is
//! none), compiles the kernels of `kernels/*.cu` with NVRTC into a cubin for the device's
//! exact architecture (cached on disk by source hash and architecture), and launches them.
//!
//! [`CudaBackend`] implements the backend contract on them, with cuBLASLt GEMMs and bf16 mixed
//! precision, on a GPU or on the SIMT emulator ([`CudaBackend::emulated`]: the same kernels
//! compiled for the CPU by build.rs), which checks every kernel without a GPU.
//!
//! Everything is loaded at run time (cudarc's dynamic loading): the crate builds, and a
//! binary that contains it runs, on a machine with no CUDA at all. Every op is checked against
//! the CPU reference by `tests/backend.rs`, on the emulator always and on a GPU where there is one.

mod backend;
mod compile;
mod device;
mod emu;
mod gemm;
mod gpu;
mod memory;
mod source;

pub use backend::{CONV_MAX_TAPS, CudaBackend, QK_NORM_MAX_HEAD_DIM, SCAN_MAX_STATE, SSD_MAX_CHUNK};
pub use compile::{FAMILIES, Family, cached_cubin, compile_cubin, forget_cached, nvrtc_available};
pub use emu::kernel_names;
pub use memory::{DevMut, DevRef, DeviceBuf, DeviceIds, Dtype};

/// What can go wrong between the driver, NVRTC and a kernel.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("NVRTC is not available: {0}")]
    NoCompiler(String),
    #[error("kernels/{family}.cu does not compile for sm_{arch}:\n{log}")]
    Compile { family: String, arch: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("kernel cache {path}: {source}")]
    Cache { path: String, source: std::io::Error },
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}
