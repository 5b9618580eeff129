//! The rendezvous store: a small key-value server that rank 0 runs (in a thread) on
//! MASTER_ADDR:MASTER_PORT, and a client per rank. Ranks use it to find each other before any
//! communicator exists: to publish the NCCL unique id, to pass barriers, to count arrivals.
//!
//! # Protocol
//! One TCP connection per client; request and reply alternate. Every frame is a little-endian
//! `u32` body length followed by the body (at most [`MAX_FRAME`] bytes). Strings and byte
//! strings inside a body are a `u32` length and the bytes.
//!
//! | request body                                   | success reply body        |
//! |------------------------------------------------|---------------------------|
//! | `1` SET, key, value                            | `0`                       |
//! | `2` GET, key, timeout ms (`u64`)               | `0`, value                |
//! | `3` ADD, key, delta (`i64`)                    | `0`, new value (`i64`)    |
//! | `4` WAIT, key count (`u32`), keys, timeout ms  | `0`                       |
//!
//! A reply starting with `1` is a timeout; after WAIT it lists the keys still missing (count,
//! keys). A reply starting with `2` is an error with a message. Counters are stored as ASCII
//! decimal, as torch's TCPStore does, so `get` on a counter reads naturally.
//!
//! GET and WAIT block on the server (a condition variable woken by every SET/ADD) rather than the
//! client polling, so a barrier costs one round trip per rank. The server runs one thread per
//! connection: a job has at most a few thousand ranks, and each thread mostly sleeps.
//!
//! # Barriers
//! `barrier(name, world)` sets `barrier/{name}/{k}/{rank}` and waits for the keys of all ranks,
//! where `k` counts this client's barriers of that name (every rank passes the same barriers in
//! the same order), so a name can be reused. On timeout the missing keys name the missing ranks.
//!
//! # Startup order
//! Rank 0 may start after the others, so `connect` retries refused connections with backoff until
//! its timeout. Every blocking request also sets a socket read timeout a little longer than the
//! server-side wait, so a vanished server is an error, not a hang.

use crate::env::DistEnv;
use crate::error::CommError;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// The largest frame either side accepts (keys and values are small: ids, counters).
pub const MAX_FRAME: usize = 64 << 20;

const SET: u8 = 1;
const GET: u8 = 2;
const ADD: u8 = 3;
const WAIT: u8 = 4;

const OK: u8 = 0;
const TIMED_OUT: u8 = 1;
const FAILED: u8 = 2;

/// Slack on top of a server-side wait before the client gives up on the reply.
const REPLY_SLACK: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Framing

/// Builds a frame body.
#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(self, v: &[u8]) -> Self {
        let mut s = self.u32(v.len() as u32);
        s.0.extend_from_slice(v);
        s
    }
}

/// Reads a frame body.
struct Cursor<'a>(&'a [u8]);

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed store frame")
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(malformed());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| malformed())?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| malformed())?))
    }
    fn i64(&mut self) -> io::Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().map_err(|_| malformed())?))
    }
    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| malformed())
    }
}

fn write_frame(stream: &mut TcpStream, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds the limit", body.len()),
        ));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)
}

/// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
fn read_frame(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds the limit")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(Some(body))
}

// ---------------------------------------------------------------------------------------------
// Server

/// The store server. It serves until [`StoreServer::shutdown`] (or until the process exits).
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<ServerShared>,
    accept: Option<thread::JoinHandle<()>>,
}

struct ServerShared {
    data: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stopping: AtomicBool,
    /// Open client connections.
    clients: AtomicUsize,
}

impl ServerShared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready(map)` holds or `timeout` passes; returns the final guard and whether it
    /// held.
    fn wait_until(
        &self,
        timeout: Duration,
        ready: impl Fn(&HashMap<String, Vec<u8>>) -> bool,
    ) -> (MutexGuard<'_, HashMap<String, Vec<u8>>>, bool) {
        let deadline = Instant::now() + timeout;
        let mut map = self.lock();
        loop {
            if ready(&map) {
                return (map, true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (map, false);
            }
            map = self.changed.wait_timeout(map, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Answers one request body.
    fn handle(&self, body: &[u8]) -> io::Result<Vec<u8>> {
        let mut c = Cursor(body);
        let reply = match c.u8()? {
            SET => {
                let key = c.string()?;
                let value = c.bytes()?;
                self.lock().insert(key, value);
                self.changed.notify_all();
                Body::default().u8(OK)
            }
            GET => {
                let key = c.string()?;
                let timeout = Duration::from_millis(c.u64()?);
                let (map, ok) = self.wait_until(timeout, |m| m.contains_key(&key));
                match map.get(&key) {
                    Some(v) if ok => Body::default().u8(OK).bytes(v),
                    _ => Body::default().u8(TIMED_OUT).u32(1).bytes(key.as_bytes()),
                }
            }
            ADD => {
                let key = c.string()?;
                let delta = c.i64()?;
                let mut map = self.lock();
                let current = match map.get(&key) {
                    None => Ok(0),
                    Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()).ok_or(()),
                };
                match current.map(|v| v.checked_add(delta)) {
                    Ok(Some(new)) => {
                        map.insert(key, new.to_string().into_bytes());
                        self.changed.notify_all();
                        Body::default().u8(OK).i64(new)
                    }
                    Ok(None) => Body::default().u8(FAILED).bytes(format!("counter `{key}` overflows").as_bytes()),
                    Err(()) => Body::default().u8(FAILED).bytes(format!("`{key}` is not a counter").as_bytes()),
                }
            }
            WAIT => {
                let n = c.u32()? as usize;
                let keys = (0..n).map(|_| c.string()).collect::<io::Result<Vec<_>>>()?;
                let timeout = Duration::from_millis(c.u64()?);
                let (map, ok) = self.wait_until(timeout, |m| keys.iter().all(|k| m.contains_key(k)));
                if ok {
                    Body::default().u8(OK)
                } else {
                    let missing: Vec<&String> = keys.iter().filter(|k| !map.contains_key(*k)).collect();
                    missing
                        .iter()
                        .fold(Body::default().u8(TIMED_OUT).u32(missing.len() as u32), |b, k| b.bytes(k.as_bytes()))
                }
            }
            op => Body::default().u8(FAILED).bytes(format!("unknown request {op}").as_bytes()),
        };
        Ok(reply.0)
    }

    fn serve(&self, mut stream: TcpStream) {
        // A client that sends garbage or vanishes only loses its own connection.
        while let Ok(Some(body)) = read_frame(&mut stream) {
            let reply =
                self.handle(&body).unwrap_or_else(|e| Body::default().u8(FAILED).bytes(e.to_string().as_bytes()).0);
            if write_frame(&mut stream, &reply).is_err() {
                break;
            }
        }
        self.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

impl StoreServer {
    /// Listens on `addr` (port 0 picks a free port; see [`StoreServer::addr`]) and serves in
    /// background threads.
    pub fn bind(addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<StoreServer, CommError> {
        let listener = TcpListener::bind(&addr).map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::AddrInUse => {
                    "; another job (or a process) has this MASTER_PORT: give this one its own (`ondol launch \
                     --master-port 0` picks a free one)"
                }
                _ => "",
            };
            CommError::store(format!("{addr:?}"), format!("cannot listen: {e}{hint}"))
        })?;
        let local = listener.local_addr().map_err(|e| CommError::store(format!("{addr:?}"), e.to_string()))?;
        let shared = Arc::new(ServerShared {
            data: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        let accept = thread::Builder::new()
            .name("ondol-store".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if accept_shared.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    // Requests are small and latency-bound.
                    let _ = stream.set_nodelay(true);
                    accept_shared.clients.fetch_add(1, Ordering::SeqCst);
                    let conn_shared = accept_shared.clone();
                    let spawned =
                        thread::Builder::new().name("ondol-store-conn".into()).spawn(move || conn_shared.serve(stream));
                    if spawned.is_err() {
                        accept_shared.clients.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })
            .map_err(|e| CommError::store(local, format!("cannot start the server thread: {e}")))?;
        Ok(StoreServer { addr: local, shared, accept: Some(accept) })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections and waits up to `grace` for the connected clients to hang up,
    /// so that rank 0 does not exit (taking the server with it) while another rank still waits
    /// for the reply to its last request. Returns the number of clients still connected.
    pub fn shutdown(mut self, grace: Duration) -> usize {
        self.stop_accepting();
        let deadline = Instant::now() + grace;
        while self.shared.clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.shared.clients.load(Ordering::SeqCst)
    }

    fn stop_accepting(&mut self) {
        if let Some(accept) = self.accept.take() {
            self.shared.stopping.store(true, Ordering::SeqCst);
            // Wake the blocking accept with a connection of our own; if that fails the thread
            // simply stays parked in accept until the process exits.
            let mut wake = self.addr;
            if wake.ip().is_unspecified() {
                wake.set_ip(if wake.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
            }
            if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok() {
                let _ = accept.join();
            }
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// One rank's connection to the store.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
    rank: usize,
    timeout: Duration,
    barriers: HashMap<String, u64>,
}

impl StoreClient {
    /// Connects to the store at `addr` (`host:port`) as `rank`, retrying refused connections until
    /// `timeout` (rank 0 may not be listening yet). `timeout` is also the default wait of every
    /// blocking request.
    pub fn connect(addr: &str, rank: usize, timeout: Duration) -> Result<StoreClient, CommError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            let attempt = addr.to_socket_addrs().and_then(|addrs| {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
                    match TcpStream::connect_timeout(&a, left.min(Duration::from_secs(5))) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            });
            match attempt {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(StoreClient { stream, addr: addr.to_string(), rank, timeout, barriers: HashMap::new() });
                }
                Err(e) if Instant::now() + backoff >= deadline => {
                    return Err(CommError::store(
                        addr,
                        format!(
                            "unreachable after {:.1} s ({e}); is rank 0 running, and are MASTER_ADDR and \
                             MASTER_PORT the same on every rank?",
                            timeout.as_secs_f64()
                        ),
                    ));
                }
                Err(_) => {
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Changes the wait of every later blocking request.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// This end of the connection to the store: an address of this host that the store's host
    /// (and so, in a cluster, the other hosts) can reach.
    pub fn local_addr(&self) -> Result<SocketAddr, CommError> {
        self.stream.local_addr().map_err(|e| self.fail(format!("cannot read the local address: {e}")))
    }

    fn fail(&self, message: impl Into<String>) -> CommError {
        CommError::store(&self.addr, message)
    }

    /// Sends `body`, waiting up to `wait` (plus slack) for the reply body (status byte first).
    fn request(&mut self, what: &str, body: Body, wait: Duration) -> Result<Vec<u8>, CommError> {
        let io = |e: io::Error| format!("{what} failed: {e}");
        self.stream.set_read_timeout(Some(wait + REPLY_SLACK)).map_err(|e| self.fail(io(e)))?;
        write_frame(&mut self.stream, &body.0).map_err(|e| self.fail(io(e)))?;
        match read_frame(&mut self.stream) {
            Ok(Some(reply)) if !reply.is_empty() => Ok(reply),
            Ok(_) => Err(self.fail(format!("{what} failed: the server closed the connection"))),
            Err(e) => Err(self.fail(io(e))),
        }
    }

    /// Interprets a reply: the payload after an OK status, or the error it carries.
    fn expect_ok<'a>(&self, what: &str, reply: &'a [u8], wait: Duration) -> Result<Cursor<'a>, CommError> {
        let mut c = Cursor(&reply[1..]);
        let bad = |_| self.fail(format!("{what}: malformed reply"));
        match reply[0] {
            OK => Ok(c),
            TIMED_OUT => {
                let n = c.u32().map_err(bad)?;
                let keys = (0..n).map(|_| c.string()).collect::<io::Result<Vec<_>>>().map_err(bad)?;
                Err(self.fail(format!(
                    "{what} timed out after {:.1} s waiting for {}",
                    wait.as_secs_f64(),
                    keys.join(", ")
                )))
            }
            _ => Err(self.fail(format!("{what} failed: {}", c.string().unwrap_or_else(|_| "malformed reply".into())))),
        }
    }

    /// Stores `value` under `key`, waking every rank waiting for it.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let what = format!("set `{key}`");
        let reply = self.request(&what, Body::default().u8(SET).bytes(key.as_bytes()).bytes(value), Duration::ZERO)?;
        self.expect_ok(&what, &reply, Duration::ZERO).map(drop)
    }

    /// The value of `key`, waiting until some rank sets it (at most the client's timeout).
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>, CommError> {
        let what = format!("get `{key}`");
        let wait = self.timeout;
        let body = Body::default().u8(GET).bytes(key.as_bytes()).u64(wait.as_millis() as u64);
        let reply = self.request(&what, body, wait)?;
        self.expect_ok(&what, &reply, wait)?.bytes().map_err(|_| self.fail(format!("{what}: malformed reply")))
    }

    /// Adds `delta` to the counter `key` (absent counts as 0) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, CommError> {
        let what = format!("add to `{key}`");
        let reply = self.request(&what, Body::default().u8(ADD).bytes(key.as_bytes()).i64(delta), Duration::ZERO)?;
        self.expect_ok(&what, &reply, Duration::ZERO)?.i64().map_err(|_| self.fail(format!("{what}: malformed reply")))
    }

    /// Waits until every key in `keys` is set (at most the client's timeout); the error lists the
    /// keys still missing.
    pub fn wait(&mut self, keys: &[&str]) -> Result<(), CommError> {
        let reply = self.wait_request("wait", keys)?;
        self.expect_ok("wait", &reply, self.timeout).map(drop)
    }

    /// Sends a WAIT for `keys` with the client's timeout and returns the raw reply.
    fn wait_request(&mut self, what: &str, keys: &[&str]) -> Result<Vec<u8>, CommError> {
        let wait = self.timeout;
        let body = keys
            .iter()
            .fold(Body::default().u8(WAIT).u32(keys.len() as u32), |b, k| b.bytes(k.as_bytes()))
            .u64(wait.as_millis() as u64);
        self.request(what, body, wait)
    }

    /// Returns once all `world` ranks have called `barrier` with this `name` as many times as this
    /// rank has. On timeout the error names the ranks that did not arrive.
    pub fn barrier(&mut self, name: &str, world: usize) -> Result<(), CommError> {
        let round = self.barriers.entry(name.to_string()).or_insert(0);
        let prefix = format!("barrier/{name}/{round}/");
        *round += 1;
        self.set(&format!("{prefix}{}", self.rank), &[])?;
        let keys: Vec<String> = (0..world).map(|r| format!("{prefix}{r}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let what = format!("barrier `{name}`");
        let reply = self.wait_request(&what, &refs)?;
        let wait = self.timeout;
        if reply[0] == TIMED_OUT {
            let mut c = Cursor(&reply[1..]);
            let missing = c
                .u32()
                .and_then(|n| (0..n).map(|_| c.string()).collect::<io::Result<Vec<_>>>())
                .map_err(|_| self.fail(format!("{what}: malformed reply")))?;
            let ranks: Vec<&str> = missing.iter().filter_map(|k| k.strip_prefix(&prefix)).collect();
            return Err(self.fail(format!(
                "{what} of {world} ranks timed out after {:.1} s: rank(s) {} did not arrive",
                wait.as_secs_f64(),
                ranks.join(", ")
            )));
        }
        self.expect_ok(&what, &reply, wait).map(drop)
    }
}

/// The store key rank 0 writes its job id under.
const JOB_KEY: &str = "job_id";

/// Joins the job's rendezvous: rank 0 starts the server on `MASTER_PORT` (on the loopback
/// interface when `MASTER_ADDR` is a loopback name, else on every interface, since the name other
/// ranks use may map to any of them), and every rank, rank 0 included, connects a client. Keep
/// the server alive until the other ranks are done with the store ([`StoreServer::shutdown`]).
///
/// A rank whose job id differs from the one rank 0 wrote is refused before it writes anything:
/// it found another job's store on its port, and that job goes on untouched.
pub fn rendezvous(env: &DistEnv, timeout: Duration) -> Result<(Option<StoreServer>, StoreClient), CommError> {
    let server = if env.rank == 0 {
        let loopback = matches!(env.master_addr.as_str(), "localhost" | "127.0.0.1" | "::1" | "[::1]");
        let host = if loopback { "127.0.0.1" } else { "0.0.0.0" };
        Some(StoreServer::bind((host, env.master_port))?)
    } else {
        None
    };
    let mut client = StoreClient::connect(&env.store_addr(), env.rank, timeout)?;
    if server.is_some() {
        client.set(JOB_KEY, env.job_id.as_bytes())?;
    } else {
        let theirs = client.get(JOB_KEY)?;
        if theirs != env.job_id.as_bytes() {
            return Err(client.fail(format!(
                "is another job's (job id {:?}; this rank's is {:?}): two launches on one MASTER_PORT? Give each \
                 its own (`ondol launch --master-port 0` picks a free one)",
                String::from_utf8_lossy(&theirs),
                env.job_id
            )));
        }
    }
    Ok((server, client))
}
