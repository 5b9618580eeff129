//! Device memory: buffers that carry their element type, borrowed views into them, and token
//! ids.
//!
//! On a GPU, buffers come from the device's stream-ordered memory pool, which the backend
//! tells to keep freed memory (release threshold = all of it): a buffer dropped and allocated
//! again in the next step is served from the pool, never by cudaMalloc, so the pool is the
//! caching allocator. In the emulator they are host memory.

use crate::device::Device;
use cudarc::driver::CudaSlice;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What owns a buffer's bytes: held to be freed on drop, never read.
#[allow(dead_code)]
pub(crate) enum Memory {
    Cuda(GpuMemory),
    Host(HostMemory),
}

/// A GPU allocation that makes its context current before it is freed: the free goes on the
/// legacy NULL stream, which the driver finds through the calling thread's current context,
/// and a thread that never made a GPU call has none (cudarc's drop does not bind it).
pub(crate) struct GpuMemory(pub CudaSlice<u8>);

impl Drop for GpuMemory {
    fn drop(&mut self) {
        // A failure shows at the next bound call; the slice's own drop frees the memory next.
        let _ = self.0.context().bind_to_thread();
    }
}

/// Zeroed host memory for the emulator, 16-byte aligned, ending (rounded to 16 bytes) at a
/// page with no access, so that a kernel reading or writing past a buffer's end faults there
/// (emu/emu.cpp turns the fault into a failed launch).
pub(crate) struct HostMemory {
    ptr: *mut u8,
    bytes: usize,
    /// The emulator's count of bytes in live buffers, which this one leaves on drop.
    live: Arc<AtomicU64>,
}

unsafe extern "C" {
    fn ondol_emu_alloc(bytes: usize) -> *mut u8;
    fn ondol_emu_free(p: *mut u8, bytes: usize);
}

// SAFETY: the memory is owned exclusively; access goes through the backend's views.
unsafe impl Send for HostMemory {}
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// `bytes` zeroed bytes, counted in `live` while they exist.
    pub(crate) fn zeroed(bytes: usize, live: &Arc<AtomicU64>) -> Result<(HostMemory, u64), String> {
        // SAFETY: returns fresh zeroed memory of `bytes` bytes, or null.
        let ptr = unsafe { ondol_emu_alloc(bytes) };
        if ptr.is_null() {
            return Err(format!("out of host memory for {bytes} bytes"));
        }
        live.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok((HostMemory { ptr, bytes, live: live.clone() }, ptr as u64))
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this size, freed once.
        unsafe { ondol_emu_free(self.ptr, self.bytes) }
        self.live.fetch_sub(self.bytes as u64, Ordering::Relaxed);
    }
}

/// The element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
    /// The suffix of the kernels instantiated for this storage type (`FOR_EACH_STORAGE`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// A device allocation of `len` elements of `dtype`. Zero-length buffers own no memory.
pub struct DeviceBuf {
    /// Owns the memory `ptr` points into.
    _mem: Option<Memory>,
    ptr: u64,
    len: usize,
    dtype: Dtype,
}

impl DeviceBuf {
    /// `len` zeroed elements.
    pub(crate) fn zeros(dev: &dyn Device, len: usize, dtype: Dtype) -> Result<Self, String> {
        let (mem, ptr) = dev.alloc_zeroed(len * dtype.bytes())?;
        Ok(Self { _mem: mem, ptr, len, dtype })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    pub(crate) fn view(&self, range: Range<usize>) -> DevRef<'_> {
        let (ptr, len) = self.span(&range);
        DevRef { ptr, len, dtype: self.dtype, _buf: PhantomData }
    }
    pub(crate) fn view_mut(&mut self, range: Range<usize>) -> DevMut<'_> {
        let (ptr, len) = self.span(&range);
        DevMut { ptr, len, dtype: self.dtype, _buf: PhantomData }
    }
    /// Mutable views of disjoint ranges; panics if two overlap (a bug in the caller).
    pub(crate) fn views_mut<const N: usize>(&mut self, ranges: [Range<usize>; N]) -> [DevMut<'_>; N] {
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                assert!(a.end <= b.start || b.end <= a.start, "views {a:?} and {b:?} overlap");
            }
        }
        ranges.map(|r| {
            let (ptr, len) = self.span(&r);
            DevMut { ptr, len, dtype: self.dtype, _buf: PhantomData }
        })
    }
    fn span(&self, range: &Range<usize>) -> (u64, usize) {
        assert!(range.start <= range.end && range.end <= self.len, "view {range:?} of a buffer of {}", self.len);
        (self.ptr + (range.start * self.dtype.bytes()) as u64, range.len())
    }
}

/// A read-only view: a device address, a length and the element type.
#[derive(Clone, Copy, Debug)]
pub struct DevRef<'a> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _buf: PhantomData<&'a DeviceBuf>,
}

/// A mutable view; the borrow of its buffer keeps every other view of it away.
#[derive(Debug)]
pub struct DevMut<'a> {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _buf: PhantomData<&'a mut DeviceBuf>,
}

impl DevMut<'_> {
    /// Reads through a mutable view (an op whose output is also its input).
    pub(crate) fn as_ref(&self) -> DevRef<'_> {
        DevRef { ptr: self.ptr, len: self.len, dtype: self.dtype, _buf: PhantomData }
    }
    /// The same view for a shorter borrow (to pass it to an op and keep using it).
    pub(crate) fn reborrow(&mut self) -> DevMut<'_> {
        DevMut { ptr: self.ptr, len: self.len, dtype: self.dtype, _buf: PhantomData }
    }
}

/// Token ids (u32) on the device.
pub struct DeviceIds {
    _mem: Option<Memory>,
    pub(crate) ptr: u64,
    pub(crate) len: usize,
}

impl DeviceIds {
    pub(crate) fn zeros(dev: &dyn Device, len: usize) -> Result<Self, String> {
        let (mem, ptr) = dev.alloc_zeroed(4 * len)?;
        Ok(Self { _mem: mem, ptr, len })
    }
}
