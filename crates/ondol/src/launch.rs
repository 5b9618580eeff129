//! `ondol launch` and the hidden `ondol comm-selftest`: argument parsing only; the launcher and
//! the self-test live in ondol-comm.

use clap::Args;
use ondol_comm::DistEnv;
use ondol_comm::launch::{Ended, LaunchOptions, signal_name};
use ondol_comm::selftest::SelftestOptions;
use ondol_core::{Error, Result};
use std::ffi::OsString;
use std::time::Duration;

#[derive(Args)]
pub struct LaunchArgs {
    /// Processes (ranks) to start on this node, usually one per GPU.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index (0 runs the rendezvous store).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of the rendezvous store on node 0 (0: pick a free one; single node only).
    #[arg(long, default_value_t = ondol_comm::env::DEFAULT_MASTER_PORT)]
    pub master_port: u16,
    /// Seconds stopped ranks get between SIGTERM and SIGKILL. A training rank asked to stop
    /// by SIGTERM writes a checkpoint first: give it the time that takes (SIGUSR1 asks the same
    /// and is never followed by SIGKILL).
    #[arg(long, default_value_t = 30.0)]
    pub grace_period: f64,
    /// The ondol command every rank runs, after `--`, e.g. `-- train config.toml`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Args)]
pub struct SelftestArgs {
    /// Make this rank exit with an error after connecting.
    #[arg(long)]
    pub fail_rank: Option<usize>,
    /// Make this rank sleep forever after connecting.
    #[arg(long)]
    pub hang_rank: Option<usize>,
    /// Seconds every store operation may wait.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
}

fn seconds(flag: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| Error::config(flag, format!("{s} is not a number of seconds >= 0")))
}

/// Runs `ondol COMMAND` once per rank of this node. Returns the exit status to end with where
/// the ranks stopped on request (a training run's checkpoint-and-stop, 128 + its signal) or a
/// signal interrupted the launch (128 + that signal, as the shell reports a process it ended).
pub fn launch(args: LaunchArgs) -> Result<Option<u8>> {
    let program = std::env::current_exe().map_err(|e| Error::io("cannot find the ondol executable to launch", e))?;
    let opts = LaunchOptions {
        nproc_per_node: args.nproc_per_node,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr,
        master_port: args.master_port,
        grace: seconds("--grace-period", args.grace_period)?,
        program,
        args: args.command,
    };
    match ondol_comm::launch::launch(&opts)? {
        Ended::Finished => Ok(None),
        Ended::Stopped(status) => {
            ondol_core::say!(
                "the ranks stopped on request (exit status {status}): `--resume auto` goes on from their checkpoint"
            );
            Ok(Some(status))
        }
        Ended::Interrupted(sig) => {
            ondol_core::say!(
                "launch: interrupted by {}, which it forwarded to every rank: they ended without stopping on \
                 request (before training began, or on a signal training does not catch); `--resume auto` goes on \
                 from a run's last checkpoint",
                signal_name(sig)
            );
            Ok(Some(128 + sig as u8))
        }
    }
}

/// Checks the rendezvous of a launched job.
pub fn selftest(args: SelftestArgs) -> Result<()> {
    let env = DistEnv::from_env()?;
    let opts = SelftestOptions {
        fail_rank: args.fail_rank,
        hang_rank: args.hang_rank,
        timeout: seconds("--timeout", args.timeout)?,
    };
    Ok(ondol_comm::selftest::selftest(&env, &opts)?)
}
