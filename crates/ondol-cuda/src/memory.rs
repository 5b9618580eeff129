//! Device memory: buffers that carry their element type, borrowed views into them, and token
//! ids.
//!
//! Buffers come from the device's stream-ordered memory pool, which the backend tells to keep
//! freed memory (release threshold = all of it): a buffer dropped and allocated again in the
//! next step is served from the pool, never by cudaMalloc, so the pool is the caching
//! allocator.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DriverError, ValidAsZeroBits};
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

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
    _mem: Option<CudaSlice<u8>>,
    ptr: u64,
    len: usize,
    dtype: Dtype,
}

impl DeviceBuf {
    /// `len` zeroed elements from the stream's pool.
    pub(crate) fn zeros(stream: &Arc<CudaStream>, len: usize, dtype: Dtype) -> Result<Self, DriverError> {
        let (mem, ptr) = alloc_zeroed::<u8>(stream, len * dtype.bytes())?;
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
    _mem: Option<CudaSlice<u32>>,
    pub(crate) ptr: u64,
    pub(crate) len: usize,
}

impl DeviceIds {
    pub(crate) fn zeros(stream: &Arc<CudaStream>, len: usize) -> Result<Self, DriverError> {
        let (mem, ptr) = alloc_zeroed::<u32>(stream, len)?;
        Ok(Self { _mem: mem, ptr, len })
    }
}

/// A zeroed allocation of `len` elements and its device address (0 and no memory when empty).
fn alloc_zeroed<T: cudarc::driver::DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<(Option<CudaSlice<T>>, u64), DriverError> {
    if len == 0 {
        return Ok((None, 0));
    }
    let mem = stream.alloc_zeros::<T>(len)?;
    // Event tracking is off (one stream), so taking the address records nothing.
    let ptr = mem.device_ptr(stream).0;
    Ok((Some(mem), ptr))
}
