//! One GPU: its context, a stream, and the kernel modules built for its architecture.

use crate::CudaError;
use crate::compile::{FAMILIES, cached_cubin, nvrtc_available};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// The architecture the kernels were built for ("80", "90a", ...).
    pub arch: String,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
}

impl Gpu {
    /// Opens device `ordinal` and builds every kernel family for it. Without a driver, a
    /// device or NVRTC, an error that says which.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDevice("the NVIDIA driver (libcuda.so) is not installed".into()));
        }
        let count = CudaContext::device_count().map_err(|e| CudaError::NoDevice(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice(format!("{count} devices, so there is no device {ordinal}")));
        }
        if !nvrtc_available() {
            return Err(CudaError::NoCompiler("libnvrtc.so.13 not found on the library path".into()));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        // Hopper's own instructions (wgmma, setmaxnreg) need the arch-specific target.
        let arch = if major == 9 { "90a".to_string() } else { format!("{major}{minor}") };
        let modules = FAMILIES
            .iter()
            .map(|f| Ok((f.name, ctx.load_module(Ptx::from_binary(cached_cubin(f, &arch)?))?)))
            .collect::<Result<_, CudaError>>()?;
        Ok(Self { stream: ctx.default_stream(), ctx, arch, modules })
    }

    /// Kernel `name` of the family `family` (a kernels/*.cu file).
    pub fn function(&self, family: &str, name: &str) -> Result<CudaFunction, CudaError> {
        let (_, module) = self
            .modules
            .iter()
            .find(|(f, _)| *f == family)
            .ok_or_else(|| CudaError::Driver(format!("no kernel family {family}")))?;
        Ok(module.load_function(name)?)
    }
}
