//! The [`Communicator`] contract: the collectives and point-to-point operations the parallel
//! layers are written against.
//!
//! Buffers are host `f32` slices; the `*_device` forms take a backend's buffers
//! ([`DeviceSlice`], f32 or bf16), so that with a communicator of device memory (NCCL)
//! activations and gradients need not travel through the host. Every operation is "caller owns the
//! buffers, the call fills them in place" (no allocation in the contract), which lets callers
//! keep one flat buffer per bucket.
//!
//! Semantics shared by every implementation:
//! - `rank()` and `size()` are within this communicator's group (0-based, dense); roots and peers
//!   are group ranks too.
//! - Every rank of the group calls the same collectives in the same order with compatible
//!   lengths. A rank that does not arrive within the communicator's timeout makes the others fail
//!   with [`CommError::Timeout`] naming the operation, the group and the missing ranks; afterwards
//!   the communicator is broken ([`CommError::Broken`]) and the run has to stop.
//! - Sums are deterministic: every rank receives the same bits, and the same inputs give the same
//!   bits run after run.

use crate::CommError;
use ondol_core::{DeviceSlice, bf16};

pub trait Communicator: Send {
    /// This rank's index within the group.
    fn rank(&self) -> usize;
    /// The number of ranks in the group.
    fn size(&self) -> usize;
    /// The group's members as world ranks, in group-rank order (used in messages).
    fn world_ranks(&self) -> &[usize];

    /// `buf` becomes the elementwise sum of every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// `output` becomes chunk `rank()` of the elementwise sum of every rank's `input`, where
    /// `input.len() == size() * output.len()` and chunk `i` is `input[i * n..(i + 1) * n]`.
    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// `buf` on group rank `root` becomes the elementwise sum of every rank's `buf`; on the
    /// others it is left unspecified (the thread and TCP communicators leave them as they
    /// were; this default, an all-reduce, leaves the sum, one valid result). Half an
    /// all-reduce's bytes on TCP and NCCL. ZeRO-1 sums gradient buckets into their owners'
    /// shards so.
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        if root >= self.size() {
            return Err(CommError::Invalid {
                op: "reduce_sum",
                group: self.world_ranks().to_vec(),
                message: format!("root {root} is outside the group of {} ranks", self.size()),
            });
        }
        self.all_reduce_sum(buf)
    }
    /// `output` becomes the concatenation of every rank's `input` in rank order;
    /// `output.len() == size() * input.len()`.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `buf` becomes the `root` rank's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Sends `buf` to group rank `to`, which receives it with a matching [`Communicator::recv`].
    /// Callers must not rely on `send` returning before the matching `recv` is posted (NCCL
    /// does not buffer): pair sends and receives so that no cycle of ranks all sends first.
    /// The pipeline channels are the exception: they buffer (see [`crate::RankComms::pp`]).
    fn send(&self, buf: &[f32], to: usize) -> Result<(), CommError>;
    /// Receives into `buf` the next message group rank `from` sent to this rank; the lengths
    /// must agree.
    fn recv(&self, buf: &mut [f32], from: usize) -> Result<(), CommError>;
    /// Returns once every rank of the group has called `barrier`.
    fn barrier(&self) -> Result<(), CommError>;

    /// Another handle to this rank of the group, for a thread that runs collectives while
    /// the owner does other work (gradient buckets during backward). The two handles must
    /// never be used at the same time. None where the communicator cannot be shared so.
    fn duplicate(&self) -> Option<Box<dyn Communicator>> {
        None
    }

    /// Whether the `*_device` operations take `slice`. A communicator of device memory
    /// (NCCL) takes a GPU's; a host communicator takes a device emulated in host memory (its
    /// `*_device` operations copy through the host forms), so the engine's device path runs
    /// on the CPU too.
    fn takes(&self, slice: &DeviceSlice) -> bool {
        slice.host
    }
    /// [`Communicator::all_reduce_sum`] in place on device memory, in order with the work
    /// already issued on the device.
    fn all_reduce_device(&self, buf: DeviceSlice) -> Result<(), CommError> {
        let mut values = read_host("all_reduce_device", self.world_ranks(), &buf)?;
        self.all_reduce_sum(&mut values)?;
        write_host(&buf, &values);
        Ok(())
    }
    /// [`Communicator::all_gather`] on device memory.
    fn all_gather_device(&self, input: DeviceSlice, output: DeviceSlice) -> Result<(), CommError> {
        let mine = read_host("all_gather_device", self.world_ranks(), &input)?;
        let mut gathered = read_host("all_gather_device", self.world_ranks(), &output)?;
        self.all_gather(&mine, &mut gathered)?;
        write_host(&output, &gathered);
        Ok(())
    }
    /// [`Communicator::reduce_scatter_sum`] on device memory.
    fn reduce_scatter_device(&self, input: DeviceSlice, output: DeviceSlice) -> Result<(), CommError> {
        let whole = read_host("reduce_scatter_device", self.world_ranks(), &input)?;
        let mut mine = read_host("reduce_scatter_device", self.world_ranks(), &output)?;
        self.reduce_scatter_sum(&whole, &mut mine)?;
        write_host(&output, &mine);
        Ok(())
    }
    /// [`Communicator::reduce_sum`] in place on device memory.
    fn reduce_device(&self, buf: DeviceSlice, root: usize) -> Result<(), CommError> {
        let mut values = read_host("reduce_device", self.world_ranks(), &buf)?;
        self.reduce_sum(&mut values, root)?;
        write_host(&buf, &values);
        Ok(())
    }
    /// [`Communicator::send`] of device memory, after the work already issued on the device.
    /// Returns once `buf` may be written again; whether the message waits for its receiver
    /// is as `send` says for this communicator (the pipeline channels buffer: see
    /// [`crate::RankComms::pp`]).
    fn send_device(&self, buf: DeviceSlice, to: usize) -> Result<(), CommError> {
        let values = read_host("send_device", self.world_ranks(), &buf)?;
        self.send(&values, to)
    }
    /// [`Communicator::recv`] into device memory, before the work issued on the device after
    /// it; `buf` holds the same number of values as the sender's (f32 or bf16 alike).
    fn recv_device(&self, buf: DeviceSlice, from: usize) -> Result<(), CommError> {
        let mut values = read_host("recv_device", self.world_ranks(), &buf)?;
        self.recv(&mut values, from)?;
        write_host(&buf, &values);
        Ok(())
    }
    /// Queues [`Communicator::all_reduce_device`] of `buf` to run once the work already issued
    /// on the device is done, beside the device's later work (NCCL: on a stream of its own,
    /// ordered by an event); returns without waiting for it. The caller leaves `buf` alone
    /// until [`Communicator::wait_queued`]. This default sums at once; the thread communicator
    /// reads `buf` now and writes the sum at `wait_queued`, as late as NCCL may, so a test sees
    /// a write that races with a queued sum.
    fn queue_all_reduce_device(&self, buf: DeviceSlice) -> Result<(), CommError> {
        self.all_reduce_device(buf)
    }
    /// Queues [`Communicator::reduce_device`] of `buf` as
    /// [`Communicator::queue_all_reduce_device`] queues an all-reduce.
    fn queue_reduce_device(&self, buf: DeviceSlice, root: usize) -> Result<(), CommError> {
        self.reduce_device(buf, root)
    }
    /// Waits for every queued collective (at most the timeout), so that work issued after
    /// this sees their sums, and reports their errors.
    fn wait_queued(&self) -> Result<(), CommError> {
        Ok(())
    }
}

/// The values of `slice`, a device emulated in host memory, as f32.
pub(crate) fn read_host(op: &'static str, group: &[usize], slice: &DeviceSlice) -> Result<Vec<f32>, CommError> {
    if !slice.host {
        return Err(CommError::Invalid {
            op,
            group: group.to_vec(),
            message: "this communicator works on host memory only, not on a GPU's".into(),
        });
    }
    if slice.len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a DeviceSlice is a live view of a backend's buffer (the caller's contract) of
    // `len` values of its type, and `host` says the address is host memory.
    Ok(unsafe {
        if slice.bf16 {
            let bits = std::slice::from_raw_parts(slice.ptr as *const u16, slice.len);
            bits.iter().map(|&b| bf16::to_f32(b)).collect()
        } else {
            std::slice::from_raw_parts(slice.ptr as *const f32, slice.len).to_vec()
        }
    })
}

/// Writes `values` into `slice` (read with [`read_host`], so it is host memory), rounding to
/// bf16 where it holds bf16.
pub(crate) fn write_host(slice: &DeviceSlice, values: &[f32]) {
    debug_assert!(slice.host && values.len() == slice.len);
    if slice.len == 0 {
        return;
    }
    // SAFETY: as in read_host; the caller holds the only use of the view for the call.
    unsafe {
        if slice.bf16 {
            let bits = std::slice::from_raw_parts_mut(slice.ptr as *mut u16, slice.len);
            bits.iter_mut().zip(values).for_each(|(b, &v)| *b = bf16::from_f32(v));
        } else {
            std::slice::from_raw_parts_mut(slice.ptr as *mut f32, slice.len).copy_from_slice(values);
        }
    }
}

/// A boxed communicator is one: code can hold `Box<dyn Communicator>` without knowing which.
impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn world_ranks(&self) -> &[usize] {
        (**self).world_ranks()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        (**self).all_reduce_sum(buf)
    }
    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        (**self).reduce_scatter_sum(input, output)
    }
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        (**self).reduce_sum(buf, root)
    }
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        (**self).all_gather(input, output)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        (**self).broadcast(buf, root)
    }
    fn send(&self, buf: &[f32], to: usize) -> Result<(), CommError> {
        (**self).send(buf, to)
    }
    fn recv(&self, buf: &mut [f32], from: usize) -> Result<(), CommError> {
        (**self).recv(buf, from)
    }
    fn barrier(&self) -> Result<(), CommError> {
        (**self).barrier()
    }
    fn duplicate(&self) -> Option<Box<dyn Communicator>> {
        (**self).duplicate()
    }
    fn takes(&self, slice: &DeviceSlice) -> bool {
        (**self).takes(slice)
    }
    fn all_reduce_device(&self, buf: DeviceSlice) -> Result<(), CommError> {
        (**self).all_reduce_device(buf)
    }
    fn all_gather_device(&self, input: DeviceSlice, output: DeviceSlice) -> Result<(), CommError> {
        (**self).all_gather_device(input, output)
    }
    fn reduce_scatter_device(&self, input: DeviceSlice, output: DeviceSlice) -> Result<(), CommError> {
        (**self).reduce_scatter_device(input, output)
    }
    fn reduce_device(&self, buf: DeviceSlice, root: usize) -> Result<(), CommError> {
        (**self).reduce_device(buf, root)
    }
    fn send_device(&self, buf: DeviceSlice, to: usize) -> Result<(), CommError> {
        (**self).send_device(buf, to)
    }
    fn recv_device(&self, buf: DeviceSlice, from: usize) -> Result<(), CommError> {
        (**self).recv_device(buf, from)
    }
    fn queue_all_reduce_device(&self, buf: DeviceSlice) -> Result<(), CommError> {
        (**self).queue_all_reduce_device(buf)
    }
    fn queue_reduce_device(&self, buf: DeviceSlice, root: usize) -> Result<(), CommError> {
        (**self).queue_reduce_device(buf, root)
    }
    fn wait_queued(&self) -> Result<(), CommError> {
        (**self).wait_queued()
    }
}
