//! One GPU as a [`Device`]: its context, a stream, the kernel modules built for its
//! architecture, cuBLASLt, and memory from the device's stream-ordered pool.

use crate::CudaError;
use crate::compile::{FAMILIES, Family, cached_cubin, forget_cached, nvrtc_available};
use crate::device::{Arg, Device, Epilogue, launch_limit};
use crate::gemm::Blas;
use crate::memory::{DevMut, DevRef, GpuMemory, Memory};
use cudarc::driver::result as driver;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUmemPool_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use ondol_core::backend::Gemm;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The architecture the kernels were built for ("80", "90a", ...).
    arch: String,
    sms: usize,
    max_shared: u32,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    /// Loaded kernels by "family/name".
    functions: Mutex<HashMap<String, Kernel>>,
    blas: Blas,
}

/// A loaded kernel and the most dynamic shared memory a launch has asked of it so far
/// (checked against the 48 KiB default once per new maximum).
struct Kernel {
    f: CudaFunction,
    shared: u32,
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
        // ondol issues its kernels on one stream; cudarc's per-buffer events would only add
        // synchronisation it does not need.
        // SAFETY: the one buffer another stream touches, the gradients that NCCL's side lane
        // sums, is ordered by explicit events (NcclComm::queue_all_reduce_device, wait_queued).
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let (major, minor) = ctx.compute_capability()?;
        // Hopper's own instructions (wgmma, setmaxnreg) need the arch-specific target.
        let arch = if major == 9 { "90a".to_string() } else { format!("{major}{minor}") };
        let sms = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let max_shared =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let modules =
            FAMILIES.iter().map(|f| Ok((f.name, load_family(&ctx, f, &arch)?))).collect::<Result<_, CudaError>>()?;
        let stream = ctx.default_stream();
        let blas = Blas::new(&stream).map_err(CudaError::Driver)?;
        Ok(Self { stream, ctx, arch, sms, max_shared, modules, functions: Mutex::new(HashMap::new()), blas })
    }

    /// Makes the GPU's context current on the calling thread (the raw copies and module
    /// lookups need it).
    fn bind(&self) {
        self.ctx.bind_to_thread().unwrap_or_else(|e| panic!("CUDA context: {e}"));
    }

    /// Kernel `name` of the family `family` (a kernels/*.cu file), ready for a launch with
    /// `shared` bytes of dynamic shared memory: above 48 KiB, static and dynamic together, a
    /// kernel must opt in to its dynamic share (done once per new largest request).
    fn function(&self, family: &str, name: &str, shared: u32) -> Result<CudaFunction, CudaError> {
        let key = format!("{family}/{name}");
        let mut cache = self.functions.lock().expect("kernel cache");
        let kernel = match cache.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let (_, module) = self
                    .modules
                    .iter()
                    .find(|(f, _)| *f == family)
                    .ok_or_else(|| CudaError::Driver(format!("no kernel family {family}")))?;
                e.insert(Kernel { f: module.load_function(name)?, shared: 0 })
            }
        };
        if shared > kernel.shared {
            self.bind();
            let fixed = kernel.f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
            if fixed as u32 + shared > 48 << 10 {
                kernel.f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )?;
            }
            kernel.shared = shared;
        }
        Ok(kernel.f.clone())
    }
}

/// `family`'s module, from the kernel cache; a cached cubin the driver refuses (damaged, or
/// from a toolchain it does not take) is compiled anew once.
fn load_family(ctx: &Arc<CudaContext>, family: &Family, arch: &str) -> Result<Arc<CudaModule>, CudaError> {
    match ctx.load_module(Ptx::from_binary(cached_cubin(family, arch)?)) {
        Ok(module) => Ok(module),
        Err(e) => {
            ondol_core::say!(
                "ondol: the cached {} kernels for sm_{arch} do not load ({e}); compiling them again",
                family.name
            );
            forget_cached(family, arch);
            Ok(ctx.load_module(Ptx::from_binary(cached_cubin(family, arch)?))?)
        }
    }
}

impl Device for Gpu {
    fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "an unnamed GPU".into())
    }

    fn arch(&self) -> &str {
        &self.arch
    }

    fn sms(&self) -> usize {
        self.sms
    }

    fn max_shared_bytes(&self) -> u32 {
        self.max_shared
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<(Option<Memory>, u64), String> {
        if bytes == 0 {
            return Ok((None, 0));
        }
        let mem = self.stream.alloc_zeros::<u8>(bytes).map_err(|e| e.to_string())?;
        // Event tracking is off (one stream), so taking the address records nothing.
        let ptr = mem.device_ptr(&self.stream).0;
        Ok((Some(Memory::Cuda(GpuMemory(mem))), ptr))
    }

    fn copy_in(&self, dst: u64, src: &[u8]) {
        self.bind();
        // SAFETY: the callers' buffers hold `src.len()` bytes at `dst`; a copy from pageable
        // memory has read the host data when the call returns.
        unsafe { driver::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .unwrap_or_else(|e| panic!("copy to the GPU: {e}"));
    }

    fn copy_out(&self, dst: &mut [u8], src: u64) {
        self.bind();
        // SAFETY: `src` holds `dst.len()` bytes; the stream is synchronised before `dst` is
        // read.
        unsafe { driver::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .unwrap_or_else(|e| panic!("copy from the GPU: {e}"));
        self.synchronize();
    }

    /// Launches on the stream; an empty grid (an op on empty views) launches nothing.
    fn launch(&self, family: &str, name: &str, cfg: LaunchConfig, args: &[Arg]) {
        let (x, y, z) = cfg.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            return;
        }
        if let Some(why) = launch_limit(&cfg, self.max_shared) {
            panic!("kernel {family}/{name}: the GPU refuses a launch with {why}");
        }
        self.bind();
        let f = self.function(family, name, cfg.shared_mem_bytes).unwrap_or_else(|e| {
            panic!("kernel {family}/{name} ({} bytes of shared memory): {e}", cfg.shared_mem_bytes)
        });
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

    fn gemm(&self, g: Gemm, a: DevRef, b: DevRef, epilogue: Epilogue, c: DevMut) -> bool {
        self.bind();
        self.blas.gemm(&self.stream, g, a, b, epilogue, c)
    }

    fn synchronize(&self) {
        self.stream.synchronize().unwrap_or_else(|e| panic!("CUDA stream: {e}"));
    }

    fn memory(&self) -> Option<(u64, u64)> {
        let (free, total) = self.ctx.mem_get_info().ok()?;
        Some(((total - free) as u64, total as u64))
    }

    fn cuda_stream(&self) -> Option<Arc<CudaStream>> {
        Some(self.stream.clone())
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
