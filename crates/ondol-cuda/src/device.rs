//! One GPU: its context, a stream, the kernel modules built for its architecture, and kernel
//! launches.

use crate::CudaError;
use crate::compile::{FAMILIES, cached_cubin, nvrtc_available};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUmemPool_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// The architecture the kernels were built for ("80", "90a", ...).
    pub arch: String,
    /// Streaming multiprocessors, for sizing grids.
    pub sms: usize,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device address (0 for a null pointer).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Gpu {
    /// Opens device `ordinal` and builds every kernel family for it. Without a driver, a
    /// device, NVRTC or cuBLASLt, an error that says which.
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
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(CudaError::NoDevice("libcublasLt.so.13 not found on the library path".into()));
        }
        let ctx = CudaContext::new(ordinal)?;
        // ondol issues everything on one stream; cudarc's per-buffer events would only add
        // synchronisation it does not need.
        // SAFETY: no buffer is shared between streams.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let (major, minor) = ctx.compute_capability()?;
        // Hopper's own instructions (wgmma, setmaxnreg) need the arch-specific target.
        let arch = if major == 9 { "90a".to_string() } else { format!("{major}{minor}") };
        let sms = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let modules = FAMILIES
            .iter()
            .map(|f| Ok((f.name, ctx.load_module(Ptx::from_binary(cached_cubin(f, &arch)?))?)))
            .collect::<Result<_, CudaError>>()?;
        Ok(Self { stream: ctx.default_stream(), ctx, arch, sms, modules, functions: Mutex::new(HashMap::new()) })
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "an unnamed GPU".into())
    }

    /// Kernel `name` of the family `family` (a kernels/*.cu file).
    pub fn function(&self, family: &str, name: &str) -> Result<CudaFunction, CudaError> {
        let key = format!("{family}/{name}");
        let mut cache = self.functions.lock().expect("kernel cache");
        if let Some(f) = cache.get(&key) {
            return Ok(f.clone());
        }
        let (_, module) = self
            .modules
            .iter()
            .find(|(f, _)| *f == family)
            .ok_or_else(|| CudaError::Driver(format!("no kernel family {family}")))?;
        let f = module.load_function(name)?;
        cache.insert(key, f.clone());
        Ok(f)
    }

    /// Launches `family`'s kernel `name` on the stream; an empty grid (an op on empty views)
    /// launches nothing. A failure is a bug (a kernel missing from its file, or a launch the
    /// device refuses), so it panics with the kernel's name.
    pub(crate) fn launch(&self, family: &str, name: &str, cfg: LaunchConfig, args: &[Arg]) {
        let (x, y, z) = cfg.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            return;
        }
        let f = self.function(family, name).unwrap_or_else(|e| panic!("kernel {family}/{name}: {e}"));
        if cfg.shared_mem_bytes > 48 << 10 {
            // Above 48 KiB a kernel must opt in to its dynamic shared memory.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_mem_bytes as i32,
            )
            .unwrap_or_else(|e| panic!("kernel {name}: {} bytes of shared memory: {e}", cfg.shared_mem_bytes));
        }
        let mut builder = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => builder.arg(p),
                Arg::I32(x) => builder.arg(x),
                Arg::I64(x) => builder.arg(x),
                Arg::F32(x) => builder.arg(x),
            };
        }
        // SAFETY: every kernel's arguments are listed by its caller in the order and types of
        // its extern "C" signature, with device addresses of live buffers.
        unsafe { builder.launch(cfg) }.unwrap_or_else(|e| panic!("kernel {family}/{name}: {e}"));
    }

    /// A grid-stride launch over `n` elements: 256 threads a block, at most 16 blocks per SM
    /// (none for no elements).
    pub(crate) fn flat(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).min(16 * self.sms);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Tells the device's default memory pool to keep what is freed (release threshold: all of
/// it), so allocations after the first step never reach the driver's allocator.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), CudaError> {
    use cudarc::driver::sys;
    let mut pool = std::mem::MaybeUninit::uninit();
    let mut threshold = u64::MAX;
    // SAFETY: the device is valid (its context exists); the attribute takes a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
        )
        .result()?;
    }
    Ok(())
}
