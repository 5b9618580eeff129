//! Errors of the communication layer. Every message names what a user needs to act on: the
//! operation, the group (as world ranks), the ranks that were missing, the environment
//! variable or the store address.

use std::fmt;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A collective or point-to-point operation did not complete in time.
    #[error("{0}")]
    Timeout(TimeoutInfo),
    /// The communicator was broken by an earlier failure (a timeout on this or another rank of
    /// the group); every later operation fails at once instead of hanging.
    #[error("{op} on group {group}: the communicator is broken by an earlier failure ({cause})", group = Ranks(group))]
    Broken { op: &'static str, group: Vec<usize>, cause: TimeoutInfo },
    /// A peer's process ended (or its connection broke) while this rank waited for it.
    #[error("{op} on group {group}: rank {peer} {how}", group = Ranks(group))]
    Lost { op: &'static str, group: Vec<usize>, peer: usize, how: String },
    /// An operation was called with buffers or arguments that cannot work (a length mismatch,
    /// a root or peer outside the group, ranks calling different operations).
    #[error("{op} on group {group}: {message}", group = Ranks(group))]
    Invalid { op: &'static str, group: Vec<usize>, message: String },
    /// A parallel layout that cannot be built (e.g. tp * pp * dp != world size).
    #[error("invalid parallel layout: {0}")]
    Layout(String),
    /// A distributed-environment variable is missing, malformed or inconsistent.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// The rendezvous store failed (unreachable, timed out, bad reply).
    #[error("rendezvous store {addr}: {message}")]
    Store { addr: String, message: String },
    /// Launching or supervising the rank processes failed.
    #[error("launch: {0}")]
    Launch(String),
}

/// What a timed-out operation was waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeoutInfo {
    pub op: &'static str,
    /// The group's members, as world ranks.
    pub group: Vec<usize>,
    /// The members that never arrived, as world ranks (empty when the communicator cannot
    /// tell, as NCCL cannot).
    pub missing: Vec<usize>,
    pub timeout: Duration,
}

impl fmt::Display for TimeoutInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.missing.is_empty() {
            return write!(
                f,
                "{} timed out after {:.1} s on group {}: a rank did not arrive (NCCL cannot tell which)",
                self.op,
                self.timeout.as_secs_f64(),
                Ranks(&self.group)
            );
        }
        let who = if self.missing.len() == 1 { "rank" } else { "ranks" };
        write!(
            f,
            "{} timed out after {:.1} s on group {}: {who} {} did not arrive (a rank may itself be waiting on \
             another: every rank's message together shows which one is stuck)",
            self.op,
            self.timeout.as_secs_f64(),
            Ranks(&self.group),
            self.missing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
        )
    }
}

/// Formats a list of world ranks as `[0, 1, 2]`.
pub(crate) struct Ranks<'a>(pub &'a [usize]);

impl fmt::Display for Ranks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl CommError {
    pub(crate) fn env(var: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Env { var: var.into(), message: message.into() }
    }

    pub(crate) fn store(addr: impl fmt::Display, message: impl Into<String>) -> Self {
        Self::Store { addr: addr.to_string(), message: message.into() }
    }
}

/// Layout and environment errors are configuration errors; the rest stop training.
impl From<CommError> for ondol_core::Error {
    fn from(e: CommError) -> Self {
        match e {
            CommError::Layout(message) => ondol_core::Error::config("parallelism", message),
            CommError::Env { var, message } => ondol_core::Error::config(var, message),
            other => ondol_core::Error::Training(other.to_string()),
        }
    }
}
