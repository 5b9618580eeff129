//! [`NcclComm`]: ranks are processes with a GPU each, talking through NCCL (cargo feature
//! `nccl`; libnccl is loaded at run time). One communicator per group of the mesh, each made
//! with `ncclCommInitRank` from a unique id that the group's first rank publishes in the
//! rendezvous store; all of a rank's communicators issue their work on the stream of its
//! backend, so a collective on device memory runs after the kernels that produced its input
//! and before those that read its output, with no extra synchronisation.
//!
//! # Device memory and host slices
//! The `*_device` operations reduce a backend's buffers in place (f32 or bf16): gradients and
//! tensor-parallel activations never leave the GPU. The host-slice operations of the
//! contract go through a device staging buffer of the communicator's own (losses, norms,
//! checkpoint gathering: small or rare).
//!
//! # Timeouts
//! NCCL calls return once the work is queued; a rank that never arrives would leave the
//! others' streams waiting forever. So every operation waits for its stream by polling, at
//! most the communicator's timeout: past it, the communicator is aborted (`ncclCommAbort`,
//! which also ends its kernels on the device) and the error names the operation and the group
//! (NCCL cannot tell which rank is missing). Waiting per operation also keeps the host in step
//! with the device.
//!
//! # Overlap
//! The data-parallel group has a second communicator on a stream of its own (the side lane):
//! [`Communicator::queue_all_reduce_device`] (and `queue_reduce_device`, ZeRO-1's) makes that
//! stream wait for an event on the main stream and queues the sum there, returning at once,
//! so gradient buckets are summed while the backward kernels issued after them run;
//! [`Communicator::wait_queued`] waits for the side stream (with the timeout), so that what
//! the host issues next comes after the sums.
//!
//! # Point to point
//! `send` waits until the peer has received (NCCL does not buffer), so sends and receives must
//! be paired as the contract says. The pipeline schedules rely on buffered sends, so where the
//! mesh has stages, [`RankComms::nccl`] makes the pipeline channels [`NcclPipe`]s, which copy
//! each message on the device and send it from a stream of their own (see [`pipe`]).

use crate::comm::Communicator;
use crate::error::{CommError, Ranks, TimeoutInfo};
use crate::mesh::{Direction, Mesh, RankComms};
use crate::store::StoreClient;
use cudarc::driver::result as driver;
use cudarc::driver::sys as cu;
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use ondol_core::DeviceSlice;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod pipe;
pub use pipe::NcclPipe;

/// NCCL's words for an error: its code, NCCL's string for it, and the last error message
/// NCCL kept (cudarc's `NcclError` prints none of them).
fn nccl_message(e: &nccl::NcclError) -> String {
    let text = |p: *const std::ffi::c_char| {
        // SAFETY: NCCL returns null or a NUL-terminated string it owns, read at once.
        if p.is_null() { String::new() } else { unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned() }
    };
    // SAFETY: both return NCCL's own strings; ncclGetLastError takes a null communicator
    // (its message is the process's last, whichever communicator failed).
    let (name, last) =
        unsafe { (text(sys::ncclGetErrorString(e.0)), text(sys::ncclGetLastError(std::ptr::null_mut()))) };
    match last.trim() {
        "" => format!("{:?} ({name})", e.0),
        last => format!("{:?} ({name}): {last}", e.0),
    }
}

/// Whether libnccl can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// A device buffer for staging messages, grown on demand. It comes from the device's
/// stream-ordered pool: `cuMemAlloc` and `cuMemFree` may wait for the whole device, and with
/// an NCCL kernel in flight waiting for a peer that is itself waiting so, neither would return.
struct Staging {
    ptr: u64,
    bytes: usize,
}

/// Staging buffers grow in steps of this many bytes (not powers of two, which could nearly
/// double a large buffer).
const STAGING_STEP: usize = 64 << 10;

impl Staging {
    /// The buffer, grown to at least `bytes`, ready on `stream`. The caller knows that nothing
    /// on the device uses the old allocation any more (it waited for the stream, or for the
    /// event after its last use).
    fn at_least(&mut self, bytes: usize, stream: &CudaStream) -> Result<u64, String> {
        if self.bytes < bytes {
            self.free(stream);
            let size = bytes.next_multiple_of(STAGING_STEP);
            // SAFETY: a stream-ordered allocation, freed by `free`.
            self.ptr = unsafe { driver::malloc_async(stream.cu_stream(), size) }
                .map_err(|e| format!("cannot allocate {bytes} bytes on the GPU: {e}"))?;
            self.bytes = size;
        }
        Ok(self.ptr)
    }

    /// Frees the buffer on `stream`, after the work queued there.
    fn free(&mut self, stream: &CudaStream) {
        if self.ptr != 0 {
            // SAFETY: allocated by `at_least`; its last use comes before the work queued on
            // `stream` so far (the caller's contract).
            let _ = unsafe { driver::free_async(self.ptr, stream.cu_stream()) };
            (self.ptr, self.bytes) = (0, 0);
        }
    }
}

/// An NCCL communicator and the stream its work is queued on.
struct Lane {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
}

/// How long [`Lane::wait`] polls before it starts to sleep between polls.
const SPIN: Duration = Duration::from_millis(5);

/// Why waiting for a lane's stream ended before its work was done.
enum Stalled {
    /// The CUDA context or stream failed (the message says how).
    Cuda(String),
    /// NCCL reported an asynchronous error: the communicator must be aborted.
    Nccl(sys::ncclResult_t),
    /// The work was not done within the timeout.
    TimedOut,
}

impl Lane {
    fn stream_ptr(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Polls the stream until everything queued on it is done, at most `timeout`; an
    /// asynchronous NCCL error on the communicator ends the wait at once. The first
    /// [`SPIN`] it polls without sleeping: a tensor-parallel all-reduce takes a few hundred
    /// microseconds, and a sleep that overshot its end would leave the GPU idle meanwhile
    /// (with sleeps doubling from 20 µs, up to as long as the collective itself took).
    fn wait(&self, timeout: Duration) -> Result<(), Stalled> {
        // The main lane's stream is the context's NULL stream, which resolves against the
        // context current on this thread.
        self.stream.context().bind_to_thread().map_err(|e| Stalled::Cuda(format!("CUDA context: {e}")))?;
        let start = Instant::now();
        let deadline = start + timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: the stream is alive (held by the lane).
            match unsafe { cu::cuStreamQuery(self.stream.cu_stream()) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(Stalled::Cuda(format!("the CUDA stream failed: {other:?}"))),
            }
            self.async_error()?;
            let now = Instant::now();
            if now >= deadline {
                return Err(Stalled::TimedOut);
            }
            if now - start < SPIN {
                std::hint::spin_loop();
                continue;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// The communicator's asynchronous error, if NCCL has one.
    fn async_error(&self) -> Result<(), Stalled> {
        let mut error = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is alive; the out-parameter is valid.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut error) };
        match error {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            error => Err(Stalled::Nccl(error)),
        }
    }
}

/// The data-parallel group's second lane, and the one event (recorded anew for each queued
/// sum) through which its stream waits for the main stream's work so far.
struct Side {
    lane: Lane,
    after_main: CudaEvent,
}

/// One group's NCCL communicator, on the rank's stream.
pub struct NcclComm {
    main: Lane,
    /// The data-parallel group's second communicator, on a stream of its own: gradient
    /// buckets summed while backward goes on on the main stream (see
    /// [`Communicator::queue_all_reduce_device`]). Two communicators, not one on two streams,
    /// so that each keeps one order of operations on every rank.
    side: Option<Side>,
    /// Whether work is queued on the side lane that no [`Communicator::wait_queued`] has
    /// waited for.
    queued: AtomicBool,
    aborted: AtomicBool,
    /// The members as world ranks, in group-rank order.
    ranks: Vec<usize>,
    rank: usize,
    timeout: Duration,
    staging: Mutex<Staging>,
    broken: Mutex<Option<TimeoutInfo>>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; the trait's
// callers (one rank's engine) never call it concurrently, and the staging buffer is behind a
// mutex.
unsafe impl Send for NcclComm {}

fn nccl_type(s: &DeviceSlice) -> sys::ncclDataType_t {
    if s.bf16 { sys::ncclDataType_t::ncclBfloat16 } else { sys::ncclDataType_t::ncclFloat32 }
}

/// `ncclCommInitRank` for group rank `rank` of `size`, with the unique id published under
/// `key` in the store by the group's first rank.
fn init_rank(
    store: &mut StoreClient,
    key: &str,
    size: usize,
    rank: usize,
    stream: &CudaStream,
    group: &[usize],
) -> Result<sys::ncclComm_t, CommError> {
    let fail =
        |e: nccl::NcclError| CommError::Launch(format!("NCCL group {key} {}: {}", Ranks(group), nccl_message(&e)));
    let id_key = format!("nccl/{key}");
    let id = if rank == 0 {
        let id = nccl::get_uniqueid().map_err(fail)?;
        store.set(&id_key, &id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>())?;
        id
    } else {
        let bytes = store.get(&id_key)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if bytes.len() != internal.len() {
            return Err(CommError::Launch(format!(
                "NCCL group {key}: the unique id has {} bytes, not 128",
                bytes.len()
            )));
        }
        internal.iter_mut().zip(&bytes).for_each(|(c, b)| *c = *b as std::ffi::c_char);
        sys::ncclUniqueId { internal }
    };
    stream.context().bind_to_thread().map_err(|e| CommError::Launch(format!("CUDA context: {e}")))?;
    let mut comm = std::mem::MaybeUninit::uninit();
    // SAFETY: `comm` is written by a successful init; the id is the group's.
    unsafe {
        nccl::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32).map_err(fail)?;
        Ok(comm.assume_init())
    }
}

/// Whether a group can still be used: not after a timeout broke it (`broken` says which),
/// nor after NCCL's error aborted its communicators.
fn check_usable(
    op: &'static str,
    group: &[usize],
    broken: &Mutex<Option<TimeoutInfo>>,
    aborted: bool,
) -> Result<(), CommError> {
    match &*broken.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(cause) => Err(CommError::Broken { op, group: group.to_vec(), cause: cause.clone() }),
        None if aborted => Err(CommError::Invalid {
            op,
            group: group.to_vec(),
            message: "its NCCL communicators were aborted after an earlier NCCL error".into(),
        }),
        None => Ok(()),
    }
}

/// The error of a wait on one of a group's lanes that `stalled`. A timeout is kept in
/// `broken`, for every later call to report; it and an NCCL error abort the group's
/// communicators (`abort`), which also ends their kernels.
fn stalled_error(
    op: &'static str,
    group: &[usize],
    timeout: Duration,
    broken: &Mutex<Option<TimeoutInfo>>,
    stalled: Stalled,
    abort: impl FnOnce(),
) -> CommError {
    let invalid = |message: String| CommError::Invalid { op, group: group.to_vec(), message };
    match stalled {
        Stalled::Cuda(message) => invalid(message),
        Stalled::Nccl(error) => {
            abort();
            invalid(format!("NCCL reported {error:?}; its communicators were aborted"))
        }
        Stalled::TimedOut => {
            let info = TimeoutInfo { op, group: group.to_vec(), missing: Vec::new(), timeout };
            *broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
            abort();
            CommError::Timeout(info)
        }
    }
}

impl NcclComm {
    /// Joins the group `ranks` (world ranks, in group order) that contains `world_rank`,
    /// named `key` in the store, on `stream`; with `side`, also its second communicator on a
    /// new stream.
    fn join(
        store: &mut StoreClient,
        key: &str,
        ranks: Vec<usize>,
        world_rank: usize,
        stream: &Arc<CudaStream>,
        timeout: Duration,
        side: bool,
    ) -> Result<NcclComm, CommError> {
        let rank = ranks.iter().position(|&r| r == world_rank).expect("a rank joins its own groups");
        let main = Lane { comm: init_rank(store, key, ranks.len(), rank, stream, &ranks)?, stream: stream.clone() };
        let side = match side {
            false => None,
            true => {
                let cuda = |e: cudarc::driver::DriverError| CommError::Launch(format!("a CUDA stream for NCCL: {e}"));
                let lane = (|| {
                    let side_stream = stream.fork().map_err(cuda)?;
                    let after_main = stream.context().new_event(None).map_err(cuda)?;
                    let comm = init_rank(store, &format!("{key}/side"), ranks.len(), rank, &side_stream, &ranks)?;
                    Ok(Side { lane: Lane { comm, stream: side_stream }, after_main })
                })();
                match lane {
                    Ok(lane) => Some(lane),
                    Err(e) => {
                        // SAFETY: the main communicator was made above and is used nowhere else.
                        let _ = unsafe { nccl::comm_destroy(main.comm) };
                        return Err(e);
                    }
                }
            }
        };
        Ok(NcclComm {
            main,
            side,
            queued: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
            ranks,
            rank,
            timeout,
            staging: Mutex::new(Staging { ptr: 0, bytes: 0 }),
            broken: Mutex::new(None),
        })
    }

    fn invalid(&self, op: &'static str, message: impl Into<String>) -> CommError {
        CommError::Invalid { op, group: self.ranks.clone(), message: message.into() }
    }

    fn nccl_error(&self, op: &'static str, e: nccl::NcclError) -> CommError {
        self.invalid(op, format!("NCCL: {}", nccl_message(&e)))
    }

    fn check_broken(&self, op: &'static str) -> Result<(), CommError> {
        check_usable(op, &self.ranks, &self.broken, self.aborted.load(Ordering::SeqCst))
    }

    /// Waits for everything queued on `lane`'s stream, at most the timeout; past it, or on
    /// an asynchronous NCCL error, aborts the communicator.
    fn wait_lane(&self, op: &'static str, lane: &Lane) -> Result<(), CommError> {
        lane.wait(self.timeout)
            .map_err(|stalled| stalled_error(op, &self.ranks, self.timeout, &self.broken, stalled, || self.abort()))
    }

    fn wait(&self, op: &'static str) -> Result<(), CommError> {
        self.wait_lane(op, &self.main)
    }

    /// Aborts both lanes' communicators (which also ends their kernels on the device); later
    /// calls fail.
    fn abort(&self) {
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        for lane in std::iter::once(&self.main).chain(self.side.as_ref().map(|side| &side.lane)) {
            // SAFETY: aborting a live communicator, once (the flag above).
            let _ = unsafe { nccl::comm_abort(lane.comm) };
        }
    }

    /// A device buffer of at least `bytes`, for staging host slices.
    fn staging(&self, bytes: usize) -> Result<u64, CommError> {
        let mut st = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        st.at_least(bytes, &self.main.stream).map_err(|e| self.invalid("staging", e))
    }

    fn upload(&self, dst: u64, src: &[f32]) -> Result<(), CommError> {
        // SAFETY: `dst` holds at least `src.len()` f32 (the staging buffer).
        unsafe { driver::memcpy_htod_async(dst, src, self.main.stream.cu_stream()) }
            .map_err(|e| self.invalid("copy to the GPU", e.to_string()))
    }

    fn download(&self, dst: &mut [f32], src: u64) -> Result<(), CommError> {
        // SAFETY: `src` holds at least `dst.len()` f32; the stream was waited for, so the
        // (synchronous, pageable) copy does not wait on a collective.
        unsafe { driver::memcpy_dtoh_async(dst, src, self.main.stream.cu_stream()) }
            .map_err(|e| self.invalid("copy from the GPU", e.to_string()))?;
        self.wait("copy from the GPU")
    }

    /// A host slice's collective: stage `input` (at offset 0) and `out_len` floats of output
    /// (after it), run `run(in_ptr, out_ptr)` on the stream, wait, copy the output back.
    fn staged(
        &self,
        op: &'static str,
        input: &[f32],
        output: &mut [f32],
        run: impl FnOnce(u64, u64) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CommError> {
        self.check_broken(op)?;
        self.main.stream.context().bind_to_thread().map_err(|e| self.invalid(op, e.to_string()))?;
        let base = self.staging(4 * (input.len() + output.len()).max(1))?;
        let out_ptr = base + 4 * input.len() as u64;
        if !input.is_empty() {
            self.upload(base, input)?;
        }
        run(base, out_ptr).map_err(|e| self.nccl_error(op, e))?;
        self.wait(op)?;
        if !output.is_empty() {
            self.download(output, out_ptr)?;
        }
        Ok(())
    }

    /// A collective on device memory: `run(comm, stream)` queues it, then the stream is waited
    /// for (with the timeout).
    fn on_stream(
        &self,
        op: &'static str,
        run: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CommError> {
        self.check_broken(op)?;
        self.main.stream.context().bind_to_thread().map_err(|e| self.invalid(op, e.to_string()))?;
        run(self.main.comm, self.main.stream_ptr()).map_err(|e| self.nccl_error(op, e))?;
        self.wait(op)
    }

    fn stream_ptr(&self) -> sys::cudaStream_t {
        self.main.stream_ptr()
    }

    /// Queues `run(comm, stream)` on the side lane (which this communicator must have) after
    /// the work issued so far on the main stream; [`Communicator::wait_queued`] waits for it.
    fn queue(
        &self,
        op: &'static str,
        run: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<(), CommError> {
        let side = self.side.as_ref().expect("queued only on a communicator with a side lane");
        self.check_broken(op)?;
        let event = |e: cudarc::driver::DriverError| self.invalid(op, format!("CUDA event: {e}"));
        side.after_main.record(&self.main.stream).map_err(event)?;
        side.lane.stream.wait(&side.after_main).map_err(event)?;
        run(side.lane.comm, side.lane.stream_ptr()).map_err(|e| self.nccl_error(op, e))?;
        self.queued.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// `peer` (a root, destination or source) is a group rank, as the thread and TCP
    /// communicators check it.
    fn check_peer(&self, op: &'static str, what: &str, peer: usize) -> Result<(), CommError> {
        if peer < self.size() {
            return Ok(());
        }
        Err(self.invalid(op, format!("{what} {peer} is outside the group of {} ranks", self.size())))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Work still queued on the side lane (a step that failed midway) is waited for, at
        // most the timeout, which aborts the communicators if it runs out.
        if let Some(side) = &self.side
            && self.queued.load(Ordering::SeqCst)
            && !self.aborted.load(Ordering::SeqCst)
        {
            let _ = self.wait_lane("drop", &side.lane);
        }
        // SAFETY: each communicator is destroyed once; aborted ones need no destroy.
        unsafe {
            if !self.aborted.load(Ordering::SeqCst) {
                for lane in std::iter::once(&self.main).chain(self.side.as_ref().map(|side| &side.lane)) {
                    let _ = nccl::comm_destroy(lane.comm);
                }
            }
        }
        self.staging.get_mut().unwrap_or_else(|e| e.into_inner()).free(&self.main.stream);
    }
}

const F32: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
const SUM: sys::ncclRedOp_t = sys::ncclRedOp_t::ncclSum;

/// Queues the sum of `buf` over `comm`, in place, on `stream`.
///
/// # Safety
/// `buf` must be a live device allocation of `len` values of its type.
unsafe fn sum_in_place(
    buf: &DeviceSlice,
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
) -> Result<nccl::NcclStatus, nccl::NcclError> {
    let ptr = buf.ptr as *mut c_void;
    // SAFETY: forwarded from the caller; NCCL allows the input and output to be one buffer.
    unsafe { nccl::all_reduce(ptr, ptr, buf.len, nccl_type(buf), SUM, comm, stream) }
}

/// NCCL's reduce of `buf` in place into group rank `root`.
///
/// # Safety
/// As [`sum_in_place`].
unsafe fn reduce_in_place(
    buf: &DeviceSlice,
    root: usize,
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
) -> Result<nccl::NcclStatus, nccl::NcclError> {
    let ptr = buf.ptr as *mut c_void;
    // SAFETY: forwarded from the caller; in place is allowed (the root's input is its output).
    unsafe { nccl::reduce(ptr, ptr, buf.len, nccl_type(buf), SUM, root as c_int, comm, stream) }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.ranks.len()
    }

    fn world_ranks(&self) -> &[usize] {
        &self.ranks
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let input = buf.to_vec();
        let (n, comm, stream) = (buf.len(), self.main.comm, self.stream_ptr());
        // SAFETY (every staged call): the pointers are the staging buffer's input and output
        // regions, of the lengths given.
        self.staged("all_reduce_sum", &input, buf, |i, o| unsafe {
            nccl::all_reduce(i as *const c_void, o as *mut c_void, n, F32, SUM, comm, stream)
        })
    }

    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = output.len();
        if input.len() != self.size() * n {
            return Err(self.invalid(
                "reduce_scatter_sum",
                format!("input has {} elements; it must be size {} x output {n}", input.len(), self.size()),
            ));
        }
        let (comm, stream) = (self.main.comm, self.stream_ptr());
        self.staged("reduce_scatter_sum", input, output, |i, o| unsafe {
            nccl::reduce_scatter(i as *const c_void, o as *mut c_void, n, F32, SUM, comm, stream)
        })
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = input.len();
        if output.len() != self.size() * n {
            return Err(self.invalid(
                "all_gather",
                format!("output has {} elements; it must be size {} x input {n}", output.len(), self.size()),
            ));
        }
        let (comm, stream) = (self.main.comm, self.stream_ptr());
        self.staged("all_gather", input, output, |i, o| unsafe {
            nccl::all_gather(i as *const c_void, o as *mut c_void, n, F32, comm, stream)
        })
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.check_peer("broadcast", "root", root)?;
        let input = buf.to_vec();
        let (n, comm, stream) = (buf.len(), self.main.comm, self.stream_ptr());
        self.staged("broadcast", &input, buf, |i, o| unsafe {
            nccl::broadcast(i as *const c_void, o as *mut c_void, n, F32, root as i32, comm, stream)
        })
    }

    fn send(&self, buf: &[f32], to: usize) -> Result<(), CommError> {
        self.check_peer("send", "destination", to)?;
        let (n, comm, stream) = (buf.len(), self.main.comm, self.stream_ptr());
        self.staged("send", buf, &mut [], |i, _| unsafe {
            nccl::send(i as *const c_void, n, F32, to as i32, comm, stream)
        })
    }

    fn recv(&self, buf: &mut [f32], from: usize) -> Result<(), CommError> {
        self.check_peer("recv", "source", from)?;
        let (n, comm, stream) = (buf.len(), self.main.comm, self.stream_ptr());
        self.staged("recv", &[], buf, |_, o| unsafe { nccl::recv(o as *mut c_void, n, F32, from as i32, comm, stream) })
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.all_reduce_sum(&mut [0.0]).map_err(|e| match e {
            CommError::Invalid { group, message, .. } => CommError::Invalid { op: "barrier", group, message },
            other => other,
        })
    }

    fn takes(&self, slice: &DeviceSlice) -> bool {
        !slice.host
    }

    fn all_reduce_device(&self, buf: DeviceSlice) -> Result<(), CommError> {
        // SAFETY: `buf` is a live device view of the backend (the caller's contract).
        self.on_stream("all_reduce_device", |comm, stream| unsafe { sum_in_place(&buf, comm, stream) })
    }

    fn all_gather_device(&self, input: DeviceSlice, output: DeviceSlice) -> Result<(), CommError> {
        const OP: &str = "all_gather_device";
        if output.len != self.size() * input.len || input.bf16 != output.bf16 {
            return Err(self.invalid(OP, format!("output {output:?} is not size {} x input {input:?}", self.size())));
        }
        // SAFETY: live device views of the stated lengths.
        self.on_stream(OP, |comm, stream| unsafe {
            nccl::all_gather(
                input.ptr as *const c_void,
                output.ptr as *mut c_void,
                input.len,
                nccl_type(&input),
                comm,
                stream,
            )
        })
    }

    fn reduce_scatter_device(&self, input: DeviceSlice, output: DeviceSlice) -> Result<(), CommError> {
        const OP: &str = "reduce_scatter_device";
        if input.len != self.size() * output.len || input.bf16 != output.bf16 {
            return Err(self.invalid(OP, format!("input {input:?} is not size {} x output {output:?}", self.size())));
        }
        // SAFETY: live device views of the stated lengths.
        self.on_stream(OP, |comm, stream| unsafe {
            nccl::reduce_scatter(
                input.ptr as *const c_void,
                output.ptr as *mut c_void,
                output.len,
                nccl_type(&input),
                SUM,
                comm,
                stream,
            )
        })
    }

    fn reduce_device(&self, buf: DeviceSlice, root: usize) -> Result<(), CommError> {
        const OP: &str = "reduce_device";
        self.check_peer(OP, "root", root)?;
        // SAFETY: `buf` is a live device view of the backend (the caller's contract).
        self.on_stream(OP, |comm, stream| unsafe { reduce_in_place(&buf, root, comm, stream) })
    }

    /// On the side lane where this communicator has one (the data-parallel group's): the
    /// side stream waits for an event recorded now on the main stream, so the sum starts once
    /// the gradients are final and runs beside the backward kernels queued after it.
    fn queue_all_reduce_device(&self, buf: DeviceSlice) -> Result<(), CommError> {
        if self.side.is_none() {
            return self.all_reduce_device(buf);
        }
        // SAFETY: `buf` is a live device view of the backend (the caller's contract), which the
        // caller leaves alone until wait_queued.
        self.queue("queue_all_reduce_device", |comm, stream| unsafe { sum_in_place(&buf, comm, stream) })
    }

    /// As [`NcclComm::queue_all_reduce_device`], a reduce into `root`.
    fn queue_reduce_device(&self, buf: DeviceSlice, root: usize) -> Result<(), CommError> {
        const OP: &str = "queue_reduce_device";
        if self.side.is_none() {
            return self.reduce_device(buf, root);
        }
        self.check_peer(OP, "root", root)?;
        // SAFETY: as in queue_all_reduce_device.
        self.queue(OP, |comm, stream| unsafe { reduce_in_place(&buf, root, comm, stream) })
    }

    /// Waits for the side stream (at most the timeout): work issued after this returns comes
    /// after the sums, with no event needed.
    fn wait_queued(&self) -> Result<(), CommError> {
        const OP: &str = "wait_queued";
        let Some(side) = &self.side else { return Ok(()) };
        if !self.queued.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        self.check_broken(OP)?;
        self.wait_lane(OP, &side.lane)
    }
}

impl RankComms<Box<dyn Communicator>> {
    /// The communicators of world rank `rank` of `mesh`, over NCCL on `stream` (the rank's
    /// backend's), finding the other ranks through `store`. With pipeline stages, `pp` and
    /// `pp_back` are [`NcclPipe`]s (forward and backward around the ring), whose sends are
    /// buffered as the schedules need. Every rank must call it; each group's communicator is
    /// made in the same order on all of them.
    pub fn nccl(
        mesh: Mesh,
        rank: usize,
        store: &mut StoreClient,
        stream: &Arc<CudaStream>,
        timeout: Duration,
    ) -> Result<RankComms<Box<dyn Communicator>>, CommError> {
        if !nccl_available() {
            return Err(CommError::Launch(
                "libnccl.so is not on the library path (NVIDIA's nvidia-nccl-cu13 wheel ships it as libnccl.so.2: \
                 link libnccl.so to it in a directory on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        let coords = mesh.coords(rank)?;
        let mine = |groups: Vec<Vec<usize>>| {
            groups.into_iter().enumerate().find(|(_, g)| g.contains(&rank)).expect("every rank is in a group")
        };
        let join = |store: &mut StoreClient, kind: &str, groups: Vec<Vec<usize>>, side: bool| {
            let (index, group) = mine(groups);
            let comm = NcclComm::join(store, &format!("{kind}/{index}"), group, rank, stream, timeout, side)?;
            Ok::<Box<dyn Communicator>, CommError>(Box::new(comm))
        };
        let pipe = |store: &mut StoreClient, kind: &str, direction: Direction| {
            let (index, group) = mine(mesh.pp_groups());
            let pipe = NcclPipe::join(store, &format!("{kind}/{index}"), group, rank, direction, stream, timeout)?;
            Ok::<Box<dyn Communicator>, CommError>(Box::new(pipe))
        };
        let world = join(store, "world", vec![(0..mesh.world()).collect()], false)?;
        let tp = join(store, "tp", mesh.tp_groups(), false)?;
        if mesh.pp > 1 && std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").is_ok_and(|v| v.trim() == "1") {
            // One hardware queue takes every stream's work in one order, so a pipeline send
            // waiting for its receiver can hold up this rank's own receives behind it.
            return Err(CommError::Launch(
                "CUDA_DEVICE_MAX_CONNECTIONS=1 puts every CUDA stream on one hardware queue, where a pipeline \
                 send waiting for its receiver can hold up the receives behind it (a deadlock across ranks); \
                 unset it for parallelism.pp > 1"
                    .into(),
            ));
        }
        let [pp, pp_back] = match mesh.pp {
            1 => [join(store, "pp", mesh.pp_groups(), false)?, join(store, "pp_back", mesh.pp_groups(), false)?],
            _ => [pipe(store, "pp", Direction::Forward)?, pipe(store, "pp_back", Direction::Backward)?],
        };
        // Gradient buckets are summed over dp beside backward (the side lane; made at dp 1 too,
        // so that a one-GPU machine runs it).
        let dp = join(store, "dp", mesh.dp_groups(), true)?;
        Ok(RankComms { mesh, coords, world, tp, pp, pp_back, dp })
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of group {})", self.rank, Ranks(&self.ranks))
    }
}
