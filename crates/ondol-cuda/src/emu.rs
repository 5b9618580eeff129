//! [`Emulator`]: the SIMT emulator as a [`Device`]. The kernels of kernels/*.cu, compiled for
//! the CPU by build.rs (emu/emu.h, emu/emu.cpp), run on host memory: a block at a time, its
//! threads as cooperatively switched fibers, warp shuffles and `mma.sync` emulated. GEMMs
//! (cuBLASLt on a GPU) are a plain loop with fp32 accumulation. It is slow (a kernel runs at
//! a few million thread-instructions per second) and meant for tests on small shapes: every
//! kernel's indexing, launch geometry, shared-memory use and barriers, and the backend's
//! argument lists, checked against the CPU reference without a GPU. Buffers and shared
//! memory end at an inaccessible page, so an access past the end fails the launch. As under
//! `--use_fast_math` on the GPU, kernels flush f32 denormals to zero; its approximate division
//! and square root are not modelled (they round correctly here, within 2 ulp there).
//!
//! What it cannot show: speed, the memory model between blocks (they never run at the same
//! time, so atomics cannot race), and whether the PTX fragment layout it assumes for
//! `mma.sync` is the hardware's (it follows the PTX ISA; the GPU bundle checks the rest).

use crate::compile::FAMILIES;
use crate::device::{Arg, Device, Epilogue, bytes_of, check_gemm_operands, launch_limit};
use crate::memory::{DevMut, DevRef, Dtype, HostMemory, Memory};
use cudarc::driver::LaunchConfig;
use ondol_core::backend::Gemm;
use ondol_core::bf16;
use ondol_cpu::math::{gelu, gelu_grad};
use std::ffi::{CStr, CString, c_char, c_void};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

#[repr(C)]
struct Kernel {
    name: *const c_char,
    thunk: Option<unsafe extern "C" fn(*mut *mut c_void)>,
    max_threads: u32,
}

type Thunk = unsafe extern "C" fn(*mut *mut c_void);

/// A kernel of the emulator's registry: its name, its thunk and its block's thread limit
/// (`__launch_bounds__`, or 1024).
struct Entry {
    name: String,
    thunk: Thunk,
    max_threads: u32,
}

unsafe extern "C" {
    fn ondol_emu_family(family: *const c_char) -> *const Kernel;
    fn ondol_emu_launch(
        thunk: unsafe extern "C" fn(*mut *mut c_void),
        grid: *const u32,
        block: *const u32,
        smem: usize,
        params: *mut *mut c_void,
        reverse: i32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// The emulated device. `reverse` runs each block's threads in reverse order between
/// barriers, and the blocks from the last (see emu.cpp: running a kernel both ways exposes a
/// missing `__syncthreads`, and blocks that depend on each other's order).
pub struct Emulator {
    reverse: bool,
    /// The shared memory a block may have, as on the GPU it stands for.
    max_shared: u32,
    /// Bytes in live buffers.
    live: Arc<AtomicU64>,
}

impl Emulator {
    pub fn new(reverse: bool, max_shared: u32) -> Self {
        Self { reverse, max_shared, live: Arc::default() }
    }

    fn find(family: &str, name: &str) -> Entry {
        family_table(family)
            .into_iter()
            .find(|k| k.name == name)
            .unwrap_or_else(|| panic!("kernel {family}/{name} is not in the emulator's table of family {family}"))
    }

    /// Writes `values` to the view, rounded to its type.
    fn store(&self, view: &DevMut, values: &[f32]) {
        match view.dtype {
            Dtype::F32 => self.copy_in(view.ptr, bytes_of(values)),
            Dtype::Bf16 => {
                let rounded: Vec<u16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
                self.copy_in(view.ptr, bytes_of(&rounded))
            }
        }
    }
}

/// The kernels of `family` in the emulator's registry (built by build.rs), with their thunks.
fn family_table(family: &str) -> Vec<Entry> {
    let family_c = CString::new(family).expect("no NUL in a family name");
    let mut out = Vec::new();
    // SAFETY: the registry returns a static table ending with a null name, or null.
    unsafe {
        let mut k = ondol_emu_family(family_c.as_ptr());
        assert!(!k.is_null(), "kernel family {family} is not in the emulator (rebuild ondol-cuda)");
        while !(*k).name.is_null() {
            let name = CStr::from_ptr((*k).name).to_string_lossy().into_owned();
            let thunk = (*k).thunk.expect("every named kernel has a thunk");
            out.push(Entry { name, thunk, max_threads: (*k).max_threads });
            k = k.add(1);
        }
    }
    out
}

/// Every kernel of kernels/*.cu, as "family/name".
pub fn kernel_names() -> Vec<String> {
    FAMILIES.iter().flat_map(|f| family_table(f.name).into_iter().map(|k| format!("{}/{}", f.name, k.name))).collect()
}

/// Where the emulator appends "family/name" for every launch: the file named by
/// ONDOL_EMU_LAUNCH_LOG, if set (.ci/run: which kernels the tests run).
fn launch_log() -> Option<&'static Mutex<std::fs::File>> {
    static LOG: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let path = std::env::var_os("ONDOL_EMU_LAUNCH_LOG")?;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
        Some(Mutex::new(file.unwrap_or_else(|e| panic!("ONDOL_EMU_LAUNCH_LOG {}: {e}", path.display()))))
    })
    .as_ref()
}

/// `len` values of `dtype` at host address `ptr`, as f32.
///
/// # Safety
/// `ptr` must hold `len` values of `dtype` (a live emulator buffer).
unsafe fn read(ptr: u64, len: usize, dtype: Dtype) -> Vec<f32> {
    // SAFETY: forwarded from the caller.
    unsafe {
        match dtype {
            Dtype::F32 => std::slice::from_raw_parts(ptr as *const f32, len).to_vec(),
            Dtype::Bf16 => {
                std::slice::from_raw_parts(ptr as *const u16, len).iter().map(|&b| bf16::to_f32(b)).collect()
            }
        }
    }
}

/// `values[r, :] += bias` for every row.
fn add_rows(values: &mut [f32], bias: &[f32]) {
    values.chunks_mut(bias.len()).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
}

impl Device for Emulator {
    fn name(&self) -> String {
        format!("the SIMT emulator{}", if self.reverse { " (threads in reverse order)" } else { "" })
    }

    fn arch(&self) -> &str {
        "emu"
    }

    /// Few "SMs", so that grid-stride loops and per-SM grids take several turns.
    fn sms(&self) -> usize {
        2
    }

    fn max_shared_bytes(&self) -> u32 {
        self.max_shared
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<(Option<Memory>, u64), String> {
        if bytes == 0 {
            return Ok((None, 0));
        }
        let (mem, ptr) = HostMemory::zeroed(bytes, &self.live)?;
        Ok((Some(Memory::Host(mem)), ptr))
    }

    fn copy_in(&self, dst: u64, src: &[u8]) {
        // SAFETY: the backend's buffers hold `src.len()` bytes at `dst`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) }
    }

    fn copy_out(&self, dst: &mut [u8], src: u64) {
        // SAFETY: the backend's buffers hold `dst.len()` bytes at `src`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) }
    }

    fn launch(&self, family: &str, name: &str, cfg: LaunchConfig, args: &[Arg]) {
        let (x, y, z) = cfg.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            return;
        }
        if let Some(why) = launch_limit(&cfg, self.max_shared) {
            panic!("kernel {family}/{name}: a GPU refuses a launch with {why}");
        }
        let kernel = Self::find(family, name);
        let threads = cfg.block_dim.0 * cfg.block_dim.1 * cfg.block_dim.2;
        if threads > kernel.max_threads {
            panic!(
                "kernel {family}/{name}: a GPU refuses a launch of {threads} threads a block past its \
                 __launch_bounds__ ({})",
                kernel.max_threads
            );
        }
        if let Some(log) = launch_log() {
            writeln!(log.lock().expect("launch log"), "{family}/{name}").expect("write the launch log");
        }
        let mut values: Vec<Vec<u8>> = args.iter().map(Arg::bytes).collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        let grid = [x, y, z];
        let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
        let mut err = vec![0 as c_char; 512];
        // SAFETY: the thunk reads one parameter per kernel argument, each from a live value of
        // the size its type has (the caller lists them in the kernel's order and types, as for
        // the GPU); pointers in them address live emulator buffers.
        let status = unsafe {
            ondol_emu_launch(
                kernel.thunk,
                grid.as_ptr(),
                block.as_ptr(),
                cfg.shared_mem_bytes as usize,
                params.as_mut_ptr(),
                self.reverse as i32,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if status != 0 {
            // SAFETY: the launcher wrote a NUL-terminated message into `err`.
            let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("kernel {family}/{name} (grid {grid:?}, block {block:?}): {message}");
        }
    }

    fn gemm(&self, g: Gemm, a: DevRef, b: DevRef, epilogue: Epilogue, c: DevMut) -> bool {
        check_gemm_operands(&g, &a, &b, &c);
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return true;
        }
        // SAFETY: views of live emulator buffers, of the lengths they state.
        let (a_val, b_val, mut c_val) =
            unsafe { (read(a.ptr, a.len, a.dtype), read(b.ptr, b.len, b.dtype), read(c.ptr, c.len, c.dtype)) };
        for batch in 0..g.batch {
            let (a0, b0, c0) = (batch * g.stride_a, batch * g.stride_b, batch * g.stride_c);
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut acc = 0.0f32;
                    for k in 0..g.k {
                        let av = if g.trans_a { a_val[a0 + k * g.m + i] } else { a_val[a0 + i * g.k + k] };
                        let bv = if g.trans_b { b_val[b0 + j * g.k + k] } else { b_val[b0 + k * g.n + j] };
                        acc += av * bv;
                    }
                    let out = &mut c_val[c0 + i * g.n + j];
                    *out = g.alpha * acc + if g.beta == 0.0 { 0.0 } else { g.beta * *out };
                }
            }
        }
        // SAFETY (the epilogue's reads): live emulator buffers, as above.
        match epilogue {
            Epilogue::None => {}
            Epilogue::Bias(bias) => add_rows(&mut c_val, &unsafe { read(bias.ptr, bias.len, bias.dtype) }),
            Epilogue::Gelu { bias, pre } => {
                if let Some(bias) = bias {
                    add_rows(&mut c_val, &unsafe { read(bias.ptr, bias.len, bias.dtype) });
                }
                self.store(&pre, &c_val);
                c_val.iter_mut().for_each(|v| *v = gelu(*v));
            }
            Epilogue::GeluBackward { pre } => {
                let pre = unsafe { read(pre.ptr, pre.len, pre.dtype) };
                c_val.iter_mut().zip(&pre).for_each(|(d, &x)| *d *= gelu_grad(x));
            }
        }
        self.store(&c, &c_val);
        true
    }

    fn synchronize(&self) {}

    fn host_memory(&self) -> bool {
        true
    }

    fn memory(&self) -> Option<(u64, u64)> {
        None
    }

    fn allocated_bytes(&self) -> Option<u64> {
        Some(self.live.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::bytes_of_mut;

    /// A kernel writing past a buffer's end (16-byte rounded) fails its launch, naming the
    /// kernel and the thread, instead of corrupting whatever lies beyond.
    #[test]
    fn a_kernel_writing_past_a_buffer_fails_its_launch() {
        let dev = Emulator::new(false, 48 << 10);
        let (_mem, ptr) = dev.alloc_zeroed(4 * 40).unwrap();
        let fill = |n: usize| {
            let args = [Arg::Ptr(ptr), Arg::I64(n as i64), Arg::F32(1.0)];
            std::panic::catch_unwind(|| dev.launch("elementwise", "fill_f32", dev.flat(n), &args))
        };
        assert!(fill(40).is_ok());
        let message = *fill(44).unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("elementwise/fill_f32") && message.contains("memory fault at block"), "{message}");
        // The launch after a fault runs as any other.
        assert!(fill(40).is_ok());
    }

    fn one_warp(blocks: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }
    }

    /// A bf16 pair stored as one 32-bit word at an odd element faults on the GPU (misaligned
    /// address), not on the CPU; the emulator fails the launch as the GPU would.
    #[test]
    fn a_pair_of_bf16_at_an_odd_element_fails_its_launch() {
        let dev = Emulator::new(false, 48 << 10);
        let (_mem, ptr) = dev.alloc_zeroed(16).unwrap();
        let store = |at: u64| {
            std::panic::catch_unwind(|| dev.launch("emu_selftest", "store_bf16_pair", one_warp(1), &[Arg::Ptr(at)]))
        };
        assert!(store(ptr + 4).is_ok());
        let message = *store(ptr + 2).unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("a bf16 pair's store") && message.contains("not 4-byte aligned"), "{message}");
    }

    /// A block larger than its kernel's `__launch_bounds__` (which the emulator's build
    /// erases from the kernel, as the compiler's register budget is all they change) fails
    /// its launch, as the GPU refuses it; a block within them runs.
    #[test]
    fn a_block_past_its_launch_bounds_fails_its_launch() {
        let dev = Emulator::new(false, 48 << 10);
        let (_mem, ptr) = dev.alloc_zeroed(4 * 96).unwrap();
        let launch = |threads: u32| {
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            std::panic::catch_unwind(|| dev.launch("emu_selftest", "bounded_to_two_warps", cfg, &[Arg::Ptr(ptr)]))
        };
        assert!(launch(64).is_ok());
        let message = *launch(96).unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("96 threads") && message.contains("__launch_bounds__ (64)"), "{message}");
    }

    /// Kernels see f32 denormals as zero and write zero for them, as `--use_fast_math` has
    /// the GPU do; the host's own arithmetic after the launch keeps its denormals.
    #[test]
    fn denormals_flush_to_zero_in_kernels_only() {
        let dev = Emulator::new(false, 48 << 10);
        let tiny = f32::MIN_POSITIVE / 4.0; // a denormal
        let (a, b) = ([1e-20f32, tiny, 3.0], [1e-20f32, 1e20, 0.5]);
        let (_a, pa) = dev.alloc_zeroed(12).unwrap();
        let (_b, pb) = dev.alloc_zeroed(12).unwrap();
        let (_out, po) = dev.alloc_zeroed(12).unwrap();
        dev.copy_in(pa, bytes_of(&a));
        dev.copy_in(pb, bytes_of(&b));
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (3, 1, 1), shared_mem_bytes: 0 };
        dev.launch("emu_selftest", "multiply_pairs", cfg, &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(po)]);
        let mut out = [f32::NAN; 3];
        dev.copy_out(bytes_of_mut(&mut out), po);
        assert_eq!(out, [0.0, 0.0, 1.5], "1e-40 as a product, and a denormal factor, are zero on the GPU");
        assert!(std::hint::black_box(1e-20f32) * std::hint::black_box(1e-20f32) > 0.0, "the host flushes too");
    }

    /// A static `__shared__` array starts every block as NaN, as it starts undefined on the
    /// GPU: a block does not see what the block before it wrote (the arrays are thread-local
    /// on the host, and blocks run one after another on a thread).
    #[test]
    fn static_shared_memory_is_poisoned_for_every_block() {
        let dev = Emulator::new(false, 48 << 10);
        let (_mem, ptr) = dev.alloc_zeroed(4 * 64).unwrap();
        dev.launch("emu_selftest", "read_static_shared_of_another_block", one_warp(2), &[Arg::Ptr(ptr)]);
        let mut out = [0f32; 64];
        dev.copy_out(bytes_of_mut(&mut out), ptr);
        assert!(out[..32].iter().all(|&x| x == 1.0), "block 0 reads what it wrote: {:?}", &out[..32]);
        assert!(out[32..].iter().all(|x| x.is_nan()), "block 1 reads block 0's values: {:?}", &out[32..]);
    }

    #[test]
    fn bytes_round_trip_through_emulated_memory() {
        let dev = Emulator::new(false, 48 << 10);
        let (_mem, ptr) = dev.alloc_zeroed(12).unwrap();
        dev.copy_in(ptr, bytes_of(&[1.5f32, -2.0, 3.25]));
        let mut back = [0f32; 3];
        dev.copy_out(bytes_of_mut(&mut back), ptr);
        assert_eq!(back, [1.5, -2.0, 3.25]);
    }
}
