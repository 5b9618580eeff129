//! [`ThreadComm`]: ranks are threads of one process that share memory. It makes every parallel
//! layout testable on one CPU machine, and it is the reference the NCCL communicator's results
//! are compared against.
//!
//! # How a collective runs
//! The group shares one mutex-protected round. Each rank deposits a copy of its input (its
//! "contribution") and waits on a condition variable; the last rank to arrive publishes all
//! contributions, in rank order, as the round's result and bumps the generation counter. Every
//! rank then computes its own output from that shared, read-only result. A rank that finished a
//! round cannot complete the next one before the slow readers of this one have read it (the next
//! round needs them to arrive too), so one published result at a time is enough.
//!
//! # Why reductions are summed in rank order
//! Floating-point addition is not associative, so a sum that follows arrival order would change
//! in the last bits from run to run, and a loss curve would not be reproducible. Here every rank
//! computes `((x_0 + x_1) + x_2) + ...` over the published contributions in rank order: the bits
//! depend only on the inputs, every rank gets the same bits, and runs repeat exactly. The cost is
//! that all-reduce does `size` times the arithmetic of a ring (each rank sums the whole buffer);
//! that is acceptable for a CPU test communicator and buys simplicity.
//!
//! # How the timeout works
//! Each wait is a `Condvar::wait_timeout` against a deadline taken when the rank arrived. A rank
//! whose deadline passes records which members have not deposited a contribution (the missing
//! ranks), marks the group broken with that record and wakes the others, which fail with the same
//! [`TimeoutInfo`]. Every later operation on the group fails at once with
//! [`CommError::Broken`], including on the rank that arrives late, so no thread is left waiting.
//!
//! # Point-to-point
//! `send` deposits a copy in a per-(sender, receiver) queue and returns; `recv` takes the oldest
//! message from that queue, waiting with the same timeout. Sends are therefore buffered here, but
//! the [`Communicator`] contract does not promise it, so callers pair sends and receives as they
//! must for NCCL.
//!
//! # Queued collectives
//! `queue_all_reduce_device` and `queue_reduce_device` read the buffer when called and run the
//! collective, writing the buffer, at `wait_queued`: the earliest read and the latest write
//! NCCL's side stream may make, so device-path tests see a kernel that touches a bucket between
//! the two.

use crate::comm::{Communicator, read_host, write_host};
use crate::error::{CommError, Ranks, TimeoutInfo};
use ondol_core::DeviceSlice;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A communicator whose ranks are threads of this process. Create a whole group at once with
/// [`ThreadComm::group`] or [`ThreadComm::partition`] and move one communicator into each thread.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Collectives queued on device memory, run at `wait_queued`.
    queued: Mutex<Vec<Queued>>,
}

/// A queued collective: the buffer, the root of a reduce (None: an all-reduce), and the
/// buffer's values when it was queued.
struct Queued {
    slice: DeviceSlice,
    root: Option<usize>,
    values: Vec<f32>,
}

struct Shared {
    /// The members as world ranks, indexed by group rank.
    ranks: Vec<usize>,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

/// Which collective a round is, so that ranks calling different ones are caught.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct OpKey {
    name: &'static str,
    root: usize,
}

struct State {
    /// Counts completed rounds; a waiter is done when it changes.
    generation: u64,
    /// The collective of the round in progress, set by its first arrival.
    op: Option<OpKey>,
    /// Contributions of the round in progress, indexed by group rank.
    arrived: Vec<Option<Vec<f32>>>,
    /// Contributions of the last completed round, until every member has read them.
    result: Option<Arc<Vec<Vec<f32>>>>,
    unread: usize,
    /// Point-to-point messages keyed by (sender, receiver) group ranks.
    mailbox: HashMap<(usize, usize), VecDeque<Vec<f32>>>,
    /// Set by the first timeout; every later operation fails with it.
    broken: Option<TimeoutInfo>,
}

impl ThreadComm {
    fn new(rank: usize, shared: Arc<Shared>) -> Self {
        Self { rank, shared, queued: Mutex::new(Vec::new()) }
    }

    /// Reads `slice` now for a collective run at `wait_queued`.
    fn queue(&self, op: &'static str, slice: DeviceSlice, root: Option<usize>) -> Result<(), CommError> {
        let values = read_host(op, &self.shared.ranks, &slice)?;
        self.queued.lock().unwrap_or_else(|e| e.into_inner()).push(Queued { slice, root, values });
        Ok(())
    }

    /// One communicator per rank of a group of `n` ranks (world ranks `0..n`), in rank order.
    pub fn group(n: usize, timeout: Duration) -> Vec<ThreadComm> {
        Self::with_ranks((0..n).collect(), timeout)
    }

    /// Communicators for disjoint sub-groups of a world of `world` ranks, e.g. the tp groups of a
    /// mesh. Every world rank must be in exactly one group; the group's rank order is the order
    /// given. Returns the communicator of each world rank, indexed by world rank.
    pub fn partition(world: usize, groups: &[Vec<usize>], timeout: Duration) -> Result<Vec<ThreadComm>, CommError> {
        let mut slots: Vec<Option<ThreadComm>> = (0..world).map(|_| None).collect();
        for group in groups {
            if group.is_empty() {
                return Err(CommError::Layout("a communicator group is empty".into()));
            }
            for comm in Self::with_ranks(group.clone(), timeout) {
                let r = comm.shared.ranks[comm.rank];
                match slots.get_mut(r) {
                    None => return Err(CommError::Layout(format!("rank {r} is outside the world of {world} ranks"))),
                    Some(Some(_)) => return Err(CommError::Layout(format!("rank {r} is in more than one group"))),
                    Some(slot) => *slot = Some(comm),
                }
            }
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(r, c)| c.ok_or_else(|| CommError::Layout(format!("rank {r} is in no group"))))
            .collect()
    }

    fn with_ranks(ranks: Vec<usize>, timeout: Duration) -> Vec<ThreadComm> {
        let n = ranks.len();
        let shared = Arc::new(Shared {
            ranks,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                op: None,
                arrived: vec![None; n],
                result: None,
                unread: 0,
                mailbox: HashMap::new(),
                broken: None,
            }),
            wake: Condvar::new(),
        });
        (0..n).map(|rank| ThreadComm::new(rank, shared.clone())).collect()
    }

    /// The timeout every operation of this communicator waits at most.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// A panic on another thread while it held the lock leaves the state consistent (every
    /// mutation below is a single step), so a poisoned lock is used as it is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn invalid(&self, op: &'static str, message: impl Into<String>) -> CommError {
        CommError::Invalid { op, group: self.shared.ranks.clone(), message: message.into() }
    }

    fn broken(&self, op: &'static str, cause: &TimeoutInfo) -> CommError {
        CommError::Broken { op, group: self.shared.ranks.clone(), cause: cause.clone() }
    }

    /// Marks the group broken by a timeout of `op` waiting for `missing` (group ranks) and wakes
    /// every waiter.
    fn break_group(&self, st: &mut State, op: &'static str, missing: impl Iterator<Item = usize>) -> TimeoutInfo {
        let info = TimeoutInfo {
            op,
            group: self.shared.ranks.clone(),
            missing: missing.map(|r| self.shared.ranks[r]).collect(),
            timeout: self.shared.timeout,
        };
        st.broken = Some(info.clone());
        self.shared.wake.notify_all();
        info
    }

    /// Deposits `data` for the round of collective `key` and returns every rank's contribution
    /// once all have arrived.
    fn exchange(&self, key: OpKey, data: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>, CommError> {
        let op = key.name;
        let mut st = self.lock();
        if let Some(cause) = &st.broken {
            return Err(self.broken(op, cause));
        }
        match st.op {
            Some(other) if other != key => {
                return Err(self.invalid(
                    op,
                    format!(
                        "rank {} called {op} (root {}) while other ranks are in {} (root {})",
                        self.shared.ranks[self.rank], key.root, other.name, other.root
                    ),
                ));
            }
            _ => st.op = Some(key),
        }
        st.arrived[self.rank] = Some(data);
        if st.arrived.iter().all(Option::is_some) {
            let all: Vec<Vec<f32>> = st.arrived.iter_mut().map(|c| c.take().unwrap_or_default()).collect();
            let result = Arc::new(all);
            st.generation += 1;
            st.op = None;
            st.unread = self.size() - 1;
            st.result = (st.unread > 0).then(|| result.clone());
            self.shared.wake.notify_all();
            return Ok(result);
        }
        let generation = st.generation;
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            if st.generation != generation {
                let result = st.result.clone().expect("a completed round keeps its result until all members read it");
                st.unread -= 1;
                if st.unread == 0 {
                    st.result = None;
                }
                return Ok(result);
            }
            if let Some(cause) = &st.broken {
                return Err(CommError::Timeout(cause.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..self.size()).filter(|&r| st.arrived[r].is_none()).collect();
                let info = self.break_group(&mut st, op, missing.into_iter());
                return Err(CommError::Timeout(info));
            }
            st = self.shared.wake.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Fails unless every contribution has `len` elements.
    fn check_lengths(&self, op: &'static str, parts: &[Vec<f32>], len: usize) -> Result<(), CommError> {
        if parts.iter().all(|p| p.len() == len) {
            return Ok(());
        }
        let lengths: Vec<String> =
            parts.iter().enumerate().map(|(r, p)| format!("rank {}: {}", self.shared.ranks[r], p.len())).collect();
        Err(self.invalid(op, format!("buffer lengths differ across ranks ({})", lengths.join(", "))))
    }

    fn check_peer(&self, op: &'static str, what: &str, peer: usize) -> Result<(), CommError> {
        if peer < self.size() {
            return Ok(());
        }
        Err(self.invalid(op, format!("{what} {peer} is outside the group of {} ranks", self.size())))
    }
}

/// `out` = the elementwise sum of `parts` added in order: `((p0 + p1) + p2) + ...`.
fn sum_in_order<'a>(out: &mut [f32], mut parts: impl Iterator<Item = &'a [f32]>) {
    if let Some(first) = parts.next() {
        out.copy_from_slice(first);
    }
    for part in parts {
        for (o, x) in out.iter_mut().zip(part) {
            *o += x;
        }
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.ranks.len()
    }

    fn world_ranks(&self) -> &[usize] {
        &self.shared.ranks
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "all_reduce_sum";
        let parts = self.exchange(OpKey { name: OP, root: 0 }, buf.to_vec())?;
        self.check_lengths(OP, &parts, buf.len())?;
        sum_in_order(buf, parts.iter().map(Vec::as_slice));
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "reduce_scatter_sum";
        let n = output.len();
        if input.len() != self.size() * n {
            return Err(self.invalid(
                OP,
                format!("input has {} elements; it must be size {} x output {n}", input.len(), self.size()),
            ));
        }
        let parts = self.exchange(OpKey { name: OP, root: 0 }, input.to_vec())?;
        self.check_lengths(OP, &parts, input.len())?;
        let chunk = self.rank * n..(self.rank + 1) * n;
        sum_in_order(output, parts.iter().map(|p| &p[chunk.clone()]));
        Ok(())
    }

    /// A reduce proper: the other ranks' buffers keep their values, so a caller that reads a
    /// sum on the wrong rank sees it in tests.
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const OP: &str = "reduce_sum";
        self.check_peer(OP, "root", root)?;
        let parts = self.exchange(OpKey { name: OP, root }, buf.to_vec())?;
        self.check_lengths(OP, &parts, buf.len())?;
        if self.rank == root {
            sum_in_order(buf, parts.iter().map(Vec::as_slice));
        }
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        const OP: &str = "all_gather";
        let n = input.len();
        if output.len() != self.size() * n {
            return Err(self.invalid(
                OP,
                format!("output has {} elements; it must be size {} x input {n}", output.len(), self.size()),
            ));
        }
        let parts = self.exchange(OpKey { name: OP, root: 0 }, input.to_vec())?;
        self.check_lengths(OP, &parts, n)?;
        for (dst, part) in output.chunks_exact_mut(n.max(1)).zip(parts.iter()) {
            dst.copy_from_slice(part);
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        self.check_peer(OP, "root", root)?;
        let data = if self.rank == root { buf.to_vec() } else { Vec::new() };
        let parts = self.exchange(OpKey { name: OP, root }, data)?;
        let src = &parts[root];
        if src.len() != buf.len() {
            return Err(self.invalid(
                OP,
                format!(
                    "root {} sent {} elements but rank {} expects {}",
                    self.shared.ranks[root],
                    src.len(),
                    self.shared.ranks[self.rank],
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(src);
        Ok(())
    }

    fn send(&self, buf: &[f32], to: usize) -> Result<(), CommError> {
        const OP: &str = "send";
        self.check_peer(OP, "destination", to)?;
        let mut st = self.lock();
        if let Some(cause) = &st.broken {
            return Err(self.broken(OP, cause));
        }
        st.mailbox.entry((self.rank, to)).or_default().push_back(buf.to_vec());
        self.shared.wake.notify_all();
        Ok(())
    }

    fn recv(&self, buf: &mut [f32], from: usize) -> Result<(), CommError> {
        const OP: &str = "recv";
        self.check_peer(OP, "source", from)?;
        let deadline = Instant::now() + self.shared.timeout;
        let mut st = self.lock();
        loop {
            if let Some(cause) = &st.broken {
                return Err(self.broken(OP, cause));
            }
            if let Some(msg) = st.mailbox.get_mut(&(from, self.rank)).and_then(VecDeque::pop_front) {
                if msg.len() != buf.len() {
                    return Err(self.invalid(
                        OP,
                        format!(
                            "rank {} sent {} elements but rank {} receives {}",
                            self.shared.ranks[from],
                            msg.len(),
                            self.shared.ranks[self.rank],
                            buf.len()
                        ),
                    ));
                }
                buf.copy_from_slice(&msg);
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let info = self.break_group(&mut st, OP, std::iter::once(from));
                return Err(CommError::Timeout(info));
            }
            st = self.shared.wake.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange(OpKey { name: "barrier", root: 0 }, Vec::new()).map(drop)
    }

    fn duplicate(&self) -> Option<Box<dyn Communicator>> {
        Some(Box::new(ThreadComm::new(self.rank, self.shared.clone())))
    }

    fn queue_all_reduce_device(&self, buf: DeviceSlice) -> Result<(), CommError> {
        self.queue("queue_all_reduce_device", buf, None)
    }

    fn queue_reduce_device(&self, buf: DeviceSlice, root: usize) -> Result<(), CommError> {
        const OP: &str = "queue_reduce_device";
        self.check_peer(OP, "root", root)?;
        self.queue(OP, buf, Some(root))
    }

    /// Runs the queued collectives in order; a reduce writes its root's buffer only (NCCL's
    /// in-place reduce leaves the others as they are).
    fn wait_queued(&self) -> Result<(), CommError> {
        let queued = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
        for Queued { slice, root, mut values } in queued {
            match root {
                None => self.all_reduce_sum(&mut values)?,
                Some(root) => {
                    self.reduce_sum(&mut values, root)?;
                    if root != self.rank {
                        continue;
                    }
                }
            }
            write_host(&slice, &values);
        }
        Ok(())
    }
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadComm(rank {} of group {})", self.rank, Ranks(&self.shared.ranks))
    }
}
