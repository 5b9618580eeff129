//! The loop learns, not merely that the loss falls: train on tokens from a random Markov
//! chain, whose best achievable loss is known exactly, and require the validation loss to
//! come within 0.05 nats of it. Also: the same config and seed give the same bits.

use ondol::config::RunConfig;
use ondol::metrics::Metrics;
use ondol::trainer::{self, Data, Trainer};
use ondol_core::Rng;
use ondol_cpu::CpuBackend;
use std::path::Path;

const STATES: usize = 12;

/// A random sparse transition matrix: each state moves to 3 successors.
fn chain(seed: u64) -> Vec<[f64; STATES]> {
    let mut rng = Rng::new(seed);
    (0..STATES)
        .map(|_| {
            let mut row = [0.0; STATES];
            for _ in 0..3 {
                row[rng.below(STATES as u64) as usize] += 0.2 + rng.next_f64();
            }
            let total: f64 = row.iter().sum();
            row.map(|p| p / total)
        })
        .collect()
}

fn entropy(p: &[f64]) -> f64 {
    p.iter().filter(|&&p| p > 0.0).map(|p| -p * p.ln()).sum()
}

/// The entropy rate sum_i pi_i H(P_i), with pi the stationary distribution (power iteration).
fn entropy_rate(p: &[[f64; STATES]]) -> f64 {
    let mut pi = vec![1.0 / STATES as f64; STATES];
    for _ in 0..10_000 {
        let mut next = vec![0.0; STATES];
        for (i, row) in p.iter().enumerate() {
            for (j, q) in row.iter().enumerate() {
                next[j] += pi[i] * q;
            }
        }
        pi = next;
    }
    p.iter().zip(&pi).map(|(row, w)| w * entropy(row)).sum()
}

fn sample(p: &[[f64; STATES]], n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let mut s = 0usize;
    (0..n)
        .map(|_| {
            let u = rng.next_f64();
            let mut acc = 0.0;
            s = p[s]
                .iter()
                .position(|q| {
                    acc += q;
                    u < acc
                })
                .unwrap_or(STATES - 1);
            s as u32
        })
        .collect()
}

const LLAMA: &str = r#"
[model]
arch = "llama"
vocab_size = 12
d_model = 32
n_layers = 1
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
max_seq_len = 64
"#;

const MAMBA: &str = r#"
[model]
arch = "mamba"
vocab_size = 12
d_model = 32
n_layers = 1
max_seq_len = 64
[model.ssm]
state_size = 8
chunk_size = 16
"#;

const MAMBA2: &str = r#"
[model]
arch = "mamba2"
vocab_size = 12
d_model = 32
n_layers = 1
max_seq_len = 64
[model.ssm]
state_size = 16
head_dim = 16
chunk_size = 16
"#;

const HYBRID: &str = r#"
[model]
arch = "hybrid"
pattern = "M*-"
vocab_size = 12
d_model = 32
n_layers = 3
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
max_seq_len = 64
[model.ssm]
state_size = 16
head_dim = 16
chunk_size = 16
"#;

fn config(dir: &Path, steps: u64) -> RunConfig {
    config_for(LLAMA, dir, steps)
}

/// A run of `steps` on the Markov data in `dir` with the `[model]` section `model`.
fn config_for(model: &str, dir: &Path, steps: u64) -> RunConfig {
    assert!(model.contains(&format!("vocab_size = {STATES}")));
    let warmup = (steps / 20).min(20);
    let text = format!(
        r#"
{model}

[training]
steps = {steps}
batch_size = 16
seq_len = 64
seed = 5
eval_batches = 20
threads = 2

[data]
train = ["{train}"]
val = ["{val}"]

[optimizer]
lr = 3e-3
weight_decay = 0.0

[lr_scheduler]
warmup_steps = {warmup}
min_lr_ratio = 0.05
"#,
        train = dir.join("train.bin").display(),
        val = dir.join("val.bin").display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    RunConfig::load(&path, &[]).unwrap()
}

fn write_data(dir: &Path) -> f64 {
    let p = chain(11);
    let rate = entropy_rate(&p);
    ondol_data::write_shard(dir.join("train.bin"), &sample(&p, 300_000, 1), None).unwrap();
    ondol_data::write_shard(dir.join("val.bin"), &sample(&p, 30_000, 2), None).unwrap();
    // Every target has its predecessor among the inputs (windows hold seq_len + 1 tokens),
    // which is all a first-order chain needs: the best achievable loss is the entropy rate.
    rate
}

#[test]
fn validation_loss_reaches_the_entropy_rate_of_a_markov_source() {
    reaches_the_entropy_rate("llama", LLAMA);
}

#[test]
fn mamba_reaches_the_entropy_rate() {
    reaches_the_entropy_rate("mamba", MAMBA);
}

#[test]
fn mamba2_reaches_the_entropy_rate() {
    reaches_the_entropy_rate("mamba2", MAMBA2);
}

#[test]
fn hybrid_reaches_the_entropy_rate() {
    reaches_the_entropy_rate("hybrid", HYBRID);
}

fn reaches_the_entropy_rate(name: &str, model: &str) {
    let dir = tempfile::tempdir().unwrap();
    let rate = write_data(dir.path());
    let cfg = config_for(model, dir.path(), 400);
    let data = Data::open(&cfg, Path::new(".")).unwrap();
    let mut trainer = Trainer::new(CpuBackend, cfg, data).unwrap();
    let mut metrics = Metrics::create(dir.path(), 400, 1e11, None).unwrap();
    let mut writer = ondol_ckpt::Writer::new(dir.path(), 1, 0).unwrap();
    let summary = trainer::run(&mut trainer, &mut metrics, Some(&mut writer)).unwrap();
    let val = summary.final_val_loss.unwrap();
    let start = summary.first_val_loss.unwrap();
    assert!(start > rate + 1.0, "an untrained model should be far from the rate: {start} vs {rate}");
    eprintln!("markov ({name}): validation loss {start:.4} -> {val:.4} nats, entropy rate {rate:.4}");
    assert!((val - rate).abs() < 0.05, "{name}: validation loss {val:.4} vs entropy rate {rate:.4} nats");
}

#[test]
fn same_config_and_seed_give_identical_bits() {
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path());
    let run = || {
        let cfg = config(dir.path(), 15);
        let data = Data::open(&cfg, Path::new(".")).unwrap();
        let mut t = Trainer::new(CpuBackend, cfg, data).unwrap();
        let losses: Vec<u64> = (0..15).map(|_| t.step().unwrap().loss.to_bits()).collect();
        (losses, t.whole_params().unwrap().unwrap().iter().map(|p| p.to_bits()).collect::<Vec<_>>())
    };
    let (a, b) = (run(), run());
    assert_eq!(a.0, b.0, "loss curves differ");
    assert!(a.1 == b.1, "final weights differ");
    // And a different seed really is different.
    let cfg = config(dir.path(), 15);
    let mut cfg2 = cfg.clone();
    cfg2.training.seed = 6;
    let data = Data::open(&cfg2, Path::new(".")).unwrap();
    let mut t = Trainer::new(CpuBackend, cfg2, data).unwrap();
    assert_ne!(t.step().unwrap().loss.to_bits(), a.0[0]);
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    // Two micro-batches of 8 with accumulation must match one batch of 16: a step reads the
    // same (shuffled) sequences however its global batch is cut.
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path());
    let big = config(dir.path(), 3);
    let mut small = big.clone();
    small.training.batch_size = 8;
    small.training.grad_accum = 2;
    let mut losses = Vec::new();
    for cfg in [big, small] {
        let data = Data::open(&cfg, Path::new(".")).unwrap();
        let mut t = Trainer::new(CpuBackend, cfg, data).unwrap();
        let l: Vec<f64> = (0..3).map(|_| t.step().unwrap().loss).collect();
        losses.push((l, t.whole_params().unwrap().unwrap()));
    }
    for (a, b) in losses[0].0.iter().zip(&losses[1].0) {
        assert!((a - b).abs() < 1e-5 * a.abs(), "loss {a} vs {b}");
    }
    let max_diff = ondol_core::gradcheck::max_abs_diff(&losses[0].1, &losses[1].1);
    assert!(max_diff < 1e-5, "weights differ by {max_diff}");
}
