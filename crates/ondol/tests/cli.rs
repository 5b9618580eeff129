//! The `ondol` binary as a user meets it: bad configs and bad data are refused with one
//! clear message naming the file, the key and what would be valid; never a panic.

mod common;
use common::ondol_err;

use ondol::config::RunConfig;
use std::process::Command;

const BASE: &str = r#"
[model]
arch = "llama"
vocab_size = 257
d_model = 16
n_layers = 1
n_heads = 2
max_seq_len = 16

[training]
steps = 2
batch_size = 2
seq_len = 8
eval_batches = 1

[data]
train = ["corpus.txt"]
val_fraction = 0.1
format = "text"
tokenizer = "bytes"

[optimizer]
lr = 1e-3
"#;

fn setup(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), "온돌 warms the floor. ".repeat(200)).unwrap();
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    dir
}

#[test]
fn a_valid_config_trains_and_writes_metrics_and_the_resolved_config() {
    let dir = setup(BASE);
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--set", "training.steps=3", "--run-dir", "out"]);
    assert!(ok, "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train_rows: Vec<_> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train_rows.last().unwrap()["step"], 3);
    for key in ["lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "mem_bytes"] {
        assert!(train_rows[0].get(key).is_some(), "metrics row lacks {key}: {}", train_rows[0]);
    }
    assert!(rows.iter().any(|r| r["step"] == 3 && r.get("val_loss").is_some()), "no final eval row");
    let resolved = std::fs::read_to_string(dir.path().join("out/ondol.toml")).unwrap();
    assert!(resolved.contains("steps = 3"), "{resolved}");
    assert!(err.contains("done: 3 steps"), "{err}");
}

/// Documents that attend only within their own: a run trains so (its resolved config says it),
/// `eval` of it masks as it trained (`--mask-documents` is then no change) and differs with
/// `--mask-documents=false`; a Mamba model, and data without a tokenizer to find documents by, are refused.
#[test]
fn masked_documents_train_evaluate_and_are_refused_where_they_cannot_be() {
    let dir = setup(&BASE.replace("train = [\"corpus.txt\"]", "train = [\"docs/*.txt\"]"));
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    // Documents of 3 to 7 bytes: every sequence of 8 holds a boundary.
    for i in 0..40 {
        let text = format!("문{}", "o".repeat(i % 5));
        std::fs::write(dir.path().join(format!("docs/{i:02}.txt")), text).unwrap();
    }
    let train = ["train", "run.toml", "--set", "training.mask_documents=true", "--run-dir", "out"];
    let (ok, err) = ondol_err(dir.path(), &train);
    assert!(ok, "{err}");
    // The same run unmasked trains on other attention: other losses.
    let plain = ["train", "run.toml", "--run-dir", "plain"];
    let (ok, err) = ondol_err(dir.path(), &plain);
    assert!(ok, "{err}");
    let losses = |run: &str| logged_losses(&dir.path().join(run));
    assert_ne!(losses("out"), losses("plain"));
    let resolved = std::fs::read_to_string(dir.path().join("out/ondol.toml")).unwrap();
    assert!(resolved.contains("mask_documents = true"), "{resolved}");
    let eval = |extra: &[&str]| {
        let args = [&["eval", "out", "--data", "docs/*.txt", "--json"], extra].concat();
        let run = common::ondol(dir.path(), &args);
        assert!(run.ok, "{}", run.stderr);
        serde_json::from_str::<serde_json::Value>(&run.stdout).unwrap()["loss"].as_f64().unwrap()
    };
    let (masked, again, unmasked) = (eval(&[]), eval(&["--mask-documents"]), eval(&["--mask-documents=false"]));
    assert_eq!(masked, again);
    // A resume may stop masking, and says so.
    let resume = ["train", "run.toml", "--run-dir", "out", "--resume", "auto", "--set", "training.steps=3"];
    let (ok, err) = ondol_err(dir.path(), &resume);
    assert!(ok && err.contains("note: training.mask_documents = false here, true in"), "{err}");
    assert!(masked != unmasked && masked.is_finite() && unmasked.is_finite(), "{masked} vs {unmasked}");

    let (ok, err) = ondol_err(
        dir.path(),
        &[
            "train",
            "run.toml",
            "--set",
            "training.mask_documents=true",
            "--set",
            "model.arch=\"mamba\"",
            "--set",
            "model.n_heads=0",
        ],
    );
    assert!(!ok && err.contains("training.mask_documents") && err.contains("Mamba"), "{err}");
    std::fs::write(
        dir.path().join("shards.toml"),
        BASE.replace("format = \"text\"\ntokenizer = \"bytes\"", "format = \"shards\""),
    )
    .unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "shards.toml", "--set", "training.mask_documents=true"]);
    assert!(!ok && err.contains("training.mask_documents") && err.contains("set data.tokenizer"), "{err}");
}

/// The training rows of a run's metrics.jsonl: (step, loss).
fn logged_losses(run: &std::path::Path) -> Vec<(u64, f64)> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let rows = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    rows.filter(|r| r.get("loss").is_some())
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_logged_loss_is_the_mean_of_the_steps_since_the_previous_row() {
    let dir = setup(BASE);
    for (every, run) in [("1", "each"), ("3", "thirds")] {
        let set = format!("metrics.log_every={every}");
        let args = ["train", "run.toml", "--set", "training.steps=7", "--set", &set, "--run-dir", run];
        let (ok, err) = ondol_err(dir.path(), &args);
        assert!(ok, "{err}");
    }
    let each = logged_losses(&dir.path().join("each"));
    assert_eq!(each.len(), 7);
    let mean = |steps: std::ops::RangeInclusive<usize>| {
        let n = steps.clone().count() as f64;
        steps.map(|s| each[s - 1].1).sum::<f64>() / n
    };
    let thirds = logged_losses(&dir.path().join("thirds"));
    let steps: Vec<u64> = thirds.iter().map(|r| r.0).collect();
    assert_eq!(steps, [3, 6, 7]);
    for ((_, logged), expected) in thirds.iter().zip([mean(1..=3), mean(4..=6), mean(7..=7)]) {
        assert!((logged - expected).abs() < 1e-9, "logged {logged}, mean of its steps {expected}");
    }
}

/// A second run in a run directory another run is using is refused, naming the holder,
/// and touches nothing of it; once the first run is gone, the directory is free again.
#[test]
fn a_second_run_in_a_run_directory_in_use_is_refused() {
    let dir = setup(BASE);
    let long =
        ["train", "run.toml", "--run-dir", "run", "--set", "training.steps=100000", "--set", "training.eval_every=0"];
    let mut first = Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(long)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !dir.path().join("run/metrics.jsonl").is_file() {
        assert!(started.elapsed().as_secs() < 60, "the first run did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let resolved = std::fs::read(dir.path().join("run/ondol.toml")).unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run", "--resume", "auto"]);
    let pid = format!("pid {}", first.id());
    assert!(!ok && err.contains("run is in use by another run") && err.contains(&pid), "{err}");
    assert_eq!(std::fs::read(dir.path().join("run/ondol.toml")).unwrap(), resolved, "the refused run wrote");
    first.kill().unwrap(); // SIGKILL: the kernel lets go of the lock with the process
    first.wait().unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run", "--resume", "auto"]);
    assert!(ok, "{err}");
}

#[test]
fn bad_values_are_refused_with_key_file_and_what_is_valid() {
    let dir = setup(BASE);
    // (overrides, substrings the message must contain)
    let cases: &[(&[&str], &[&str])] = &[
        (&["model.n_heads=3"], &["model.n_heads", "does not divide d_model = 16"]),
        (&["training.steps=0"], &["training.steps` from `--set", "at least 1"]),
        (
            &["parallelism.pp=2", "parallelism.schedule=\"interleaved\""],
            &["parallelism.virtual_stages`: 1", "its default: run.toml leaves it out"],
        ),
        (&["model.n_kv_heads=3"], &["model.n_kv_heads", "divide n_heads = 2"]),
        (&["model.n_kv_heads=0"], &["model.n_kv_heads"]),
        (&["model.d_model=0"], &["model.d_model", "at least 1"]),
        (&["model.vocab_size=100"], &["model.vocab_size", "at least 257"]),
        (&["model.arch=\"mamba9\""], &["model.arch", "unknown variant", "llama"]),
        (&["model.n_layers=-1"], &["model.n_layers"]),
        (&["model.ssm.state_size=4"], &["model.ssm", "Mamba layers"]),
        (&["model.arch=\"hybrid\""], &["model.pattern", "needs a pattern"]),
        (&["model.arch=\"hybrid\"", "model.pattern=\"M*x\""], &["model.pattern", "'x'", "M (Mamba-2)"]),
        (&["model.arch=\"hybrid\"", "model.pattern=\"M*\""], &["model.pattern", "2 layers", "n_layers"]),
        (&["model.arch=\"mamba\""], &["model.n_heads", "leave it unset"]),
        (
            &["model.arch=\"mamba\"", "model.n_heads=0", "model.ssm.head_dim=32"],
            &["model.ssm.head_dim", "Mamba-2's", "leave it unset"],
        ),
        (
            &["model.arch=\"mamba2\"", "model.n_heads=0", "model.ssm.time_step_rank=4"],
            &["model.ssm.time_step_rank", "Mamba-1's"],
        ),
        (&["model.pattern=\"M\""], &["model.pattern", "only arch = \"hybrid\""]),
        // What an architecture does not read is refused, not ignored.
        (
            &["model.arch=\"mamba2\"", "model.n_heads=0", "model.ssm.head_dim=8", "model.n_kv_heads=1"],
            &["model.n_kv_heads", "no attention", "leave it unset"],
        ),
        (
            &["model.arch=\"mamba2\"", "model.n_heads=0", "model.ssm.head_dim=8", "model.ffn_hidden=64"],
            &["model.ffn_hidden", "no MLP"],
        ),
        (&["model.arch=\"gpt2\"", "model.rope_theta=12345.0"], &["model.rope_theta", "only llama"]),
        (&["model.arch=\"gpt2\"", "model.qkv_bias=true"], &["model.qkv_bias", "only llama"]),
        (&["model.arch=\"gpt2\"", "model.qk_norm=true"], &["model.qk_norm", "only llama"]),
        (&["model.qk_norm=true", "model.qkv_bias=true"], &["model.qk_norm", "o_proj"]),
        (&["model.arch=\"gpt2\"", "model.head_dim=64"], &["model.head_dim", "only llama, gemma3 and hybrid"]),
        (&["model.head_dim=33"], &["model.head_dim", "even for rotary"]),
        (&["model.n_heads=3", "model.n_kv_heads=1"], &["model.n_heads", "set model.head_dim"]),
        (&["model.arch=\"gpt2\"", "model.block_norms=\"both\""], &["model.block_norms", "only llama"]),
        (&["model.block_norms=\"post\""], &["model.block_norms", "model.qk_norm = true", "EXAONE 4"]),
        (&["model.block_norms=\"sandwich\""], &["model.block_norms", "pre", "post", "both"]),
        (&["model.head_dim=4611686018427387904"], &["model.head_dim", "too large"]),
        (&["model.mup.residual_multiplier=0.0"], &["model.mup.residual_multiplier", "positive"]),
        (&["model.arch=\"gpt2\"", "model.sliding_window=4"], &["model.sliding_window", "only llama"]),
        (&["model.sliding_window=0"], &["model.sliding_window", "at least 1"]),
        (&["model.attention_pattern=\"LX\""], &["model.attention_pattern", "'X'", "L (sliding window)"]),
        (&["model.attention_pattern=\"L\""], &["model.attention_pattern", "need a model.sliding_window"]),
        (&["model.attention_pattern=\"GG\""], &["model.attention_pattern", "1 to n_layers = 1"]),
        (&["model.sliding_window=4", "model.attention_pattern=\"N\""], &["model.sliding_window", "no layer"]),
        (&["model.attention_pattern=\"N\"", "model.qkv_bias=true"], &["model.attention_pattern", "SmolLM3"]),
        (&["model.mup.embedding_multiplier=1e39"], &["model.mup.embedding_multiplier", "f32"]),
        // Gemma 3's fixed parts are its own; what it has that Llama lacks is its alone.
        (&["model.arch=\"gemma3\"", "model.qk_norm=true"], &["model.qk_norm", "gemma3 always has"]),
        (&["model.arch=\"gemma3\"", "model.block_norms=\"both\""], &["model.block_norms", "gemma3 always has"]),
        (&["model.arch=\"gemma3\"", "model.mup.embedding_multiplier=2.0"], &["model.mup", "query_pre_attn_scalar"]),
        (
            &["model.arch=\"gemma3\"", "model.mup.attention_multiplier=0.3"],
            &["model.mup.attention_multiplier", "integer"],
        ),
        (&["model.arch=\"gemma3\"", "model.attention_pattern=\"N\""], &["model.attention_pattern", "Gemma 3"]),
        (
            &["model.arch=\"gemma3\"", "model.sliding_window=4", "model.rope_theta_local=0.5"],
            &["model.rope_theta_local", "greater than 1"],
        ),
        (
            &["model.arch=\"gemma3\"", "model.rope_theta_local=100.0"],
            &["model.rope_theta_local", "no layer has a window"],
        ),
        (
            &["model.arch=\"gemma3\"", "model.sliding_window=4", "model.rope_theta_local=10000.0"],
            &["model.rope_theta_local", "equals rope_theta"],
        ),
        (&["model.rope_theta_local=10000.0"], &["model.rope_theta_local", "only gemma3"]),
        (
            &["model.mup.residual_multiplier=0.5", "model.n_heads=3", "model.n_kv_heads=1", "model.head_dim=32"],
            &["model.n_heads", "muP"],
        ),
        (&["model.mup.embedding_multiplier=2.0", "model.qk_norm=true"], &["model.mup", "HyperCLOVA X"]),
        (&["model.arch=\"gpt2\"", "model.mup.logits_multiplier=0.5"], &["model.mup", "only llama"]),
        (
            &["model.block_norms=\"both\"", "model.n_heads=3", "model.n_kv_heads=1", "model.head_dim=32"],
            &["model.n_heads", "HyperCLOVA X"],
        ),
        (
            &[
                "model.rope_scaling={ type = \"llama3\", factor = 0.5, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_seq_len = 8 }",
            ],
            &["model.rope_scaling.factor", ">= 1"],
        ),
        (
            &[
                "model.rope_scaling={ type = \"yarn\", factor = 4.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_seq_len = 8 }",
            ],
            &["model.rope_scaling", "llama3"],
        ),
        (
            &[
                "model.arch=\"gpt2\"",
                "model.rope_scaling={ type = \"llama3\", factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_seq_len = 8 }",
            ],
            &["model.rope_scaling", "only llama"],
        ),
        (&["lr_scheduler.wsd_decay_fraction=0.5"], &["lr_scheduler.wsd_decay_fraction", "decay = \"wsd\""]),
        (
            &["lr_scheduler.decay=\"constant\"", "lr_scheduler.min_lr_ratio=0.5"],
            &["lr_scheduler.min_lr_ratio", "\"constant\" has none"],
        ),
        (
            &["model.arch=\"mamba2\"", "model.n_heads=0", "model.ssm.head_dim=7"],
            &["model.ssm.head_dim", "does not divide expand * d_model = 32"],
        ),
        (
            &["model.arch=\"mamba2\"", "model.n_heads=0", "model.ssm.chunk_size=0"],
            &["model.ssm.chunk_size", "at least 1"],
        ),
        (&["model.bogus=1"], &["model.bogus", "unknown field"]),
        (&["training.seq_len=17"], &["training.seq_len", "max_seq_len = 16"]),
        (&["training.steps=\"ten\""], &["training.steps` from `--set`", "invalid type"]),
        (&["training.steps=18446744073709551615"], &["--set training.steps", "past what TOML holds"]),
        (&["training.batch_size=0"], &["training.batch_size", "at least 1"]),
        (&["training.device=\"tpu\""], &["training.device", "cpu"]),
        (&["training.device=\"cuda\""], &["training.device", "no CUDA backend"]),
        (&["training.precision=\"bf16\""], &["training.precision", "needs training.device = \"cuda\""]),
        (&["training.tensor_cores=false"], &["training.tensor_cores", "needs training.device = \"cuda\""]),
        (&["optimizer.lr=-1"], &["optimizer.lr", "> 0"]),
        (&["optimizer.beta2=1.5"], &["optimizer.beta2", "[0, 1)"]),
        (&["lr_scheduler.warmup_steps=5"], &["lr_scheduler.warmup_steps", "training.steps = 2"]),
        (&["lr_scheduler.decay=\"linear\""], &["lr_scheduler.decay", "cosine"]),
        (&["data.val_fraction=1.0"], &["data.val_fraction", "[0, 1)"]),
        (&["data.train=[\"missing/*.bin\"]"], &["missing/*.bin", "matches no file"]),
        (&["data.tokenizer=\"gpt2.json\""], &["data.tokenizer", "\"gpt2.json\": text data"]),
        (&["data.sources=[{ train = [\"corpus.txt\"], weight = 1.0 }]"], &["data.sources", "not both"]),
        (
            &["data.train=[]", "data.sources=[{ train = [\"corpus.txt\"], weight = 0.0 }]"],
            &["data.sources[0].weight", "> 0"],
        ),
        (&["data.train=[]"], &["data.train", "[[data.sources]]"]),
        (
            &[
                "data.train=[]",
                "data.sources=[{ train = [\"corpus.txt\"], weight = 1e308 }, { train = [\"corpus.txt\"], weight = 1e308 }]",
            ],
            &["data.sources", "weights sum past the largest number"],
        ),
        // Sizes past the machine's memory are refused before anything is allocated.
        (&["training.batch_size=100000000000"], &["`training`", "needs about", "but the machine has"]),
        (&["parallelism.tp=4"], &["parallelism.tp", "does not divide model.n_heads = 2"]),
        (&["parallelism.pp=2"], &["parallelism.pp", "1 layers: every stage needs a layer"]),
        (&["parallelism.schedule=\"interleaved\""], &["parallelism.schedule", "pp of at least 2"]),
        (&["parallelism.schedule=\"zigzag\""], &["parallelism.schedule", "1f1b"]),
        (&["parallelism.virtual_stages=0"], &["parallelism.virtual_stages", "at least 1"]),
        (&["parallelism.microbatches=0"], &["parallelism.microbatches", "at least 1"]),
        (
            &["parallelism.microbatches=4", "training.grad_accum=2"],
            &["parallelism.microbatches", "disagrees with training.grad_accum = 2"],
        ),
        (
            &["parallelism.tp=2", "parallelism.sequence_parallel=true", "training.batch_size=1", "training.seq_len=7"],
            &["parallelism.sequence_parallel", "tp = 2 must divide the tokens of a micro-batch (1 sequences x 7 = 7)"],
        ),
        (&["metrics.log_every=0"], &["metrics.log_every"]),
        (&["unknown.key=1"], &["unknown", "unknown field"]),
        (&["training.steps"], &["--set training.steps", "section.key=value"]),
    ];
    for (overrides, expected) in cases {
        let mut args = vec!["train", "run.toml"];
        for o in *overrides {
            args.extend(["--set", o]);
        }
        let (ok, err) = ondol_err(dir.path(), &args);
        assert!(!ok, "{overrides:?} was accepted");
        assert!(!err.contains("panicked"), "{overrides:?} panicked: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{overrides:?}: expected one line, got {err}");
        for e in *expected {
            assert!(err.contains(e), "{overrides:?}: message lacks `{e}`: {err}");
        }
    }
}

#[test]
fn bad_files_are_refused_with_their_path() {
    let dir = setup(BASE);
    let (ok, err) = ondol_err(dir.path(), &["train", "nope.toml"]);
    assert!(!ok && err.contains("nope.toml") && !err.contains("panicked"), "{err}");

    std::fs::write(dir.path().join("broken.toml"), "[model\narch = ").unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "broken.toml"]);
    assert!(!ok && err.contains("broken.toml") && err.contains("is not valid TOML"), "{err}");

    // Paths that are not what their flag or key needs: each named, with what would do.
    std::fs::create_dir(dir.path().join("texts")).unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["train", "run.toml", "--resume", "runs/none"], &["runs/none: no such directory", "step-XXXXXXXX"]),
        (&["train", "run.toml", "--resume", ""], &["--resume", "empty"]),
        (&["train", "run.toml", "--set", "model.init_from=\"none\""], &["model.init_from", "none: no such directory"]),
        (&["train", "run.toml", "--set", "data.train=[\"texts\"]"], &["texts", "matches only directories"]),
        (&["eval", "run.toml", "--data", "corpus.txt"], &["run.toml: a file", "directory"]),
        (&["eval", "--data", "corpus.txt", "run.toml"], &["eval needs a checkpoint", "ondol eval DIR --data"]),
        (&["eval", "--data", "corpus.txt", "runs/tpyo"], &["eval needs a checkpoint", "runs/tpyo: no such file"]),
        (&["train", "run.toml", "--run-dir", "corpus.txt"], &["corpus.txt: a file, not a directory"]),
        (
            &["data", "prepare", "--input", "texts", "--tokenizer", "t.json", "--out", "o"],
            &["texts", "matches only directories", "texts/*"],
        ),
    ];
    for (args, expected) in cases {
        let (ok, err) = ondol_err(dir.path(), args);
        assert!(!ok && !err.contains("panicked"), "{args:?}: {err}");
        for e in *expected {
            assert!(err.contains(e), "{args:?}: message lacks `{e}`: {err}");
        }
    }

    // A missing section is named with the file.
    let i = BASE.find("[training]").unwrap();
    std::fs::write(dir.path().join("no-model.toml"), &BASE[i..]).unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "no-model.toml"]);
    assert!(!ok && err.contains("no-model.toml: missing field `model`"), "{err}");

    // A damaged shard: the message names the file and what is wrong.
    std::fs::write(dir.path().join("bad.bin"), vec![0u8; 100]).unwrap();
    let (ok, err) = ondol_err(
        dir.path(),
        &[
            "train",
            "run.toml",
            "--set",
            "data.format=\"shards\"",
            "--set",
            "data.train=[\"bad.bin\"]",
            "--set",
            "data.tokenizer=\"bytes\"",
        ],
    );
    assert!(!ok && err.contains("bad.bin") && !err.contains("panicked"), "{err}");
    assert!(!dir.path().join("runs").exists(), "a refused run left a run directory behind");

    // Tokens beyond the vocabulary are an error, not an out-of-bounds panic, naming the shard
    // that holds them among good ones.
    ondol_data::write_shard(dir.path().join("good.bin"), &vec![7u32; 400], None).unwrap();
    ondol_data::write_shard(dir.path().join("big.bin"), &vec![70_000u32; 400], None).unwrap();
    let (ok, err) = ondol_err(
        dir.path(),
        &[
            "train",
            "run.toml",
            "--set",
            "data.format=\"shards\"",
            "--set",
            "data.train=[\"good.bin\", \"big.bin\"]",
            "--set",
            "data.tokenizer=\"bytes\"",
        ],
    );
    assert!(!ok && err.contains("big.bin: token ") && err.contains("id 70000") && err.contains("vocab"), "{err}");
}

#[test]
fn inspect_reports_parameters_flops_and_memory_per_rank() {
    let dir = setup(BASE);
    let inspect = |sets: &[&str]| -> String {
        let mut args = vec!["inspect", "run.toml"];
        sets.iter().for_each(|s| args.extend(["--set", s]));
        let out = Command::new(env!("CARGO_BIN_EXE_ondol")).args(&args).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The first size after `label` on its line ("1.500 KiB"), in bytes.
    let figure = |text: &str, label: &str| -> f64 {
        let line = text.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("{text}"));
        let mut words = line[line.find(label).unwrap() + label.len()..].split_whitespace();
        let x: f64 = words.next().unwrap().parse().unwrap();
        let unit = words.next().and_then(|w| ["B", "KiB", "MiB", "GiB"].iter().position(|u| *u == w)).expect("a unit");
        x * 1024f64.powi(unit as i32)
    };
    let one = inspect(&[]);
    assert!(one.contains("parameters") && one.contains("FLOPs/token"), "{one}");
    // What a model has beyond plain Llama's is said: the heads, their norms, the blocks' norms, muP.
    let exaone4 = inspect(&["model.qk_norm=true", "model.block_norms=\"post\"", "model.head_dim=12"]);
    assert!(exaone4.contains("heads of 12") && exaone4.contains("q and k norms"), "{exaone4}");
    assert!(exaone4.contains("block norms          after the mixers"), "{exaone4}");
    let mup = inspect(&["model.mup.logits_multiplier=0.5"]);
    assert!(mup.contains("muP multipliers      embedding 1, residual 1, logits 0.5"), "{mup}");
    let tp = inspect(&["parallelism.tp=2"]);
    let sp = inspect(&["parallelism.tp=2", "parallelism.sequence_parallel=true"]);
    let weights = |t: &str| figure(t, "weights+grads");
    let acts = |t: &str| figure(t, "activations");
    assert!(weights(&tp) < weights(&one), "tp = 2 must halve the weights per rank:\n{one}\n{tp}");
    assert!(acts(&sp) < acts(&tp), "sequence parallelism must cut the activations per rank:\n{tp}\n{sp}");
    // GPipe keeps every micro-batch in flight on every stage, 1F1B at most pp - stage (here
    // the last stage, whose head makes it the largest, holds 1).
    let pp = |schedule: &str| {
        let sets = ["model.n_layers=2", "parallelism.pp=2", "training.grad_accum=4", schedule];
        inspect(&sets)
    };
    let (gpipe, one_f_one_b) = (pp("parallelism.schedule=\"gpipe\""), pp("parallelism.schedule=\"1f1b\""));
    assert!(gpipe.contains("4 micro-batches in flight (gpipe)"), "{gpipe}");
    assert!(one_f_one_b.contains("1 micro-batch in flight (1f1b)"), "{one_f_one_b}");
    assert!(acts(&one_f_one_b) < acts(&gpipe), "{one_f_one_b}\n{gpipe}");
    let total = |t: &str| figure(t, "memory per rank");
    assert!(total(&one_f_one_b) < total(&gpipe), "{one_f_one_b}\n{gpipe}");
    // On a GPU in bf16: 2-byte weights beside 4-byte gradients, fp32 master weights beside
    // the moments, and activations mostly half as large (statistics and states stay f32).
    let bf16 = inspect(&["training.device=\"cuda\""]);
    assert!(bf16.contains("bf16 weights and activations") && bf16.contains("with fp32 master weights"), "{bf16}");
    let ratio = |label: &str| figure(&bf16, label) / figure(&one, label);
    assert!((ratio("weights+grads") - 0.75).abs() < 0.01 && (ratio("AdamW") - 1.5).abs() < 0.01, "{one}\n{bf16}");
    assert!(ratio("activations") > 0.5 && ratio("activations") < 0.6, "{one}\n{bf16}");
}

/// An answer that cannot be written is an error, not a panic; one whose reader has seen
/// enough (`| head`) ends quietly, as any Unix tool's does.
#[test]
fn an_answer_that_cannot_be_written_is_an_error_and_a_closed_pipe_ends_quietly() {
    let dir = setup(BASE);
    let inspect = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ondol"));
        cmd.args(["inspect", "run.toml"]).current_dir(dir.path());
        cmd
    };
    let out = inspect().stdout(std::fs::File::create("/dev/full").unwrap()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot write to standard output"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = inspect().stdout(writer).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{err}");
    assert!(err.is_empty(), "{err}");
    // A run's log is not its answer: training goes on where the log cannot be written.
    let out = Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(["train", "run.toml", "--run-dir", "run"])
        .current_dir(dir.path())
        .stderr(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(dir.path().join("run/checkpoints/step-00000002").is_dir());
}

/// Every preset in configs/ is a valid config whose model builds and whose layout fits it
/// (`ondol inspect`, which trains nothing), so a preset cannot rot unnoticed.
#[test]
fn every_shipped_config_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut presets: Vec<_> = std::fs::read_dir(root.join("configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    presets.sort();
    assert!(presets.len() >= 12, "{presets:?}");
    for preset in presets {
        let (ok, err) = ondol_err(&root, &["inspect", preset.to_str().unwrap()]);
        assert!(ok, "{}: {err}", preset.display());
    }
}

/// `parallelism.microbatches` (DESIGN.md's name) is `training.grad_accum`: given alone it sets
/// it (the refusals are among the bad values above).
#[test]
fn microbatches_is_grad_accum_by_megatrons_name() {
    let parse = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::parse(BASE, "run.toml", &sets)
    };
    let cfg = parse(&["parallelism.microbatches=4"]).unwrap();
    assert_eq!((cfg.training.grad_accum, cfg.parallelism.microbatches), (4, Some(4)));
    assert_eq!(cfg.layout(ondol_comm::Mesh { tp: 1, pp: 1, dp: 1 }).micro, 4);
    let both = parse(&["parallelism.microbatches=4", "training.grad_accum=4"]).unwrap();
    assert_eq!(both.training.grad_accum, 4);
    // Left out, grad_accum alone counts; a resolved config (both written) parses again.
    assert_eq!(parse(&["training.grad_accum=3"]).unwrap().parallelism.microbatches, None);
    let resolved = toml::to_string(&cfg).unwrap();
    assert_eq!(RunConfig::parse(&resolved, "ondol.toml", &[]).unwrap(), cfg);
}
