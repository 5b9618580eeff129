//! Stopping a training run on request: SIGTERM (what Slurm, Kubernetes and `ondol launch` send
//! before they kill a job) or SIGUSR1 (what `sbatch --signal=USR1@300` sends ahead of the time
//! limit). The run finishes the step it is in, writes a checkpoint and exits with 128 + the
//! signal's number, as the shell reports a process the signal ended; `--resume auto` goes on
//! from that checkpoint. Every rank votes with its step's loss all-reduce
//! ([`ondol_parallel::Engine::step`]), so all stop after the same step, whichever got the
//! signal, and all exit with the same status (SIGTERM's where any rank got SIGTERM).
//!
//! Repeated signals change nothing (a job's ranks often get one from the scheduler and the
//! same one forwarded by `ondol launch`); SIGKILL, or Ctrl-C (SIGINT, which keeps its
//! default), ends a run at once.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked this process to stop (0: none yet). SIGTERM wins over SIGUSR1.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic operations: async-signal-safe.
    RECEIVED.fetch_max(sig, Ordering::SeqCst); // (SIGTERM is 15, SIGUSR1 10)
}

fn catch(sig: libc::c_int) {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches an atomic, which is sound at any time.
    unsafe {
        libc::signal(sig, handler);
    }
}

/// SIGUSR1 asks the run to stop from now on. Called as a run starts: the signal's default
/// would end the process, and a scheduler may send it to a job still starting.
pub fn catch_sigusr1() {
    catch(libc::SIGUSR1);
}

/// SIGTERM asks the run to stop from now on. Called once training starts: until then a
/// SIGTERM ends the process at once, which loses nothing and lets a rank waiting in the
/// rendezvous for a rank that failed go without waiting for SIGKILL.
pub fn catch_sigterm() {
    catch(libc::SIGTERM);
}

/// The signal that asked this process to stop, if one has.
pub fn received() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&sig| sig != 0)
}
