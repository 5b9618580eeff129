//! [`NcclPipe`]: one direction of a pipeline group over NCCL, with buffered sends.
//!
//! The pipeline schedules send an activation (or a gradient) and go on to their next pass
//! without waiting for the receiver. TCP and the thread communicators allow that; an NCCL
//! send does not, as it waits for its matching receive. So each message is first copied, on
//! the main stream, into a buffer of the channel's own, and sent from there on a stream of
//! its own once an event says the copy is done. The caller's buffer is free at once, and the
//! main stream never waits for a receiver. Receives run on the main stream, in order with
//! the kernels that read what they bring.
//!
//! Each edge of the ring in this direction (from group rank `e` to its neighbour) is a
//! two-rank communicator of its own, used by the sender only on its send stream and by the
//! receiver only on its main stream: one communicator on two streams would let NCCL order a
//! rank's sends behind its receives. The edges are joined, connected (one byte each: NCCL
//! connects a pair on its first use, which waits on the host for the peer) and torn down in
//! [`crate::ring_edges`]'s order, the same on every rank.
//!
//! A send buffer is used again once the event recorded after its send has completed, so the
//! channel holds as many as it has sends in flight (the 1F1B schedules: a few). Buffers come
//! from the stream-ordered pool (see `Staging`), as sends are in flight whenever one is made.
//! NCCL does not check that a receive's length is its send's: the engine sends each
//! message's tag first and checks it before it receives the payload.

use super::{Lane, Staging, Stalled, check_usable, init_rank, nccl_message, stalled_error};
use crate::comm::Communicator;
use crate::error::{CommError, TimeoutInfo};
use crate::mesh::{Direction, ring_edges};
use crate::store::StoreClient;
use cudarc::driver::result as driver;
use cudarc::driver::{CudaEvent, CudaStream, DriverError};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use ondol_core::DeviceSlice;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One end of an edge: its two-rank communicator and the group rank at the other end.
struct Edge {
    lane: Lane,
    peer: usize,
}

/// The sender is rank 0 of an edge's communicator, the receiver rank 1.
const SENDER: i32 = 0;
const RECEIVER: i32 = 1;

/// Messages travel as bytes: NCCL matches a send and its receive by count, which it does not
/// check; a receive of another length than its send shows as a timeout.
const BYTES: sys::ncclDataType_t = sys::ncclDataType_t::ncclUint8;

/// A send's buffer and the event recorded after the send on the send stream.
struct SendBuffer {
    staging: Staging,
    sent: CudaEvent,
}

/// One direction of a pipeline group (see the module doc).
pub struct NcclPipe {
    /// Where this rank sends, on a stream of its own.
    to: Edge,
    /// Where this rank receives from, on the main stream.
    from: Edge,
    /// Whether the send edge was joined first: both edges are connected, aborted and
    /// destroyed in the order they were joined, which every rank shares.
    send_edge_first: bool,
    /// Recorded on the main stream before each send, for the send stream to wait on.
    after_main: CudaEvent,
    sends: Mutex<Vec<SendBuffer>>,
    /// Host-slice receives land here first.
    recv_staging: Mutex<Staging>,
    /// The group's members as world ranks, in group-rank order.
    ranks: Vec<usize>,
    rank: usize,
    timeout: Duration,
    aborted: AtomicBool,
    broken: Mutex<Option<TimeoutInfo>>,
}

// SAFETY: as NcclComm: NCCL communicators may be used from any thread, one call at a time,
// which the trait's callers keep to; the buffers are behind mutexes.
unsafe impl Send for NcclPipe {}

impl NcclPipe {
    /// Joins the pipeline group `ranks` (world ranks, in group order, at least 2) that holds
    /// `world_rank`, for messages going `direction`; `key` names the group in the store.
    /// Every member calls it, and each rank joins its two edges in ascending edge order,
    /// which all ranks share, so no cycle of ranks waits on each other to start.
    pub(crate) fn join(
        store: &mut StoreClient,
        key: &str,
        ranks: Vec<usize>,
        world_rank: usize,
        direction: Direction,
        main: &Arc<CudaStream>,
        timeout: Duration,
    ) -> Result<NcclPipe, CommError> {
        let p = ranks.len();
        assert!(p >= 2, "a pipeline channel joins two or more ranks");
        let s = ranks.iter().position(|&r| r == world_rank).expect("a rank joins its own groups");
        let (next, prev) = ((s + 1) % p, (s + p - 1) % p);
        let cuda = |e: DriverError| CommError::Launch(format!("a CUDA stream for NCCL: {e}"));
        let send_stream = main.fork().map_err(cuda)?;
        let after_main = main.context().new_event(None).map_err(cuda)?;
        let mut joined: Vec<(bool, Lane)> = Vec::with_capacity(2);
        for edge in ring_edges(s, p, direction) {
            let sending = edge.sender == s;
            let pair = [ranks[edge.sender], ranks[edge.receiver]];
            let (stream, index) = if sending { (&send_stream, SENDER) } else { (main, RECEIVER) };
            match init_rank(store, &format!("{key}/{}", edge.index), 2, index as usize, stream, &pair) {
                Ok(comm) => joined.push((sending, Lane { comm, stream: stream.clone() })),
                Err(e) => {
                    for (_, lane) in joined {
                        // SAFETY: made above and used nowhere else; aborted, not destroyed,
                        // as its peer is not destroying it.
                        let _ = unsafe { nccl::comm_abort(lane.comm) };
                    }
                    return Err(e);
                }
            }
        }
        let (to_peer, from_peer) = match direction {
            Direction::Forward => (next, prev),
            Direction::Backward => (prev, next),
        };
        let send_edge_first = joined[0].0;
        let (mut to, mut from) = (None, None);
        for (sending, lane) in joined {
            match sending {
                true => to = Some(Edge { lane, peer: to_peer }),
                false => from = Some(Edge { lane, peer: from_peer }),
            }
        }
        let (to, from) = (to.expect("the send edge was joined"), from.expect("the receive edge was joined"));
        let pipe = NcclPipe {
            to,
            from,
            send_edge_first,
            after_main,
            sends: Mutex::new(Vec::new()),
            recv_staging: Mutex::new(Staging { ptr: 0, bytes: 0 }),
            ranks,
            rank: s,
            timeout,
            aborted: AtomicBool::new(false),
            broken: Mutex::new(None),
        };
        pipe.connect()?;
        Ok(pipe)
    }

    /// Connects both edges. NCCL connects a pair on its first send or receive, and that
    /// first call waits on the host until the peer makes its own: were the first use of an
    /// edge a send that its peer meets only after a send of its own (the tied embedding's
    /// sum), both would wait forever. So each edge carries one byte now, in join order
    /// (acyclic, as the set-up), and no later send waits on the host.
    fn connect(&self) -> Result<(), CommError> {
        const OP: &str = "connect";
        let main = self.main();
        let cuda = |e: DriverError| self.invalid(OP, format!("CUDA: {e}"));
        let mut staging = self.recv_staging.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = staging.at_least(1, main).map_err(|e| self.invalid(OP, e))?;
        // The send stream uses the byte after its stream-ordered allocation.
        self.after_main.record(main).map_err(cuda)?;
        self.to.lane.stream.wait(&self.after_main).map_err(cuda)?;
        for edge in self.join_order() {
            let lane = &edge.lane;
            // SAFETY: `ptr` holds a byte; each use is waited for before the next.
            let queued = unsafe {
                if std::ptr::eq(edge, &self.to) {
                    nccl::send(ptr as *const c_void, 1, BYTES, RECEIVER, lane.comm, lane.stream_ptr())
                } else {
                    nccl::recv(ptr as *mut c_void, 1, BYTES, SENDER, lane.comm, lane.stream_ptr())
                }
            };
            queued.map_err(|e| self.invalid(OP, format!("NCCL: {}", nccl_message(&e))))?;
            lane.wait(self.timeout).map_err(|e| self.stalled(OP, e))?;
        }
        Ok(())
    }

    /// Both edges in the order they were joined.
    fn join_order(&self) -> [&Edge; 2] {
        if self.send_edge_first { [&self.to, &self.from] } else { [&self.from, &self.to] }
    }

    /// The rank's main stream (the backend's), where receives run.
    fn main(&self) -> &CudaStream {
        &self.from.lane.stream
    }

    fn invalid(&self, op: &'static str, message: impl Into<String>) -> CommError {
        CommError::Invalid { op, group: self.ranks.clone(), message: message.into() }
    }

    fn check(&self, op: &'static str) -> Result<(), CommError> {
        check_usable(op, &self.ranks, &self.broken, self.aborted.load(Ordering::SeqCst))
    }

    fn check_peer(&self, op: &'static str, edge: &Edge, peer: usize) -> Result<(), CommError> {
        if peer == edge.peer {
            return Ok(());
        }
        let way = if std::ptr::eq(edge, &self.to) { "sends to" } else { "receives from" };
        Err(self.invalid(
            op,
            format!(
                "this pipeline channel of group rank {} {way} group rank {} only, not {peer}",
                self.rank, edge.peer
            ),
        ))
    }

    /// Aborts both edges' communicators (ending their kernels on the device); later calls fail.
    fn abort(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for edge in self.join_order() {
            // SAFETY: aborting a live communicator, once (the flag above).
            let _ = unsafe { nccl::comm_abort(edge.lane.comm) };
        }
    }

    /// The error of a wait on one of the edges that `stalled` (aborting the channel where
    /// NCCL needs it).
    fn stalled(&self, op: &'static str, stalled: Stalled) -> CommError {
        stalled_error(op, &self.ranks, self.timeout, &self.broken, stalled, || self.abort())
    }

    /// Queues a message of `bytes` to the peer: `fill(ptr)` writes it on the main stream into a
    /// free send buffer, and the send stream sends it once that is done.
    fn send_bytes(
        &self,
        op: &'static str,
        to: usize,
        bytes: usize,
        fill: impl FnOnce(u64, &CudaStream) -> Result<(), DriverError>,
    ) -> Result<(), CommError> {
        self.check(op)?;
        self.check_peer(op, &self.to, to)?;
        self.to.lane.async_error().map_err(|e| self.stalled(op, e))?;
        let main = self.main();
        main.context().bind_to_thread().map_err(|e| self.invalid(op, format!("CUDA context: {e}")))?;
        let mut sends = self.sends.lock().unwrap_or_else(|e| e.into_inner());
        let buffer = self.free_buffer(op, &mut sends, bytes)?;
        let event = |e: DriverError| self.invalid(op, format!("CUDA: {e}"));
        let ptr = buffer.staging.at_least(bytes.max(1), main).map_err(|e| self.invalid(op, e))?;
        fill(ptr, main).map_err(event)?;
        self.after_main.record(main).map_err(event)?;
        let send = &self.to.lane;
        send.stream.wait(&self.after_main).map_err(event)?;
        // SAFETY: the buffer holds `bytes` written by `fill`, ordered before the send by the
        // event, and is not written again until `sent` completes.
        unsafe { nccl::send(ptr as *const c_void, bytes, BYTES, RECEIVER, send.comm, send.stream_ptr()) }
            .map_err(|e| self.invalid(op, format!("NCCL: {}", nccl_message(&e))))?;
        buffer.sent.record(&send.stream).map_err(event)
    }

    /// A send buffer whose last send is done: the smallest that holds `bytes` (a tag does
    /// not take an activation's), else the largest (to be grown), else a new one.
    fn free_buffer<'a>(
        &self,
        op: &'static str,
        sends: &'a mut Vec<SendBuffer>,
        bytes: usize,
    ) -> Result<&'a mut SendBuffer, CommError> {
        let cuda = |e: DriverError| self.invalid(op, format!("CUDA: {e}"));
        let mut free = Vec::new();
        for (i, b) in sends.iter().enumerate() {
            if b.sent.try_is_complete().map_err(cuda)? {
                free.push((b.staging.bytes, i));
            }
        }
        let fits = free.iter().filter(|(size, _)| *size >= bytes).min();
        let i = match fits.or(free.iter().max()) {
            Some(&(_, i)) => i,
            None => {
                let sent = self.to.lane.stream.context().new_event(None).map_err(cuda)?;
                sends.push(SendBuffer { staging: Staging { ptr: 0, bytes: 0 }, sent });
                sends.len() - 1
            }
        };
        Ok(&mut sends[i])
    }

    /// Receives `bytes` from the peer into `ptr` on the main stream and waits for them (at
    /// most the timeout).
    fn recv_bytes(&self, op: &'static str, from: usize, ptr: u64, bytes: usize) -> Result<(), CommError> {
        self.check(op)?;
        self.check_peer(op, &self.from, from)?;
        let lane = &self.from.lane;
        lane.stream.context().bind_to_thread().map_err(|e| self.invalid(op, format!("CUDA context: {e}")))?;
        // SAFETY: `ptr` holds `bytes` (the caller's device view or the staging buffer).
        unsafe { nccl::recv(ptr as *mut c_void, bytes, BYTES, SENDER, lane.comm, lane.stream_ptr()) }
            .map_err(|e| self.invalid(op, format!("NCCL: {}", nccl_message(&e))))?;
        lane.wait(self.timeout).map_err(|e| self.stalled(op, e))
    }

    fn only_point_to_point(&self, op: &'static str) -> CommError {
        self.invalid(op, "a pipeline channel only sends and receives")
    }
}

fn bytes_of(s: &DeviceSlice) -> usize {
    s.len * if s.bf16 { 2 } else { 4 }
}

impl Drop for NcclPipe {
    fn drop(&mut self) {
        // Sends still in flight are waited for (at most the timeout, which aborts the channel
        // if it runs out) before their buffers go.
        if !self.aborted.load(Ordering::SeqCst)
            && let Err(e) = self.to.lane.wait(self.timeout)
        {
            let _ = self.stalled("drop", e);
        }
        if !self.aborted.load(Ordering::SeqCst) {
            for edge in self.join_order() {
                // SAFETY: each communicator is destroyed once; aborted ones need no destroy.
                let _ = unsafe { nccl::comm_destroy(edge.lane.comm) };
            }
        }
        let send_stream = self.to.lane.stream.clone();
        for b in self.sends.get_mut().unwrap_or_else(|e| e.into_inner()) {
            b.staging.free(&send_stream);
        }
        let main = self.from.lane.stream.clone();
        self.recv_staging.get_mut().unwrap_or_else(|e| e.into_inner()).free(&main);
    }
}

impl Communicator for NcclPipe {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.ranks.len()
    }

    fn world_ranks(&self) -> &[usize] {
        &self.ranks
    }

    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), CommError> {
        Err(self.only_point_to_point("all_reduce_sum"))
    }

    fn reduce_scatter_sum(&self, _: &[f32], _: &mut [f32]) -> Result<(), CommError> {
        Err(self.only_point_to_point("reduce_scatter_sum"))
    }

    fn all_gather(&self, _: &[f32], _: &mut [f32]) -> Result<(), CommError> {
        Err(self.only_point_to_point("all_gather"))
    }

    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<(), CommError> {
        Err(self.only_point_to_point("broadcast"))
    }

    fn barrier(&self) -> Result<(), CommError> {
        Err(self.only_point_to_point("barrier"))
    }

    /// Buffered: returns once `buf` is copied (see the module doc).
    fn send(&self, buf: &[f32], to: usize) -> Result<(), CommError> {
        // SAFETY: the send buffer holds `size_of_val(buf)` bytes (send_bytes grows it so); a
        // copy from pageable memory has read `buf` when it returns.
        self.send_bytes("send", to, size_of_val(buf), |ptr, main| unsafe {
            driver::memcpy_htod_async(ptr, buf, main.cu_stream())
        })
    }

    fn recv(&self, buf: &mut [f32], from: usize) -> Result<(), CommError> {
        const OP: &str = "recv";
        let bytes = size_of_val(buf);
        let mut staging = self.recv_staging.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = staging.at_least(bytes.max(1), self.main()).map_err(|e| self.invalid(OP, e))?;
        self.recv_bytes(OP, from, ptr, bytes)?;
        // SAFETY: the staging buffer holds `bytes`, received (the stream was waited for).
        unsafe { driver::memcpy_dtoh_async(buf, ptr, self.main().cu_stream()) }
            .map_err(|e| self.invalid(OP, format!("copy from the GPU: {e}")))?;
        self.from.lane.wait(self.timeout).map_err(|e| self.stalled(OP, e))
    }

    fn takes(&self, slice: &DeviceSlice) -> bool {
        !slice.host
    }

    /// Buffered: the copy into the channel's buffer is queued on the main stream after the
    /// work that wrote `buf`, and work queued later may overwrite `buf`.
    fn send_device(&self, buf: DeviceSlice, to: usize) -> Result<(), CommError> {
        let bytes = bytes_of(&buf);
        // SAFETY: `buf` is a live device view of `bytes` (the caller's contract); the send
        // buffer holds as many.
        self.send_bytes("send_device", to, bytes, |ptr, main| unsafe {
            driver::memcpy_dtod_async(ptr, buf.ptr, bytes, main.cu_stream())
        })
    }

    /// The sender's buffer must have the same type and length (NCCL matches bytes).
    fn recv_device(&self, buf: DeviceSlice, from: usize) -> Result<(), CommError> {
        self.recv_bytes("recv_device", from, buf.ptr, bytes_of(&buf))
    }
}

impl std::fmt::Debug for NcclPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclPipe(rank {} of group {}, to {}, from {})",
            self.rank,
            crate::error::Ranks(&self.ranks),
            self.to.peer,
            self.from.peer
        )
    }
}
