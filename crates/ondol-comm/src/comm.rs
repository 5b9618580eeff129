//! The [`Communicator`] contract: the collectives and point-to-point operations the parallel
//! layers are written against.
//!
//! Buffers are host `f32` slices; a communicator that works on device memory (NCCL) also takes
//! the `*_device` forms on a backend's buffers ([`DeviceSlice`], f32 or bf16), so activations
//! and gradients need not travel through the host. Every operation is "caller owns the
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
use ondol_core::DeviceSlice;

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
    /// `output` becomes the concatenation of every rank's `input` in rank order;
    /// `output.len() == size() * input.len()`.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `buf` becomes the `root` rank's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Sends `buf` to group rank `to`, which receives it with a matching [`Communicator::recv`].
    /// Callers must not rely on `send` returning before the matching `recv` is posted (NCCL
    /// does not buffer): pair sends and receives so that no cycle of ranks all sends first.
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

    /// Whether the `*_device` operations work: only for communicators of device memory.
    fn on_device(&self) -> bool {
        false
    }
    /// [`Communicator::all_reduce_sum`] in place on device memory, in order with the work
    /// already issued on the device.
    fn all_reduce_device(&self, _buf: DeviceSlice) -> Result<(), CommError> {
        Err(no_device_memory("all_reduce_device", self.world_ranks()))
    }
    /// [`Communicator::all_gather`] on device memory.
    fn all_gather_device(&self, _input: DeviceSlice, _output: DeviceSlice) -> Result<(), CommError> {
        Err(no_device_memory("all_gather_device", self.world_ranks()))
    }
    /// [`Communicator::reduce_scatter_sum`] on device memory.
    fn reduce_scatter_device(&self, _input: DeviceSlice, _output: DeviceSlice) -> Result<(), CommError> {
        Err(no_device_memory("reduce_scatter_device", self.world_ranks()))
    }
}

fn no_device_memory(op: &'static str, group: &[usize]) -> CommError {
    CommError::Invalid { op, group: group.to_vec(), message: "this communicator works on host memory only".into() }
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
    fn on_device(&self) -> bool {
        (**self).on_device()
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
}
