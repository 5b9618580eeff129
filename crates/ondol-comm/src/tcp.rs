//! [`TcpComm`]: ranks are processes (one per `ondol launch` rank, possibly on several nodes)
//! connected pairwise over TCP. It carries multi-process training on CPUs, and it gives the same
//! bits as [`crate::ThreadComm`], so a launched run can be checked against a threaded one.
//!
//! # Connections
//! [`TcpNet::connect`] joins the job through the rendezvous store: every rank listens on a free
//! port of the address it reaches the store from, publishes `host:port` under `tcp/addr/{rank}`,
//! connects to every lower rank and accepts every higher one, so each pair of ranks shares one
//! connection. A hello (magic, rank, world size) on each connection catches a stray or mismatched
//! peer. One reader thread per connection drains it into per-(channel, peer) queues, so a send
//! never waits for the receiver to call `recv` (the queues buffer, as ThreadComm's mailboxes do).
//!
//! # Channels
//! Every communicator of a rank is a *channel* over the same connections: the world, tp, pp,
//! pp-back and dp groups ([`RankComms::tcp`]). Two ranks share at most one group per channel, so
//! a message's channel and sender say which communicator it belongs to. Within a channel,
//! collectives and point-to-point messages have queues of their own, each first in, first out.
//!
//! # Frames
//! A 32-byte little-endian header, then the payload: `op u8, 3 bytes zero, channel u32, payload
//! bytes u64, total u64, root u64`. `total` is the length of the sender's whole buffer and `root`
//! the collective's root, so that ranks that disagree on either are told so, like ranks that call
//! different collectives (`op`). Payloads are f32 in native (little-endian) order.
//!
//! # Collectives
//! All-reduce is a reduce-scatter followed by an all-gather, each a direct exchange: rank r owns
//! chunk r of the buffer, receives that chunk from every rank and sums the contributions in rank
//! order, `((x_0 + x_1) + x_2) + ...`, exactly as ThreadComm does, then sends the sum to everyone.
//! Each rank sends and receives `2 (p - 1) / p` of the buffer, the bandwidth of a ring (see the
//! crate docs), in one round instead of `2 (p - 1)` steps; the price is `p - 1` connections per
//! rank, which is right for the tens of CPU ranks this communicator is for.
//!
//! # Failures
//! An operation waits at most the net's timeout. A rank that times out marks the channel broken
//! and tells the group's other ranks (an abort frame carrying the cause), which fail at once
//! instead of waiting out their own timeouts: with the same [`CommError::Timeout`] if they wait
//! in the same operation, else with [`CommError::Broken`], as ThreadComm reports them. A peer
//! whose connection ends (its process exited) fails every wait on it at once, naming it
//! ([`CommError::Lost`]).

use crate::comm::Communicator;
use crate::error::{CommError, Ranks, TimeoutInfo};
use crate::mesh::{Mesh, RankComms};
use crate::store::StoreClient;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

#[cfg(target_endian = "big")]
compile_error!("TcpComm sends f32 payloads in native order, which must be little-endian");

const HELLO: &[u8; 8] = b"ondolTCP";
const HEADER: usize = 32;

/// What a frame is: the collective it belongs to, a point-to-point message, or an abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce = 1,
    ReduceScatter = 2,
    AllGather = 3,
    Broadcast = 4,
    Barrier = 5,
    P2p = 6,
    Abort = 7,
    Reduce = 8,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        [Op::AllReduce, Op::ReduceScatter, Op::AllGather, Op::Broadcast, Op::Barrier, Op::P2p, Op::Abort, Op::Reduce]
            .into_iter()
            .find(|op| *op as u8 == v)
    }

    /// The name of the [`Communicator`] method, as errors print it.
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce_sum",
            Op::ReduceScatter => "reduce_scatter_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::P2p => "send",
            Op::Abort => "abort",
            Op::Reduce => "reduce_sum",
        }
    }
}

/// The channel of each communicator of a rank.
const WORLD: u32 = 0;
const TP: u32 = 1;
const PP: u32 = 2;
const PP_BACK: u32 = 3;
const DP: u32 = 4;

struct Message {
    op: Op,
    total: u64,
    root: u64,
    data: Vec<f32>,
}

#[derive(Default)]
struct Inbox {
    /// Messages keyed by (channel, sender world rank, point-to-point?).
    queues: HashMap<(u32, usize, bool), VecDeque<Message>>,
    /// Peers whose connection ended, and how.
    lost: HashMap<usize, String>,
    /// Channels broken by a timeout here or on another rank of the group.
    broken: HashMap<u32, TimeoutInfo>,
}

struct Shared {
    inbox: Mutex<Inbox>,
    arrived: Condvar,
    /// Set when this rank closes its connections, so that readers exit quietly.
    closing: AtomicBool,
}

impl Shared {
    /// A panic while the lock was held leaves the inbox consistent (every change is one step).
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// This rank's connections to every other rank of the job; shared by its communicators.
pub struct TcpNet {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The write side of the connection to each rank (None for this rank).
    writers: Vec<Option<Mutex<TcpStream>>>,
    shared: Arc<Shared>,
}

impl TcpNet {
    /// Connects this rank (the store client's rank) to every other rank of a job of `world`
    /// ranks, finding them through the store. Every rank must call it; it returns once this
    /// rank is connected to all the others, or fails after `timeout`, which is also the wait
    /// of every later operation.
    pub fn connect(store: &mut StoreClient, world: usize, timeout: Duration) -> Result<Arc<TcpNet>, CommError> {
        let rank = store.rank();
        let fail = |message: String| CommError::Launch(format!("rank {rank} connecting to the other ranks: {message}"));
        if rank >= world {
            return Err(fail(format!("rank {rank} is outside a world of {world}")));
        }
        // The address this host reaches the store from is one the other hosts can reach too.
        let ip = store.local_addr()?.ip();
        let listener =
            TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| fail(format!("cannot listen on {ip}: {e}")))?;
        let me = listener.local_addr().map_err(|e| fail(e.to_string()))?;
        store.set(&format!("tcp/addr/{rank}"), me.to_string().as_bytes())?;

        let deadline = Instant::now() + timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (peer, slot) in streams.iter_mut().enumerate().take(rank) {
            let addr = String::from_utf8_lossy(&store.get(&format!("tcp/addr/{peer}"))?).into_owned();
            let addr: SocketAddr =
                addr.parse().map_err(|_| fail(format!("rank {peer} published a bad address {addr:?}")))?;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            let mut s = TcpStream::connect_timeout(&addr, left)
                .map_err(|e| fail(format!("cannot connect to rank {peer} at {addr}: {e}")))?;
            write_hello(&mut s, rank, world).map_err(|e| fail(format!("hello to rank {peer}: {e}")))?;
            *slot = Some(s);
        }
        listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        let mut waiting = world - 1 - rank;
        while waiting > 0 {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| fail(e.to_string()))?;
                    s.set_read_timeout(Some(
                        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)),
                    ))
                    .map_err(|e| fail(e.to_string()))?;
                    let peer = read_hello(&mut s, world).map_err(|e| fail(format!("hello from {from}: {e}")))?;
                    if peer <= rank || streams[peer].is_some() {
                        return Err(fail(format!(
                            "{from} introduced itself as rank {peer}, which is not expected here"
                        )));
                    }
                    s.set_read_timeout(None).map_err(|e| fail(e.to_string()))?;
                    streams[peer] = Some(s);
                    waiting -= 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> =
                            (rank + 1..world).filter(|&r| streams[r].is_none()).map(|r| r.to_string()).collect();
                        return Err(fail(format!(
                            "rank(s) {} did not connect within {:.1} s",
                            missing.join(", "),
                            timeout.as_secs_f64()
                        )));
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(fail(format!("accept: {e}"))),
            }
        }

        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            arrived: Condvar::new(),
            closing: AtomicBool::new(false),
        });
        let mut writers = Vec::with_capacity(world);
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                writers.push(None);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let reader = stream.try_clone().map_err(|e| fail(e.to_string()))?;
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("ondol-tcp-{peer}"))
                .spawn(move || read_frames(reader, peer, &shared))
                .map_err(|e| fail(format!("cannot start a reader thread: {e}")))?;
            writers.push(Some(Mutex::new(stream)));
        }
        Ok(Arc::new(TcpNet { rank, world, timeout, writers, shared }))
    }

    /// This rank's index in the world.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks in the job.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Writes one frame to world rank `to`.
    fn send_frame(&self, to: usize, op: Op, channel: u32, total: usize, root: usize, payload: &[u8]) -> io::Result<()> {
        let Some(writer) = &self.writers[to] else { unreachable!("a rank never sends to itself") };
        let mut header = [0u8; HEADER];
        header[0] = op as u8;
        header[4..8].copy_from_slice(&channel.to_le_bytes());
        header[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        header[16..24].copy_from_slice(&(total as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(root as u64).to_le_bytes());
        let mut stream = writer.lock().unwrap_or_else(|e| e.into_inner());
        stream.write_all(&header)?;
        stream.write_all(payload)
    }
}

impl Drop for TcpNet {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        for w in self.writers.iter().flatten() {
            let _ = w.lock().unwrap_or_else(|e| e.into_inner()).shutdown(Shutdown::Both);
        }
    }
}

fn write_hello(s: &mut TcpStream, rank: usize, world: usize) -> io::Result<()> {
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&(rank as u64).to_le_bytes());
    hello.extend_from_slice(&(world as u64).to_le_bytes());
    s.write_all(&hello)
}

/// Reads a peer's hello and returns its rank.
fn read_hello(s: &mut TcpStream, world: usize) -> io::Result<usize> {
    let mut hello = [0u8; 24];
    s.read_exact(&mut hello)?;
    let field = |i: usize| u64::from_le_bytes(hello[i..i + 8].try_into().expect("8 bytes")) as usize;
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    if &hello[..8] != HELLO {
        return Err(bad("not an ondol rank".into()));
    }
    if field(16) != world {
        return Err(bad(format!("the peer thinks the world has {} ranks, not {world}", field(16))));
    }
    if field(8) >= world {
        return Err(bad(format!("rank {} is outside the world", field(8))));
    }
    Ok(field(8))
}

/// The reader thread of the connection to world rank `peer`: files every frame into the inbox
/// until the connection ends.
fn read_frames(mut stream: TcpStream, peer: usize, shared: &Shared) {
    let ended = loop {
        let mut header = [0u8; HEADER];
        if let Err(e) = stream.read_exact(&mut header) {
            break e;
        }
        let field = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
        let channel = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let (bytes, total, root) = (field(8) as usize, field(16), field(24));
        let Some(op) = Op::from_u8(header[0]) else {
            break io::Error::new(io::ErrorKind::InvalidData, format!("a frame with unknown op {}", header[0]));
        };
        if op == Op::Abort {
            let mut cause = vec![0u8; bytes];
            if let Err(e) = stream.read_exact(&mut cause) {
                break e;
            }
            if let Some(info) = decode_timeout(&cause) {
                shared.lock().broken.entry(channel).or_insert(info);
                shared.arrived.notify_all();
            }
            continue;
        }
        if !bytes.is_multiple_of(4) {
            break io::Error::new(io::ErrorKind::InvalidData, format!("a payload of {bytes} bytes is not f32s"));
        }
        let mut data = vec![0f32; bytes / 4];
        if let Err(e) = stream.read_exact(f32_bytes_mut(&mut data)) {
            break e;
        }
        let key = (channel, peer, op == Op::P2p);
        shared.lock().queues.entry(key).or_default().push_back(Message { op, total, root, data });
        shared.arrived.notify_all();
    };
    if !shared.closing.load(Ordering::SeqCst) {
        let how = if ended.kind() == io::ErrorKind::UnexpectedEof {
            "closed its connection (its process ended)".to_string()
        } else {
            format!("lost its connection ({ended})")
        };
        shared.lock().lost.insert(peer, how);
        shared.arrived.notify_all();
    }
}

fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and u8 has alignment 1; the view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), std::mem::size_of_val(x)) }
}

fn f32_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), std::mem::size_of_val(x)) }
}

/// The names a timeout can carry across ranks (a [`TimeoutInfo`] holds a static name).
const OP_NAMES: [&str; 7] =
    ["all_reduce_sum", "reduce_scatter_sum", "all_gather", "broadcast", "barrier", "send", "recv"];

/// An abort frame's payload: the timed-out operation's name, the timeout in ms, the group and
/// the missing ranks.
fn encode_timeout(info: &TimeoutInfo) -> Vec<u8> {
    let mut out = vec![info.op.len() as u8];
    out.extend_from_slice(info.op.as_bytes());
    out.extend_from_slice(&(info.timeout.as_millis() as u64).to_le_bytes());
    for list in [&info.group, &info.missing] {
        out.extend_from_slice(&(list.len() as u64).to_le_bytes());
        list.iter().for_each(|r| out.extend_from_slice(&(*r as u64).to_le_bytes()));
    }
    out
}

fn decode_timeout(b: &[u8]) -> Option<TimeoutInfo> {
    let (&len, rest) = b.split_first()?;
    let (name, mut b) = rest.split_at_checked(len as usize)?;
    let op = OP_NAMES.into_iter().find(|n| n.as_bytes() == name)?;
    let mut u64_at = || -> Option<u64> {
        let (head, rest) = b.split_at_checked(8)?;
        b = rest;
        Some(u64::from_le_bytes(head.try_into().ok()?))
    };
    let timeout = Duration::from_millis(u64_at()?);
    let mut list = || -> Option<Vec<usize>> { (0..u64_at()?).map(|_| u64_at().map(|r| r as usize)).collect() };
    let group = list()?;
    let missing = list()?;
    Some(TimeoutInfo { op, group, missing, timeout })
}

/// One communicator of a rank: a group of world ranks on one channel of the rank's [`TcpNet`].
pub struct TcpComm {
    net: Arc<TcpNet>,
    channel: u32,
    /// The members as world ranks, in group-rank order.
    ranks: Vec<usize>,
    rank: usize,
}

impl TcpComm {
    /// The whole world as one group.
    pub fn world(net: &Arc<TcpNet>) -> TcpComm {
        Self::group(net, WORLD, (0..net.world).collect()).expect("the world contains every rank")
    }

    fn group(net: &Arc<TcpNet>, channel: u32, ranks: Vec<usize>) -> Result<TcpComm, CommError> {
        let rank = ranks
            .iter()
            .position(|&r| r == net.rank)
            .ok_or_else(|| CommError::Layout(format!("rank {} is not in the group {}", net.rank, Ranks(&ranks))))?;
        Ok(TcpComm { net: net.clone(), channel, ranks, rank })
    }

    fn invalid(&self, op: &'static str, message: impl Into<String>) -> CommError {
        CommError::Invalid { op, group: self.ranks.clone(), message: message.into() }
    }

    fn check_peer(&self, op: &'static str, what: &str, peer: usize) -> Result<(), CommError> {
        if peer < self.size() {
            return Ok(());
        }
        Err(self.invalid(op, format!("{what} {peer} is outside the group of {} ranks", self.size())))
    }

    /// Sends `payload` to group rank `to`.
    #[allow(clippy::too_many_arguments)]
    fn send_to(
        &self,
        name: &'static str,
        op: Op,
        to: usize,
        total: usize,
        root: usize,
        payload: &[f32],
    ) -> Result<(), CommError> {
        let peer = self.ranks[to];
        self.net
            .send_frame(peer, op, self.channel, total, root, f32_bytes(payload))
            .map_err(|e| self.lost(name, peer, e))
    }

    /// The error for a connection to world rank `peer` that failed under a send. The peer's
    /// last frames may still be on their way (an abort explains better than a broken pipe), so
    /// this waits until its reader has drained the connection.
    fn lost(&self, name: &'static str, peer: usize, e: io::Error) -> CommError {
        let shared = &self.net.shared;
        let deadline = Instant::now() + self.net.timeout.min(Duration::from_secs(5));
        let mut inbox = shared.lock();
        while !inbox.lost.contains_key(&peer) && Instant::now() < deadline {
            inbox = shared.arrived.wait_timeout(inbox, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
        if let Some(cause) = inbox.broken.get(&self.channel) {
            return CommError::Broken { op: name, group: self.ranks.clone(), cause: cause.clone() };
        }
        let how = inbox.lost.get(&peer).cloned().unwrap_or_else(|| format!("lost its connection ({e})"));
        CommError::Lost { op: name, group: self.ranks.clone(), peer, how }
    }

    /// Fails at once if the channel is broken.
    fn check_broken(&self, name: &'static str) -> Result<(), CommError> {
        match self.net.shared.lock().broken.get(&self.channel) {
            Some(cause) => Err(CommError::Broken { op: name, group: self.ranks.clone(), cause: cause.clone() }),
            None => Ok(()),
        }
    }

    /// Waits for the next message from each of `from` (group ranks) and returns them in that
    /// order. A timeout breaks the channel here and on the group's other ranks.
    fn take(&self, name: &'static str, from: &[usize], p2p: bool) -> Result<Vec<Message>, CommError> {
        let shared = &self.net.shared;
        let deadline = Instant::now() + self.net.timeout;
        let keys: Vec<_> = from.iter().map(|&r| (self.channel, self.ranks[r], p2p)).collect();
        let mut inbox = shared.lock();
        let mut waited = false;
        let missing = loop {
            if let Some(cause) = inbox.broken.get(&self.channel) {
                // Another rank timed out in this very operation while this one waited: the
                // same timeout (as ThreadComm reports it); otherwise the channel was broken.
                if waited && cause.op == name {
                    return Err(CommError::Timeout(cause.clone()));
                }
                return Err(CommError::Broken { op: name, group: self.ranks.clone(), cause: cause.clone() });
            }
            let missing: Vec<usize> =
                keys.iter().filter(|k| inbox.queues.get(k).is_none_or(VecDeque::is_empty)).map(|k| k.1).collect();
            if missing.is_empty() {
                return Ok(keys
                    .iter()
                    .map(|k| inbox.queues.get_mut(k).and_then(VecDeque::pop_front).expect("checked above"))
                    .collect());
            }
            if let Some((peer, how)) = missing.iter().find_map(|p| inbox.lost.get(p).map(|h| (*p, h))) {
                return Err(CommError::Lost { op: name, group: self.ranks.clone(), peer, how: how.clone() });
            }
            let now = Instant::now();
            if now >= deadline {
                break missing;
            }
            inbox = shared.arrived.wait_timeout(inbox, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            waited = true;
        };
        let info = TimeoutInfo { op: name, group: self.ranks.clone(), missing, timeout: self.net.timeout };
        inbox.broken.insert(self.channel, info.clone());
        drop(inbox);
        let cause = encode_timeout(&info);
        for to in (0..self.size()).filter(|&r| r != self.rank) {
            // Best effort: a peer that cannot be told times out by itself.
            let _ = self.net.send_frame(self.ranks[to], Op::Abort, self.channel, 0, 0, &cause);
        }
        Err(CommError::Timeout(info))
    }

    /// Checks that a collective's message comes from the same operation, root and buffer
    /// length as this rank's.
    fn check_message(
        &self,
        name: &'static str,
        op: Op,
        root: usize,
        total: usize,
        from: usize,
        m: &Message,
    ) -> Result<(), CommError> {
        let (me, peer) = (self.ranks[self.rank], self.ranks[from]);
        if m.op != op || m.root != root as u64 {
            return Err(self.invalid(
                name,
                format!(
                    "rank {me} called {name} (root {root}) while rank {peer} is in {} (root {})",
                    m.op.name(),
                    m.root
                ),
            ));
        }
        if m.total != total as u64 {
            let mut lengths = [(me, total as u64), (peer, m.total)];
            lengths.sort();
            let [(a, la), (b, lb)] = lengths;
            return Err(
                self.invalid(name, format!("buffer lengths differ across ranks (rank {a}: {la}, rank {b}: {lb})"))
            );
        }
        Ok(())
    }

    /// The other members, in group-rank order.
    fn peers(&self) -> Vec<usize> {
        (0..self.size()).filter(|&r| r != self.rank).collect()
    }

    /// Sends `part(r)` to every other member r, then returns each member's message to this
    /// rank (this rank's own slot holds an empty message).
    fn exchange(
        &self,
        name: &'static str,
        op: Op,
        total: usize,
        part: impl Fn(usize) -> Vec<f32>,
    ) -> Result<Vec<Vec<f32>>, CommError> {
        self.check_broken(name)?;
        let peers = self.peers();
        for &r in &peers {
            self.send_to(name, op, r, total, 0, &part(r))?;
        }
        let got = self.take(name, &peers, false)?;
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); self.size()];
        for (&r, m) in peers.iter().zip(got) {
            self.check_message(name, op, 0, total, r, &m)?;
            out[r] = m.data;
        }
        Ok(out)
    }

    /// Chunk `i` of `n` elements split over the members (the last chunks may be shorter or
    /// empty).
    fn chunk(&self, n: usize, i: usize) -> std::ops::Range<usize> {
        let len = n.div_ceil(self.size().max(1));
        (i * len).min(n)..((i + 1) * len).min(n)
    }

    /// `out` = this rank's contribution `mine` and the others' `theirs` added in rank order.
    fn sum_in_rank_order(
        &self,
        name: &'static str,
        out: &mut [f32],
        mine: &[f32],
        theirs: &[Vec<f32>],
    ) -> Result<(), CommError> {
        for (r, their) in theirs.iter().enumerate() {
            let part = if r == self.rank { mine } else { their };
            if part.len() != out.len() {
                return Err(self.invalid(name, format!("rank {} sent a chunk of the wrong length", self.ranks[r])));
            }
            if r == 0 {
                out.copy_from_slice(part);
            } else {
                out.iter_mut().zip(part).for_each(|(o, x)| *o += x);
            }
        }
        Ok(())
    }
}

impl Communicator for TcpComm {
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
        const NAME: &str = "all_reduce_sum";
        let n = buf.len();
        let mine = self.chunk(n, self.rank);
        let theirs = self.exchange(NAME, Op::AllReduce, n, |r| buf[self.chunk(n, r)].to_vec())?;
        let mut sum = vec![0f32; mine.len()];
        self.sum_in_rank_order(NAME, &mut sum, &buf[mine.clone()], &theirs)?;
        buf[mine].copy_from_slice(&sum);
        let reduced = self.exchange(NAME, Op::AllReduce, n, |_| sum.clone())?;
        for r in self.peers() {
            let range = self.chunk(n, r);
            if reduced[r].len() != range.len() {
                return Err(self.invalid(NAME, format!("rank {} sent a chunk of the wrong length", self.ranks[r])));
            }
            buf[range].copy_from_slice(&reduced[r]);
        }
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        const NAME: &str = "reduce_scatter_sum";
        let n = output.len();
        if input.len() != self.size() * n {
            return Err(self.invalid(
                NAME,
                format!("input has {} elements; it must be size {} x output {n}", input.len(), self.size()),
            ));
        }
        let at = |r: usize| r * n..(r + 1) * n;
        let theirs = self.exchange(NAME, Op::ReduceScatter, input.len(), |r| input[at(r)].to_vec())?;
        self.sum_in_rank_order(NAME, output, &input[at(self.rank)], &theirs)
    }

    /// The all-reduce's first half (each rank sums its chunk), then the chunks go to the root
    /// only: the other ranks keep their own buffers.
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const NAME: &str = "reduce_sum";
        self.check_peer(NAME, "root", root)?;
        let n = buf.len();
        let mine = self.chunk(n, self.rank);
        let theirs = self.exchange(NAME, Op::Reduce, n, |r| buf[self.chunk(n, r)].to_vec())?;
        let mut sum = vec![0f32; mine.len()];
        self.sum_in_rank_order(NAME, &mut sum, &buf[mine.clone()], &theirs)?;
        if self.rank != root {
            return self.send_to(NAME, Op::Reduce, root, n, root, &sum);
        }
        buf[mine].copy_from_slice(&sum);
        let peers = self.peers();
        for (&r, m) in peers.iter().zip(self.take(NAME, &peers, false)?) {
            self.check_message(NAME, Op::Reduce, root, n, r, &m)?;
            let range = self.chunk(n, r);
            if m.data.len() != range.len() {
                return Err(self.invalid(NAME, format!("rank {} sent a chunk of the wrong length", self.ranks[r])));
            }
            buf[range].copy_from_slice(&m.data);
        }
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        const NAME: &str = "all_gather";
        let n = input.len();
        if output.len() != self.size() * n {
            return Err(self.invalid(
                NAME,
                format!("output has {} elements; it must be size {} x input {n}", output.len(), self.size()),
            ));
        }
        let theirs = self.exchange(NAME, Op::AllGather, n, |_| input.to_vec())?;
        for r in 0..self.size() {
            output[r * n..(r + 1) * n].copy_from_slice(if r == self.rank { input } else { &theirs[r] });
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        const NAME: &str = "broadcast";
        self.check_peer(NAME, "root", root)?;
        self.check_broken(NAME)?;
        if self.rank == root {
            for r in self.peers() {
                self.send_to(NAME, Op::Broadcast, r, buf.len(), root, buf)?;
            }
            return Ok(());
        }
        let m = self.take(NAME, &[root], false)?.remove(0);
        if m.op != Op::Broadcast || m.root != root as u64 {
            return self.check_message(NAME, Op::Broadcast, root, buf.len(), root, &m);
        }
        if m.data.len() != buf.len() {
            return Err(self.invalid(
                NAME,
                format!(
                    "root {} sent {} elements but rank {} expects {}",
                    self.ranks[root],
                    m.data.len(),
                    self.ranks[self.rank],
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(&m.data);
        Ok(())
    }

    fn send(&self, buf: &[f32], to: usize) -> Result<(), CommError> {
        const NAME: &str = "send";
        self.check_peer(NAME, "destination", to)?;
        self.check_broken(NAME)?;
        self.send_to(NAME, Op::P2p, to, buf.len(), 0, buf)
    }

    fn recv(&self, buf: &mut [f32], from: usize) -> Result<(), CommError> {
        const NAME: &str = "recv";
        self.check_peer(NAME, "source", from)?;
        let m = self.take(NAME, &[from], true)?.remove(0);
        if m.data.len() != buf.len() {
            return Err(self.invalid(
                NAME,
                format!(
                    "rank {} sent {} elements but rank {} receives {}",
                    self.ranks[from],
                    m.data.len(),
                    self.ranks[self.rank],
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(&m.data);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange("barrier", Op::Barrier, 0, |_| Vec::new()).map(drop)
    }

    fn duplicate(&self) -> Option<Box<dyn Communicator>> {
        Some(Box::new(TcpComm {
            net: self.net.clone(),
            channel: self.channel,
            ranks: self.ranks.clone(),
            rank: self.rank,
        }))
    }
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpComm(rank {} of group {} on channel {})", self.rank, Ranks(&self.ranks), self.channel)
    }
}

impl RankComms<TcpComm> {
    /// The communicators of this process's rank of `mesh`, over `net` (which must span the
    /// mesh's world).
    pub fn tcp(mesh: Mesh, net: &Arc<TcpNet>) -> Result<RankComms<TcpComm>, CommError> {
        Mesh::for_world(mesh.tp, mesh.pp, mesh.dp, net.world)?;
        let rank = net.rank;
        let [tp, pp, dp] = mesh.groups_of(rank)?;
        Ok(RankComms {
            mesh,
            coords: mesh.coords(rank)?,
            world: TcpComm::world(net),
            tp: TcpComm::group(net, TP, tp)?,
            pp: TcpComm::group(net, PP, pp.clone())?,
            pp_back: TcpComm::group(net, PP_BACK, pp)?,
            dp: TcpComm::group(net, DP, dp)?,
        })
    }
}
