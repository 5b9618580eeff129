//! The launcher behind `ondol launch`: one child process per local rank, with the environment
//! torchrun gives its workers, so cluster scripts written for torchrun work unchanged.
//!
//! What it guarantees:
//! - Each child gets `RANK = node_rank * nproc_per_node + local_rank`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; on one node also a
//!   `TORCHELASTIC_RUN_ID` of this launch's own (unless one is set), so that ranks of a second
//!   launch on the same port refuse the first's store instead of joining it (the nodes of a
//!   multi-node launch share the one their environment gives, if any: see [`crate::env`]).
//! - Every line a child writes to stdout or stderr is written to the launcher's stdout or stderr
//!   prefixed with `[rank K] `, one whole line at a time (lines never interleave mid-line),
//!   except an `error:` line another rank wrote first: the launch's message names its ranks.
//! - SIGINT, SIGTERM and SIGUSR1 received by the launcher are forwarded to every running child.
//!   After SIGINT or SIGTERM, children still running after the grace period get SIGKILL;
//!   SIGUSR1 (`ondol train`'s "checkpoint and stop", which Slurm sends ahead of a time limit
//!   with `--signal=USR1@SECONDS`) lets them take the time they need.
//! - When a child exits non-zero or dies by a signal, the others are stopped (SIGTERM, then
//!   SIGKILL after the grace period) and the launch fails with a message naming that rank and
//!   its status. One crashed rank would otherwise leave the others blocked in a collective.
//!   Exit status 128 + SIGTERM or SIGUSR1 is no failure: `ondol train` stopped on request with a
//!   checkpoint, and its other ranks stop after the same step; the launch then ends with that
//!   status too. A launch interrupted by a signal its ranks did not stop on request for (SIGINT,
//!   or SIGTERM before training began) ends as interrupted, with 128 + that signal, as a
//!   process it ended would, not as a failure.
//! - On Linux each child also gets SIGTERM if the launcher itself dies (`PR_SET_PDEATHSIG`), so
//!   a killed launcher leaves no orphaned ranks holding GPUs. (The signal fires when the
//!   spawning *thread* exits; `launch` runs on the caller's thread, which outlives the children.)
//!
//! Supervision is a poll loop (every 20 ms: pending signal? child exited?) rather than
//! `waitpid` in a signal-driven loop: it needs no async-signal-safe machinery beyond one atomic
//! store in the handler, and 20 ms is nothing next to process start-up.

use crate::error::CommError;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How to launch the ranks of this node.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// 0 picks a free port (single-node launches only).
    pub master_port: u16,
    /// How long stopped children get between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// The program every rank runs and its arguments.
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

const POLL: Duration = Duration::from_millis(20);

/// The last SIGINT, SIGTERM or SIGUSR1 received and not yet forwarded (0: none).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic operations: async-signal-safe. A pending SIGINT or SIGTERM, which end the
    // ranks, is not replaced by a SIGUSR1, which only asks them to stop.
    if sig == libc::SIGUSR1 {
        let _ = PENDING_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    } else {
        PENDING_SIGNAL.store(sig, Ordering::SeqCst);
    }
}

/// Routes SIGINT, SIGTERM and SIGUSR1 to [`PENDING_SIGNAL`] while alive; restores the previous
/// dispositions when dropped, so `launch` leaves the process as it found it.
struct CatchTermination {
    previous: [(libc::c_int, libc::sighandler_t); 3],
}

impl CatchTermination {
    fn install() -> CatchTermination {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: installing a handler that only stores to an atomic is sound at any time.
        let previous =
            [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1].map(|sig| (sig, unsafe { libc::signal(sig, handler) }));
        CatchTermination { previous }
    }
}

impl Drop for CatchTermination {
    fn drop(&mut self) {
        for (sig, previous) in self.previous {
            if previous != libc::SIG_ERR {
                // SAFETY: restores a disposition that `signal` returned for this signal.
                unsafe {
                    libc::signal(sig, previous);
                }
            }
        }
    }
}

fn send_signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions. The pid is a child we have not yet
    // reaped (callers only signal children whose `try_wait` has not returned a status), so it
    // cannot have been reused by another process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// A signal's conventional name, for messages.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

/// "exited with status 1" or "was killed by signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by {}", signal_name(sig)),
        (None, None) => format!("ended with {status}"),
    }
}

/// The `error:` lines the ranks wrote to stderr, each with the ranks that wrote it: a mistake
/// every rank meets (a bad layout, a missing file) is printed once, not once per rank.
#[derive(Default)]
struct Errors(std::sync::Mutex<Vec<(Vec<u8>, Vec<usize>)>>);

impl Errors {
    /// Records `rank`'s `line`; true where no other rank wrote it before (print it).
    fn first(&self, line: &[u8], rank: usize) -> bool {
        let mut seen = self.0.lock().expect("error lines");
        match seen.iter_mut().find(|(l, _)| l == line) {
            Some((_, ranks)) if ranks[0] == rank => true,
            Some((_, ranks)) => {
                if !ranks.contains(&rank) {
                    ranks.push(rank);
                }
                false
            }
            None => {
                seen.push((line.to_vec(), vec![rank]));
                true
            }
        }
    }

    /// Which ranks wrote which rank's error again, for the launch's own message.
    fn repeated(&self) -> Option<String> {
        let seen = self.0.lock().expect("error lines");
        let notes: Vec<String> = seen
            .iter()
            .filter(|(_, ranks)| ranks.len() > 1)
            .map(|(_, ranks)| {
                let mut others = ranks[1..].to_vec();
                others.sort_unstable();
                let others: Vec<String> = others.iter().map(usize::to_string).collect();
                format!("rank(s) {} wrote rank {}'s error too", others.join(", "), ranks[0])
            })
            .collect();
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}

/// Copies `src` line by line to stdout or stderr, each line prefixed with `[rank K] `; an
/// `error:` line another rank wrote first is left out (see [`Errors`]). Returns the output's
/// last line where it ended without a newline, for [`print_tail`] once the rank has ended.
fn pump(src: impl Read, rank: usize, to_stderr: bool, errors: &Errors) -> Vec<u8> {
    let mut reader = BufReader::new(src);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return Vec::new(),
            Ok(_) => {}
        }
        if to_stderr && line.starts_with(b"error: ") && !errors.first(&line, rank) {
            continue;
        }
        if !line.ends_with(b"\n") {
            return line;
        }
        write_out(to_stderr, &framed(rank, &line, true));
    }
}

/// One write per line under the lock, so ranks never interleave within a line. If our own
/// output is gone, the pumps keep draining so a child never blocks on a full pipe.
fn write_out(to_stderr: bool, bytes: &[u8]) {
    let _ =
        if to_stderr { std::io::stderr().lock().write_all(bytes) } else { std::io::stdout().lock().write_all(bytes) };
}

/// Prints a rank's unterminated last line: whole where the rank ended well, else marked.
fn print_tail(rank: &Rank, to_stderr: bool, tail: &[u8]) {
    if !tail.is_empty() {
        write_out(to_stderr, &framed(rank.rank, tail, rank.status.is_some_and(|s| s.success())));
    }
}

/// A rank's `line` as the launcher prints it: after `[rank K] `, ended by a newline, and marked
/// where the rank stopped mid-line (killed, most likely) rather than passed off as whole.
fn framed(rank: usize, line: &[u8], whole: bool) -> Vec<u8> {
    let mut out = [format!("[rank {rank}] ").as_bytes(), line.strip_suffix(b"\n").unwrap_or(line)].concat();
    out.extend_from_slice(if whole { b"\n" } else { b" [cut off]\n" });
    out
}

struct Rank {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

/// An id no other launch has: this launcher's pid and its start time in nanoseconds.
fn unique_job_id() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("ondol-{}-{}", std::process::id(), now.as_nanos())
}

/// Runs the ranks of this node until all exit. Fails when a rank fails (naming it and its
/// status), when the launcher was interrupted, or when the options cannot work.
/// Returns the ranks' exit status where they stopped on request (see the module docs).
/// How a launch that did not fail ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every rank finished.
    Finished,
    /// The ranks stopped on request with a checkpoint: their exit status (128 + the signal).
    Stopped(u8),
    /// The launcher got this signal and forwarded it; the ranks ended without stopping on
    /// request (before training began, or on a signal training does not catch).
    Interrupted(i32),
}

pub fn launch(opts: &LaunchOptions) -> Result<Ended, CommError> {
    let LaunchOptions { nproc_per_node: n, nnodes, node_rank, .. } = *opts;
    if n == 0 || nnodes == 0 {
        return Err(CommError::Launch("--nproc-per-node and --nnodes must be at least 1".into()));
    }
    if node_rank >= nnodes {
        return Err(CommError::Launch(format!("--node-rank {node_rank} must be below --nnodes {nnodes}")));
    }
    let world = n.checked_mul(nnodes).ok_or_else(|| CommError::Launch("too many ranks".into()))?;
    let port = match opts.master_port {
        0 if nnodes > 1 => {
            return Err(CommError::Launch("--master-port 0 (pick a free port) works only with --nnodes 1".into()));
        }
        0 => free_port()?,
        p => p,
    };

    let job_id = match std::env::var("TORCHELASTIC_RUN_ID") {
        Ok(id) => Some(id),
        Err(_) if nnodes == 1 => Some(unique_job_id()),
        Err(_) => None,
    };

    let _signals = CatchTermination::install();
    let errors = std::sync::Arc::new(Errors::default());
    let mut ranks: Vec<Rank> = Vec::with_capacity(n);
    // Per rank, the threads copying its stdout and stderr.
    let mut pumps: Vec<[Option<thread::JoinHandle<Vec<u8>>>; 2]> = Vec::with_capacity(n);
    for local in 0..n {
        let rank = node_rank * n + local;
        let mut cmd = Command::new(&opts.program);
        cmd.args(&opts.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", &opts.master_addr)
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(id) = &job_id {
            cmd.env("TORCHELASTIC_RUN_ID", id);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                stop(&mut ranks, opts.grace);
                return Err(CommError::Launch(format!("cannot start rank {rank} ({}): {e}", opts.program.display())));
            }
        };
        let out = child.stdout.take().map(|out| {
            let errors = errors.clone();
            thread::spawn(move || pump(out, rank, false, &errors))
        });
        let err = child.stderr.take().map(|err| {
            let errors = errors.clone();
            thread::spawn(move || pump(err, rank, true, &errors))
        });
        pumps.push([out, err]);
        ranks.push(Rank { rank, child, status: None });
    }

    let outcome = supervise(&mut ranks, opts.grace);
    for (rank, streams) in ranks.iter().zip(pumps) {
        for (to_stderr, pump) in [false, true].into_iter().zip(streams) {
            print_tail(rank, to_stderr, &pump.map(|p| p.join().unwrap_or_default()).unwrap_or_default());
        }
    }
    outcome.map_err(|e| match (e, errors.repeated()) {
        (CommError::Launch(message), Some(repeats)) => CommError::Launch(format!("{message} ({repeats})")),
        (e, _) => e,
    })
}

/// The exit status of a rank that stopped on request (128 + SIGTERM or SIGUSR1), if it is one.
fn stopped_on_request(status: ExitStatus) -> Option<u8> {
    let stops = [128 + libc::SIGTERM, 128 + libc::SIGUSR1];
    status.code().filter(|code| stops.contains(code)).map(|code| code as u8)
}

/// Waits for every rank; see the module docs for the policy. Returns the exit status of ranks
/// that stopped on request (SIGTERM's where some stopped on each).
fn supervise(ranks: &mut [Rank], grace: Duration) -> Result<Ended, CommError> {
    let mut failures: Vec<(usize, ExitStatus)> = Vec::new();
    let mut stopped: Option<u8> = None;
    let mut interrupted: Option<i32> = None;
    let mut stopping_since: Option<Instant> = None;
    // The ranks still running when a failure made the launch stop them.
    let mut stopped_by_us = 0;
    let mut killed = false;
    loop {
        let sig = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                send_signal(&r.child, sig);
            }
            interrupted = Some(sig);
            if sig != libc::SIGUSR1 {
                stopping_since.get_or_insert_with(Instant::now);
            }
        }
        for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
            // An error here means the child is gone in a way we cannot observe; treat it as a
            // failure rather than waiting forever.
            let status = match r.child.try_wait() {
                Ok(s) => s,
                Err(_) => Some(ExitStatus::from_raw(libc::SIGKILL)),
            };
            if let Some(status) = status {
                r.status = Some(status);
                if let Some(code) = stopped_on_request(status) {
                    stopped = stopped.max(Some(code));
                } else if !status.success() && stopping_since.is_none() {
                    failures.push((r.rank, status));
                }
            }
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        if !failures.is_empty() && stopping_since.is_none() {
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                send_signal(&r.child, libc::SIGTERM);
                stopped_by_us += 1;
            }
            stopping_since = Some(Instant::now());
        }
        if let Some(since) = stopping_since
            && !killed
            && since.elapsed() >= grace
        {
            for r in ranks.iter().filter(|r| r.status.is_none()) {
                send_signal(&r.child, libc::SIGKILL);
            }
            killed = true;
        }
        thread::sleep(POLL);
    }

    if let Some(&(rank, status)) = failures.first() {
        let mut message = format!("rank {rank} {}", describe_status(status));
        for &(other, status) in &failures[1..] {
            message += &format!("; rank {other} {}", describe_status(status));
        }
        if stopped_by_us > 0 {
            message += &format!("; stopped the other {stopped_by_us} rank(s) of this node");
        }
        return Err(CommError::Launch(message));
    }
    // Ranks that ended neither well nor stopped on request while the launch was stopping: a
    // rank SIGKILLed writing its checkpoint leaves none of the step the others stopped at.
    let broken: Vec<String> = ranks
        .iter()
        .filter_map(|r| r.status.map(|s| (r.rank, s)))
        .filter(|&(_, s)| !s.success() && stopped_on_request(s).is_none())
        .map(|(rank, s)| format!("rank {rank} {}", describe_status(s)))
        .collect();
    match (stopped, interrupted) {
        // (After a signal during the last step, all finished.)
        (None, _) if broken.is_empty() => Ok(Ended::Finished),
        (Some(code), _) if broken.is_empty() => Ok(Ended::Stopped(code)),
        (Some(code), _) => Err(CommError::Launch(format!(
            "the ranks stopped on request (exit status {code}), but {}: the checkpoint of the step they stopped \
             at may be missing",
            broken.join("; ")
        ))),
        // Ranks ended by the signal, or failing as others went (a lost rendezvous): nothing
        // failed that the signal did not end.
        (None, Some(sig)) => Ok(Ended::Interrupted(sig)),
        (None, None) => Ok(Ended::Finished),
    }
}

/// Stops already-started ranks after a failed start: SIGTERM, then SIGKILL after `grace`.
fn stop(ranks: &mut [Rank], grace: Duration) {
    for r in ranks.iter() {
        send_signal(&r.child, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    for r in ranks.iter_mut() {
        while matches!(r.child.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                send_signal(&r.child, libc::SIGKILL);
                let _ = r.child.wait();
                break;
            }
            thread::sleep(POLL);
        }
    }
}

/// A port that was free a moment ago on the loopback interface.
fn free_port() -> Result<u16, CommError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| CommError::Launch(format!("cannot find a free port: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks running `script` under sh, given time to set their traps.
    fn sh_ranks(scripts: &[&str]) -> Vec<Rank> {
        let ranks = scripts
            .iter()
            .enumerate()
            .map(|(rank, script)| {
                let child = Command::new("sh").args(["-c", script]).spawn().unwrap();
                Rank { rank, child, status: None }
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        ranks
    }

    /// After a signal the launcher got and forwarded: ranks that stopped on request (143) make
    /// a clean stop only if no other rank was killed meanwhile (its checkpoint may be missing),
    /// ranks the signal ended make an interrupted launch, and ranks that all finished make a
    /// finished launch. (One test: the pending signal is
    /// global.)
    #[test]
    fn the_verdict_after_a_forwarded_signal_counts_every_rank() {
        let stops = "trap 'exit 143' TERM; sleep 5 & wait";
        let deaf = "trap '' TERM; sleep 5 & wait";
        let mut ranks = sh_ranks(&[stops, deaf]);
        PENDING_SIGNAL.store(libc::SIGTERM, Ordering::SeqCst);
        let err = supervise(&mut ranks, Duration::from_millis(200)).unwrap_err().to_string();
        assert!(err.contains("stopped on request (exit status 143), but rank 1 was killed by signal 9"), "{err}");

        let mut ranks = sh_ranks(&[stops, stops]);
        PENDING_SIGNAL.store(libc::SIGTERM, Ordering::SeqCst);
        assert_eq!(supervise(&mut ranks, Duration::from_secs(10)).unwrap(), Ended::Stopped(143));

        // Ranks the signal ended (before training caught it), or that failed as the others
        // went, make an interrupted launch, not a failed one.
        let ended = "sleep 5 & wait";
        let lost_its_peer = "trap 'exit 1' TERM; sleep 5 & wait";
        let mut ranks = sh_ranks(&[ended, lost_its_peer]);
        PENDING_SIGNAL.store(libc::SIGTERM, Ordering::SeqCst);
        assert_eq!(supervise(&mut ranks, Duration::from_secs(10)).unwrap(), Ended::Interrupted(libc::SIGTERM));

        let finishes = "trap 'exit 0' USR1; sleep 5 & wait";
        let mut ranks = sh_ranks(&[finishes, finishes]);
        PENDING_SIGNAL.store(libc::SIGUSR1, Ordering::SeqCst);
        assert_eq!(supervise(&mut ranks, Duration::from_secs(10)).unwrap(), Ended::Finished);
    }

    #[test]
    fn a_line_a_rank_did_not_finish_is_marked_cut_off() {
        assert_eq!(framed(2, b"error: no such file\n", true), b"[rank 2] error: no such file\n");
        assert_eq!(framed(2, b"error: ", false), b"[rank 2] error:  [cut off]\n");
        // A last line without a newline is kept for when the rank has ended: whole if it ended well.
        assert_eq!(pump(&b"first\nlast"[..], 2, false, &Errors::default()), b"last");
        assert_eq!(pump(&b"first\n"[..], 2, false, &Errors::default()), b"");
        assert_eq!(framed(2, b"last", true), b"[rank 2] last\n");
    }

    #[test]
    fn statuses_read_as_exit_codes_or_signals() {
        assert_eq!(describe_status(ExitStatus::from_raw(1 << 8)), "exited with status 1");
        assert_eq!(describe_status(ExitStatus::from_raw(libc::SIGKILL)), "was killed by signal 9 (SIGKILL)");
        assert_eq!(describe_status(ExitStatus::from_raw(libc::SIGSEGV)), "was killed by signal 11 (SIGSEGV)");
    }

    #[test]
    fn impossible_options_are_refused_before_anything_starts() {
        let opts = |nproc, nnodes, node_rank, master_port| LaunchOptions {
            nproc_per_node: nproc,
            nnodes,
            node_rank,
            master_addr: "127.0.0.1".into(),
            master_port,
            grace: Duration::from_secs(1),
            program: "/nonexistent/ondol".into(),
            args: Vec::new(),
        };
        let err = |o: LaunchOptions| launch(&o).unwrap_err().to_string();
        assert!(err(opts(0, 1, 0, 1)).contains("at least 1"));
        assert!(err(opts(1, 2, 2, 1)).contains("--node-rank 2 must be below --nnodes 2"));
        assert!(err(opts(1, 2, 0, 0)).contains("--master-port 0"));
        assert!(err(opts(2, 1, 0, 0)).contains("cannot start rank 0 (/nonexistent/ondol)"));
    }
}
