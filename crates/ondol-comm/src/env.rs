//! [`DistEnv`]: who this process is in a distributed job, read from the environment.
//!
//! Two vocabularies are understood, per variable, torchrun's taking precedence (so an sbatch
//! script may run `srun` and still pin `MASTER_PORT`, or run torchrun-style launchers inside an
//! allocation):
//!
//! | field            | torchrun / `ondol launch` | Slurm (`srun`)                                        | default     |
//! |------------------|---------------------------|-------------------------------------------------------|-------------|
//! | rank             | `RANK`                    | `SLURM_PROCID`                                        | 0           |
//! | world size       | `WORLD_SIZE`              | `SLURM_NTASKS`                                        | 1           |
//! | local rank       | `LOCAL_RANK`              | `SLURM_LOCALID`                                       | rank        |
//! | local world size | `LOCAL_WORLD_SIZE`        | `SLURM_NTASKS_PER_NODE` / `SLURM_TASKS_PER_NODE` entry of `SLURM_NODEID`, else ntasks / `SLURM_NNODES` | world size |
//! | master address   | `MASTER_ADDR`             | first host of `SLURM_JOB_NODELIST` (`SLURM_NODELIST`) | 127.0.0.1   |
//! | master port      | `MASTER_PORT`             | 15000 + `SLURM_JOB_ID` mod 20000 (one port per job)   | 29500       |
//! | job id           | `TORCHELASTIC_RUN_ID`     | `SLURM_JOB_ID`.`SLURM_STEP_ID`.`SLURM_RESTART_COUNT` (those set) | none |
//!
//! The job id keeps a job's ranks out of another job's store: two launches on one port (the
//! second's rank 0 fails to bind, its other ranks would join the first job) are told apart.
//! `ondol launch` on one node gives every launch an id of its own; torchrun passes its
//! `--rdzv-id` (or "none", which tells no two jobs apart).
//! With nothing set the process is a single rank. The parser takes a lookup function instead of
//! reading the process environment, so tests pass explicit maps.

use crate::error::CommError;

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The same on every rank of a job, different between jobs; empty where none is set.
    pub job_id: String,
}

/// torchrun's default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl DistEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<DistEnv, CommError> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Reads the variables through `get` (e.g. a map in tests).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<DistEnv, CommError> {
        let var = |names: &[&'static str]| names.iter().find_map(|&n| get(n).map(|v| (n, v.trim().to_string())));
        let number = |names: &[&'static str]| -> Result<Option<(&'static str, usize)>, CommError> {
            let Some((name, value)) = var(names) else { return Ok(None) };
            let n = value
                .parse::<usize>()
                .map_err(|_| CommError::env(name, format!("{value:?} is not a non-negative integer")))?;
            Ok(Some((name, n)))
        };

        let rank = number(&["RANK", "SLURM_PROCID"])?;
        let world = number(&["WORLD_SIZE", "SLURM_NTASKS"])?;
        let (world_var, world_size) = world.unwrap_or(("WORLD_SIZE", 1));
        let (rank_var, rank) = rank.unwrap_or(("RANK", 0));
        if world_size == 0 {
            return Err(CommError::env(world_var, "is 0; a job has at least one rank"));
        }
        if rank >= world_size {
            return Err(CommError::env(
                rank_var,
                format!("is {rank}, but {world_var} is {world_size}; ranks run from 0 to {}", world_size - 1),
            ));
        }

        let local_world = match number(&["LOCAL_WORLD_SIZE"])? {
            Some(found) => Some(found),
            None => slurm_local_world(get, world_size)?.map(|n| ("SLURM_NTASKS_PER_NODE", n)),
        };
        let (local_world_var, local_world_size) = local_world.unwrap_or(("LOCAL_WORLD_SIZE", world_size));
        let (local_var, local_rank) = number(&["LOCAL_RANK", "SLURM_LOCALID"])?.unwrap_or(("LOCAL_RANK", rank));
        if local_world_size == 0 || local_world_size > world_size {
            return Err(CommError::env(
                local_world_var,
                format!("is {local_world_size}; it must be between 1 and the world size {world_size}"),
            ));
        }
        if local_rank >= local_world_size {
            return Err(CommError::env(
                local_var,
                format!("is {local_rank}, but {local_world_var} is {local_world_size}"),
            ));
        }

        let master_addr = match var(&["MASTER_ADDR"]) {
            Some((_, addr)) if !addr.is_empty() => addr,
            Some(_) => return Err(CommError::env("MASTER_ADDR", "is empty")),
            None => match var(&["SLURM_JOB_NODELIST", "SLURM_NODELIST"]) {
                Some((name, list)) => first_host(&list).map_err(|m| CommError::env(name, m))?,
                None => "127.0.0.1".to_string(),
            },
        };
        let master_port = match var(&["MASTER_PORT"]) {
            Some((_, p)) => match p.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(CommError::env("MASTER_PORT", format!("{p:?} is not a port between 1 and 65535"))),
            },
            None => match number(&["SLURM_JOB_ID"])? {
                Some((_, job)) => 15000 + (job % 20000) as u16,
                None => DEFAULT_MASTER_PORT,
            },
        };
        // Under Slurm, a job's steps and a requeued job's runs have ids of their own.
        let job_id = match var(&["TORCHELASTIC_RUN_ID"]) {
            Some((_, id)) => id,
            None => ["SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"]
                .iter()
                .filter_map(|&n| var(&[n]).map(|(_, v)| v))
                .collect::<Vec<_>>()
                .join("."),
        };
        Ok(DistEnv { rank, world_size, local_rank, local_world_size, master_addr, master_port, job_id })
    }

    /// `MASTER_ADDR:MASTER_PORT`, the store's address.
    pub fn store_addr(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// The number of tasks on this node under Slurm: the entry for `SLURM_NODEID` of
/// `SLURM_NTASKS_PER_NODE` or `SLURM_TASKS_PER_NODE` (forms `4`, `2(x3),1`), else
/// `SLURM_NTASKS / SLURM_NNODES` when that divides evenly.
fn slurm_local_world(get: &dyn Fn(&str) -> Option<String>, world: usize) -> Result<Option<usize>, CommError> {
    let node = match get("SLURM_NODEID") {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| CommError::env("SLURM_NODEID", format!("{v:?} is not a non-negative integer")))?,
    };
    for name in ["SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"] {
        if let Some(list) = get(name) {
            let counts = parse_tasks_per_node(&list).map_err(|m| CommError::env(name, m))?;
            return match counts.get(node) {
                Some(&n) => Ok(Some(n)),
                // A single entry applies to every node (`--ntasks-per-node=4`).
                None if counts.len() == 1 => Ok(Some(counts[0])),
                None => Err(CommError::env(name, format!("{list:?} has no entry for SLURM_NODEID {node}"))),
            };
        }
    }
    let nodes = get("SLURM_NNODES").and_then(|v| v.trim().parse::<usize>().ok());
    Ok(nodes.filter(|&n| n > 0 && world.is_multiple_of(n)).map(|n| world / n))
}

/// Expands Slurm's per-node task counts: `2(x3),1` is `[2, 2, 2, 1]`.
pub fn parse_tasks_per_node(list: &str) -> Result<Vec<usize>, String> {
    let bad = || format!("{list:?} is not a task count list like `4` or `2(x3),1`");
    let mut counts = Vec::new();
    for entry in list.trim().split(',') {
        let (count, repeat) = match entry.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')').ok_or_else(bad)?.parse::<usize>().map_err(|_| bad())?),
            None => (entry, 1),
        };
        let count = count.parse::<usize>().map_err(|_| bad())?;
        counts.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(counts)
}

/// The first host of a Slurm node list (`node[01-04,07]` -> `node01`).
pub fn first_host(list: &str) -> Result<String, String> {
    expand_nodelist(list)?.into_iter().next().ok_or_else(|| format!("{list:?} names no host"))
}

/// Expands a Slurm node list: comma-separated hosts, each with any number of bracketed ranges
/// (`gpu-[3-5]`, `node[01-04,07]`, `rack[1-2]-n[1-2]`). Zero padding is kept (`01`).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let list = list.trim();
    let mut hosts = Vec::new();
    // Split at top-level commas only (commas inside brackets separate ranges).
    let (mut depth, mut start) = (0i32, 0);
    let mut items = Vec::new();
    for (i, ch) in list.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("{list:?} has unbalanced or nested brackets"));
        }
    }
    if depth != 0 {
        return Err(format!("{list:?} has an unclosed bracket"));
    }
    items.push(&list[start..]);
    for item in items {
        if item.is_empty() {
            return Err(format!("{list:?} has an empty host name"));
        }
        hosts.extend(expand_host(item).map_err(|m| format!("{list:?}: {m}"))?);
    }
    Ok(hosts)
}

/// Expands one host pattern such as `rack[1-2]-n[01,03]`.
fn expand_host(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('[') else { return Ok(vec![pattern.to_string()]) };
    let close = pattern[open..].find(']').map(|c| open + c).ok_or("unclosed bracket")?;
    let (prefix, ranges, rest) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let tails = expand_host(rest)?;
    let mut out = Vec::new();
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let bad = || format!("`{range}` is not a number or a range like 01-04");
        let (a, b) = (lo.parse::<u64>().map_err(|_| bad())?, hi.parse::<u64>().map_err(|_| bad())?);
        if a > b {
            return Err(format!("range `{range}` runs backwards"));
        }
        for n in a..=b {
            for tail in &tails {
                out.push(format!("{prefix}{n:0width$}{tail}", width = lo.len()));
            }
        }
    }
    Ok(out)
}
