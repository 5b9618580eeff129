//! A training run asked to stop by SIGTERM or SIGUSR1 (a scheduler's warning before it kills a
//! job) finishes its step, writes a checkpoint and exits with 128 + the signal; every rank
//! stops after the same step, whichever got the signal; `--resume auto` goes on from there
//! exactly as if the run had never stopped.

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[model]
arch = "llama"
vocab_size = 257
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden = 48
max_seq_len = 32

[training]
steps = 100000
batch_size = 4
seq_len = 16
seed = 5
eval_every = 0
threads = 1

[data]
train = ["corpus.txt"]
val_fraction = 0.1
format = "text"
tokenizer = "bytes"

[optimizer]
lr = 3e-3

[lr_scheduler]
warmup_steps = 3
decay = "constant"   # the rate does not depend on training.steps, which the resumes change

[metrics]
log_every = 1

[checkpoint]
every = 0
"#;

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), "the run stops when it is asked to. ".repeat(500)).unwrap();
    std::fs::write(dir.path().join("run.toml"), CONFIG).unwrap();
    dir
}

/// `ondol ARGS` started in `dir` with `env`, its output captured.
fn start(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ondol"));
    cmd.args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Waits until the run in `run_dir` has logged a training step.
fn wait_for_training(run_dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let metrics = run_dir.join("metrics.jsonl");
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| m.contains("\"loss\"")) {
        assert!(Instant::now() < deadline, "no training step logged in {} after 120 s", metrics.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

/// The child's exit status and stderr.
fn finish(child: Child) -> (ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The step of the run's only checkpoint.
fn checkpoint_step(run_dir: &Path) -> u64 {
    let names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    names[0]["step-".len()..].parse().unwrap()
}

fn model_bytes(run_dir: &Path, step: u64) -> Vec<u8> {
    std::fs::read(run_dir.join(format!("checkpoints/step-{step:08}/model.safetensors"))).unwrap()
}

/// SIGTERM stops a run after its step with a checkpoint (exit 143); resumed, the run ends with
/// the weights of one that never stopped.
#[test]
fn sigterm_checkpoints_and_the_resumed_run_matches_one_never_stopped() {
    let dir = setup();
    let run = dir.path().join("run");
    let child = start(dir.path(), &["train", "run.toml", "--run-dir", "run"], &[]);
    wait_for_training(&run);
    signal(child.id(), "-TERM");
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(143), "{err}");
    let stopped = checkpoint_step(&run);
    assert!(err.contains(&format!("stopping at step {stopped} on request")) && err.contains("--resume auto"), "{err}");
    // (Not "val loss X -> X": no evaluation came after the first.)
    assert!(err.contains("at step 0, none since"), "{err}");

    let steps = format!("training.steps={}", stopped + 2);
    let (ok, err) =
        common::ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run", "--resume", "auto", "--set", &steps]);
    assert!(ok && err.contains(&format!("resumed at step {stopped}")), "{err}");
    let (ok, err) = common::ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "whole", "--set", &steps]);
    assert!(ok, "{err}");
    assert!(
        model_bytes(&run, stopped + 2) == model_bytes(&dir.path().join("whole"), stopped + 2),
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

/// Of two launched ranks, only rank 1 gets SIGUSR1: both stop after the same step (the one
/// checkpoint, whose step rank 0 logged last), and both exit with 138 (128 + SIGUSR1).
#[test]
fn a_signal_to_one_rank_stops_every_rank_after_the_same_step() {
    let dir = setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let args = ["train", "run.toml", "--run-dir", "run", "--set", "parallelism.dp=2", "--set", "training.batch_size=2"];
    let ranks: Vec<Child> = (0..2)
        .map(|rank| {
            let env = [
                ("RANK", rank.to_string()),
                ("LOCAL_RANK", rank.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("LOCAL_WORLD_SIZE", "2".to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.clone()),
                ("TORCHELASTIC_RUN_ID", format!("stop-test-{port}")),
            ];
            start(dir.path(), &args, &env)
        })
        .collect();
    let run = dir.path().join("run");
    wait_for_training(&run);
    signal(ranks[1].id(), "-USR1");
    let mut ranks = ranks.into_iter();
    let (rank0, rank1) = (finish(ranks.next().unwrap()), finish(ranks.next().unwrap()));
    assert_eq!(rank1.0.code(), Some(138), "rank 1: {}", rank1.1);
    assert_eq!(rank0.0.code(), Some(138), "rank 0: {}", rank0.1);
    let stopped = checkpoint_step(&run);
    assert!(rank0.1.contains(&format!("stopping at step {stopped} on request (signal 10)")), "{}", rank0.1);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], stopped, "{metrics}");
}

/// The pid of each rank `ondol launch` (pid `launcher`) started, by rank.
fn rank_pids(launcher: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).unwrap();
    let mut ranks: Vec<(usize, u32)> = children
        .split_whitespace()
        .map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            let rank = environ
                .split(|&b| b == 0)
                .find_map(|var| var.strip_prefix(b"RANK="))
                .map(|r| String::from_utf8_lossy(r).parse().unwrap())
                .unwrap();
            (rank, pid.parse().unwrap())
        })
        .collect();
    ranks.sort();
    ranks.into_iter().map(|(_, pid)| pid).collect()
}

fn launch_args(grace: &str) -> Vec<&str> {
    let train =
        ["train", "run.toml", "--run-dir", "run", "--set", "parallelism.dp=2", "--set", "training.batch_size=2"];
    let mut args = vec!["launch", "--nproc-per-node", "2", "--master-port", "0", "--grace-period", grace, "--"];
    args.extend(train);
    args
}

/// `ondol launch` forwards SIGUSR1 and, unlike after SIGTERM, does not kill the ranks when the
/// grace period ends: they take the time their checkpoint needs. A rank that gets the signal
/// twice (from a scheduler signalling the whole job, and forwarded) stops as once.
#[test]
fn the_launcher_forwards_sigusr1_and_gives_the_ranks_their_time() {
    let dir = setup();
    let launcher = start(dir.path(), &launch_args("0.001"), &[]);
    let run = dir.path().join("run");
    wait_for_training(&run);
    let leader = rank_pids(launcher.id())[0];
    signal(launcher.id(), "-USR1");
    signal(leader, "-USR1");
    let (status, err) = finish(launcher);
    assert_eq!(status.code(), Some(138), "{err}");
    let stopped = checkpoint_step(&run);
    assert!(err.contains(&format!("[rank 0] stopping at step {stopped} on request")), "{err}");
    assert!(err.contains("the ranks stopped on request (exit status 138)") && !err.contains("SIGKILL"), "{err}");
}

/// Under `ondol launch`, SIGTERM to rank 0 alone: the other rank's stop is no failure, so the
/// launcher does not stop rank 0 while it writes the checkpoint.
#[test]
fn a_rank_stopped_on_request_is_no_failure_of_the_launch() {
    let dir = setup();
    let launcher = start(dir.path(), &launch_args("30"), &[]);
    let run = dir.path().join("run");
    wait_for_training(&run);
    signal(rank_pids(launcher.id())[0], "-TERM");
    let (status, err) = finish(launcher);
    assert_eq!(status.code(), Some(143), "{err}");
    let stopped = checkpoint_step(&run);
    assert!(err.contains(&format!("[rank 0] stopping at step {stopped} on request (signal 15)")), "{err}");
    assert!(!err.contains("stopped the other"), "{err}");
}
