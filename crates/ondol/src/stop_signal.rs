//! Stopping a training run on request: SIGTERM (what Slurm, Kubernetes and `ondol launch` send
//! before they kill a job) or SIGUSR1 (what `sbatch --signal=USR1@300` sends ahead of the time
//! limit). The run finishes the step it is in, writes a checkpoint and exits with 128 + the
//! signal's number, as the shell reports a process the signal ended; `--resume auto` goes on
//! from that checkpoint. Every rank votes with its step's loss all-reduce
//! ([`ondol_parallel::Engine::step`]), so all stop after the same step, whichever got the signal.
//!
//! A second signal ends the process at once, as does SIGINT (Ctrl-C), which keeps its default.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked this process to stop (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signals that ask a run to stop.
const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGUSR1];

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic swap, and signal(2) and raise(3): async-signal-safe.
    if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: restoring the default disposition and raising the signal are sound in a handler.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// From now on, SIGTERM and SIGUSR1 ask the run to stop instead of ending the process (once:
/// the next one ends it). Called once training starts: until then nothing is lost.
pub fn catch() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in STOP_SIGNALS {
        // SAFETY: the handler only stores to an atomic, which is sound at any time.
        unsafe {
            libc::signal(sig, handler);
        }
    }
}

/// The signal that asked this process to stop, if one has.
pub fn received() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&sig| sig != 0)
}

/// The exit status of a run stopped on request: 128 + the signal's number where this process
/// received one (143 for SIGTERM), else 1 (another rank received it).
pub fn exit_status() -> u8 {
    received().map_or(1, |sig| 128 + sig as u8)
}
