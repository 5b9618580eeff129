//! Kernel sources, compiled by NVRTC into cubins for one architecture and cached on disk.
//!
//! NVRTC runs on the machine that launches the kernels and targets the device's exact
//! architecture with a cubin, not PTX: PTX from a newer NVRTC than the driver cannot be
//! JIT-compiled by it (DESIGN.md section 3).

use crate::CudaError;
use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One `kernels/*.cu` file.
pub struct Family {
    pub name: &'static str,
    source: &'static str,
}

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel family, embedded in the binary so that it needs no source tree at run time.
pub const FAMILIES: [Family; 13] = [
    Family { name: "norms", source: include_str!("../../../kernels/norms.cu") },
    Family { name: "activations", source: include_str!("../../../kernels/activations.cu") },
    Family { name: "embedding", source: include_str!("../../../kernels/embedding.cu") },
    Family { name: "cross_entropy", source: include_str!("../../../kernels/cross_entropy.cu") },
    Family { name: "adamw", source: include_str!("../../../kernels/adamw.cu") },
    Family { name: "rope", source: include_str!("../../../kernels/rope.cu") },
    Family { name: "attention", source: include_str!("../../../kernels/attention.cu") },
    Family { name: "elementwise", source: include_str!("../../../kernels/elementwise.cu") },
    Family { name: "conv1d", source: include_str!("../../../kernels/conv1d.cu") },
    Family { name: "selective_scan", source: include_str!("../../../kernels/selective_scan.cu") },
    Family { name: "ssd", source: include_str!("../../../kernels/ssd.cu") },
    Family { name: "flash_attention", source: include_str!("../../../kernels/flash_attention.cu") },
    Family { name: "gemm", source: include_str!("../../../kernels/gemm.cu") },
];

impl Family {
    /// The source NVRTC compiles: common.cuh pasted in place of its include (NVRTC is given
    /// no include path), without its include guard.
    pub fn source(&self) -> String {
        crate::source::with_common(self.source, COMMON)
    }
}

/// Whether libnvrtc can be loaded (from LD_LIBRARY_PATH or the system's library path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's options besides the architecture (part of the cache key).
const OPTIONS: [&str; 2] = ["-std=c++17", "--use_fast_math"];

/// Compiles `family` into a cubin for `sm_{arch}` ("80", "90a", ...).
pub fn compile_cubin(family: &Family, arch: &str) -> Result<Vec<u8>, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoCompiler(
            "libnvrtc.so.13 not found; put the directory that holds it on LD_LIBRARY_PATH".into(),
        ));
    }
    let failed = |log: String| CudaError::Compile { family: family.name.into(), arch: arch.into(), log };
    let source = CString::new(family.source()).map_err(|e| failed(e.to_string()))?;
    let name = CString::new(format!("{}.cu", family.name)).expect("no NUL in a family name");
    let prog = result::create_program(&source, Some(&name)).map_err(|e| failed(e.to_string()))?;
    let options: Vec<String> =
        std::iter::once(format!("--gpu-architecture=sm_{arch}")).chain(OPTIONS.iter().map(|o| o.to_string())).collect();
    // SAFETY: `prog` was created above and is destroyed once, below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let cubin = match compiled {
        Ok(()) => unsafe { cubin(prog) }.map_err(|e| failed(e.to_string())),
        Err(e) => {
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>())
                .unwrap_or_default();
            Err(failed(format!("{e}\n{}", log.trim_end_matches('\0'))))
        }
    };
    // SAFETY: created above, not yet destroyed.
    unsafe { result::destroy_program(prog) }.map_err(|e| failed(e.to_string()))?;
    cubin
}

/// The cubin of a compiled program.
///
/// # Safety
/// `prog` must be a compiled, not yet destroyed program.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut out = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(prog, out.as_mut_ptr().cast()) }.result()?;
    Ok(out)
}

/// Where compiled kernels are kept: `$ONDOL_KERNEL_CACHE`, else `$XDG_CACHE_HOME/ondol/kernels`,
/// else `~/.cache/ondol/kernels`.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ONDOL_KERNEL_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ondol").join("kernels")
}

/// Where `family`'s cubin for `sm_{arch}` is cached: keyed by the source, the architecture,
/// NVRTC's options and its version.
fn cache_path(family: &Family, arch: &str) -> PathBuf {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; a failure leaves 0.0, which only weakens the key.
    if nvrtc_available() {
        let _ = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    }
    let key = Sha256::digest(format!("{}\0{arch}\0{}\0{major}.{minor}", family.source(), OPTIONS.join(" ")));
    let hex: String = key[..8].iter().map(|b| format!("{b:02x}")).collect();
    cache_dir().join(format!("{}-{hex}.sm_{arch}.cubin", family.name))
}

/// [`compile_cubin`] through the on-disk cache (see [`cache_path`]). A cache that cannot be
/// written only costs a compile next time.
pub fn cached_cubin(family: &Family, arch: &str) -> Result<Vec<u8>, CudaError> {
    let path = cache_path(family, arch);
    if let Ok(cubin) = std::fs::read(&path) {
        return Ok(cubin);
    }
    let cubin = compile_cubin(family, arch)?;
    // Written whole under a name of its own (the process and a count of its writes), then
    // renamed: a reader never sees half a cubin, and two writers never share a file.
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let tmp = path.with_extension(format!("tmp{}-{}", std::process::id(), WRITES.fetch_add(1, Ordering::Relaxed)));
    let stored = std::fs::create_dir_all(cache_dir())
        .and_then(|()| std::fs::write(&tmp, &cubin))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = stored {
        let _ = std::fs::remove_file(&tmp);
        ondol_core::say!("warning: {}", CudaError::Cache { path: path.display().to_string(), source: e });
    }
    Ok(cubin)
}

/// Removes `family`'s cached cubin for `sm_{arch}` (one the driver refused to load), so that
/// the next [`cached_cubin`] compiles it anew.
pub fn forget_cached(family: &Family, arch: &str) {
    let _ = std::fs::remove_file(cache_path(family, arch));
}
