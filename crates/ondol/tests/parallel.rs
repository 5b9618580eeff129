//! Data parallelism against one rank, same global batch, fp32: ranks are threads joined by a
//! deterministic communicator, so the only difference from one rank is the order in which
//! the two halves of each gradient are summed.

mod common;
use common::ondol_err;

use ondol::config::RunConfig;
use ondol::trainer::{Data, Trainer};
use ondol_ckpt::checkpoint;
use ondol_comm::ThreadComm;
use ondol_cpu::CpuBackend;
use std::path::Path;
use std::time::Duration;

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
steps = 20
batch_size = 8
seq_len = 16
seed = 4
grad_accum = 2

[data]
train = ["corpus.txt"]
format = "text"
tokenizer = "bytes"

[optimizer]
lr = 3e-3

[lr_scheduler]
warmup_steps = 4
"#;

/// Runs `steps` steps on `dp` thread ranks (optionally resuming every rank from `resume`,
/// and saving the leader's checkpoint into `save`); returns rank 0's losses, final weights
/// and AdamW state length, after checking that every rank ends with the same weights.
fn train_with(
    dir: &Path,
    dp: usize,
    zero: u8,
    steps: usize,
    resume: Option<&Path>,
    save: Option<&Path>,
) -> (Vec<f64>, Vec<f32>, usize) {
    let overrides =
        [format!("training.batch_size={}", 8 / dp), format!("parallelism.dp={dp}"), format!("parallelism.zero={zero}")];
    let cfg = RunConfig::load(&dir.join("run.toml"), &overrides).unwrap();
    let data = Data::open(&cfg, dir).unwrap();
    let comms = ThreadComm::group(dp, Duration::from_secs(60));
    let results: Vec<(Vec<f64>, Vec<f32>, usize)> = std::thread::scope(|s| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let (cfg, data) = (cfg.clone(), data.clone());
                s.spawn(move || {
                    let mut t = Trainer::data_parallel_rank(CpuBackend, cfg, data, Box::new(c)).unwrap();
                    if let Some(ckpt) = resume {
                        t.restore(checkpoint::load(ckpt, &t.model.cfg, &t.model.layout).unwrap()).unwrap();
                    }
                    let losses = (0..steps).map(|_| t.step().unwrap().loss).collect();
                    // Every rank takes part in the snapshot (ZeRO gathers the moments); the leader saves.
                    if let (Some(run_dir), Some(snap)) = (save, t.snapshot().unwrap()) {
                        checkpoint::save(run_dir, &snap).unwrap();
                    }
                    (losses, t.params.clone(), t.opt.m.len())
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for r in &results[1..] {
        assert_eq!(r.0, results[0].0, "ranks report different losses");
        assert!(r.1.iter().zip(&results[0].1).all(|(a, b)| a.to_bits() == b.to_bits()), "rank weights diverged");
    }
    results.into_iter().next().unwrap()
}

fn train(dir: &Path, dp: usize) -> (Vec<f64>, Vec<f32>) {
    let (losses, weights, _) = train_with(dir, dp, 0, 20, None, None);
    (losses, weights)
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), "온돌 warms the floor from below; ".repeat(2000)).unwrap();
    std::fs::write(dir.path().join("run.toml"), CONFIG).unwrap();
    dir
}

#[test]
fn data_parallel_matches_one_rank() {
    let dir = setup();
    let (one, w1) = train(dir.path(), 1);
    for dp in [2, 4] {
        let (many, w) = train(dir.path(), dp);
        for (step, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "dp={dp} step {}: loss {a} vs {b}", step + 1);
        }
        let worst = w1.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "dp={dp}: final weights differ by up to {worst:e}");
        eprintln!("dp={dp}: last loss {} vs {}, max weight difference {worst:e}", many[19], one[19]);
    }
}

#[test]
fn the_cli_runs_data_parallel_ranks_and_refuses_to_resume_at_another_size() {
    let dir = setup();
    let ondol = |args: &[&str]| ondol_err(dir.path(), args);
    let (ok, err) = ondol(&[
        "train",
        "run.toml",
        "--run-dir",
        "run",
        "--set",
        "parallelism.dp=2",
        "--set",
        "training.batch_size=4",
    ]);
    assert!(ok && err.contains("x 2 data-parallel") && err.contains("done: 20 steps"), "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 2, "one writer only:\n{metrics}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("run/checkpoints/step-00000020/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["layout"]["dp"], 2);
    // Another data-parallel size must keep the global batch (here 8 sequences).
    let (ok, err) =
        ondol(&["train", "run.toml", "--run-dir", "run", "--resume", "auto", "--set", "training.batch_size=4"]);
    assert!(!ok && err.contains("global batch"), "{err}");
    let (ok, err) = ondol(&["train", "run.toml", "--run-dir", "run", "--resume", "auto", "--set", "training.steps=24"]);
    assert!(ok && err.contains("resumed at step 20"), "{err}");
    let (ok, err) = ondol(&["train", "run.toml", "--set", "parallelism.tp=2"]);
    assert!(!ok && err.contains("tensor and pipeline parallelism are not implemented"), "{err}");
}

#[test]
fn zero_1_equals_plain_data_parallel_with_a_fraction_of_the_optimizer_state() {
    let dir = setup();
    let (plain, w_plain, m_plain) = train_with(dir.path(), 4, 0, 20, None, None);
    let (zero, w_zero, m_zero) = train_with(dir.path(), 4, 1, 20, None, None);
    let n = w_plain.len();
    assert_eq!(m_plain, n);
    assert_eq!(m_zero, n.div_ceil(4), "ZeRO-1 AdamW state per rank must be 1/dp of the parameters");
    for (a, b) in plain.iter().zip(&zero) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "loss {a} vs {b}");
    }
    let worst = w_plain.iter().zip(&w_zero).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-6, "ZeRO-1 weights differ from plain DP by {worst:e}");
    eprintln!("zero-1 vs plain dp=4: max weight difference {worst:e}; AdamW state {m_zero} of {n} per rank");
}

#[test]
fn a_zero_1_run_resumes_exactly_from_its_whole_checkpoint() {
    let dir = setup();
    let (want, w_want, _) = train_with(dir.path(), 2, 1, 12, None, None);
    let run = dir.path().join("run");
    let (mut got, _, _) = train_with(dir.path(), 2, 1, 6, None, Some(&run));
    let ckpt = checkpoint::latest(&run).unwrap();
    let (rest, w_got, _) = train_with(dir.path(), 2, 1, 6, Some(&ckpt), None);
    got.extend(rest);
    assert_eq!(got, want, "loss curves differ after resuming");
    assert!(w_got.iter().zip(&w_want).all(|(a, b)| a.to_bits() == b.to_bits()), "weights differ after resuming");
}

#[test]
fn a_checkpoint_resumes_at_another_data_parallel_size() {
    let dir = setup();
    let (want, w_want, _) = train_with(dir.path(), 2, 1, 12, None, None);
    let run = dir.path().join("run");
    let (first, _, _) = train_with(dir.path(), 2, 1, 6, None, Some(&run));
    let ckpt = checkpoint::latest(&run).unwrap();
    for (dp, zero) in [(1, 0), (4, 1)] {
        let (rest, w, _) = train_with(dir.path(), dp, zero, 6, Some(&ckpt), None);
        for (step, (a, b)) in want.iter().zip(first.iter().chain(&rest)).enumerate() {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "dp={dp} step {}: loss {a} vs {b}", step + 1);
        }
        let worst = w_want.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "dp={dp}: weights differ by {worst:e} from the uninterrupted run");
    }
}

#[test]
fn train_refuses_to_run_as_one_of_several_launched_processes() {
    let dir = setup();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(["train", "run.toml", "--run-dir", "run"])
        .current_dir(dir.path())
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rank 1 of 2") && err.contains("parallelism.dp = 2"), "{err}");
    assert!(!dir.path().join("run").exists(), "a refused run left a run directory behind");
}
