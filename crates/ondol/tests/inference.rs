//! eval, generate, import and init_from: the ways a trained or downloaded model is used.

mod common;
use common::{Run, ondol};

use ondol::config::RunConfig;
use ondol::pretrained::{Generation, Pretrained, Sampling, TextStream, Tokenizer, sample};
use ondol::trainer::{Data, Trainer};
use ondol_core::Rng;
use ondol_cpu::CpuBackend;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ondol-ckpt/tests/fixtures").join(name)
}

#[test]
fn sampling_follows_temperature_top_k_and_top_p() {
    let logits = [1.0f32, 3.0, 2.0, 0.5];
    let mut rng = Rng::new(1);
    let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
    assert_eq!(sample(&logits, greedy, &mut rng), 1);
    let top1 = Sampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 0 };
    assert!((0..50).all(|_| sample(&logits, top1, &mut rng) == 1));
    // top_p 0.8: the two most likely tokens hold 0.665 + 0.245 = 0.91 >= 0.8, so only they remain.
    let nucleus = Sampling { temperature: 1.0, top_k: 0, top_p: 0.8, seed: 0 };
    assert!((0..200).all(|_| matches!(sample(&logits, nucleus, &mut rng), 1 | 2)));
    // Plain sampling matches the softmax within sampling error.
    let plain = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 };
    let mut counts = [0usize; 4];
    let n = 40_000;
    for _ in 0..n {
        counts[sample(&logits, plain, &mut rng) as usize] += 1;
    }
    let z: f32 = logits.iter().map(|l| l.exp()).sum();
    for (c, l) in counts.iter().zip(logits) {
        let p = (l.exp() / z) as f64;
        let freq = *c as f64 / n as f64;
        assert!((freq - p).abs() < 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3, "{counts:?}");
    }
}

#[test]
fn generation_is_reproducible_bounded_and_stops_at_end_of_text() {
    let p = Pretrained::load(&fixture("tiny-llama-gqa")).unwrap();
    let be = CpuBackend;
    let s = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3 };
    let a = Generation::new(&be, &p, &p.params, &[5, 6, 7], 20, &[], s).unwrap().collect::<Vec<_>>();
    let b = Generation::new(&be, &p, &p.params, &[5, 6, 7], 20, &[], s).unwrap().collect::<Vec<_>>();
    assert_eq!(a, b);
    assert_eq!(a.len(), 20);
    // Stopping at the first sampled token that is end-of-text, or any other stop token.
    let stop = a[4];
    let c = Generation::new(&be, &p, &p.params, &[5, 6, 7], 20, &[stop], s).unwrap().collect::<Vec<_>>();
    assert_eq!(c, a[..a.iter().position(|&t| t == stop).unwrap()]);
    let d = Generation::new(&be, &p, &p.params, &[5, 6, 7], 20, &[stop, a[2]], s).unwrap().collect::<Vec<_>>();
    assert_eq!(d, a[..a.iter().position(|&t| t == stop || t == a[2]).unwrap()]);
    // The context never exceeds max_seq_len (64).
    let long = Generation::new(&be, &p, &p.params, &[1; 60], 50, &[], s).unwrap().collect::<Vec<_>>();
    assert_eq!(long.len(), 4);
    assert!(Generation::new(&be, &p, &p.params, &[], 5, &[], s).is_err());
}

/// Generated text is shown as it comes, a whole character at a time: a character split over
/// tokens (a byte-level model spells a Korean syllable in three) is held back until it is
/// whole, never shown as U+FFFD, and the text shown adds up to the text of all the tokens.
#[test]
fn generated_text_is_shown_in_whole_characters() {
    let bytes = Tokenizer::Bytes(ondol_data::ByteTokenizer::new());
    let mut text = TextStream::after(&bytes, &bytes.encode("온").unwrap()).unwrap();
    let pieces: Vec<String> = "돌 ok".bytes().map(|b| text.push(u32::from(b)).unwrap()).collect();
    assert_eq!(pieces, ["", "", "돌", " ", "o", "k"]);
    assert_eq!(text.unfinished(), 0);
    text.push(0xEC).unwrap(); // the first byte of a three-byte character, and no more
    assert_eq!(text.unfinished(), 1);

    // A byte-level BPE with few merges splits characters between tokens too.
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, "온돌은 바닥을 데운다. The floor warms the room.\n".repeat(50)).unwrap();
    let cfg = ondol_data::tokenizer::TrainConfig { vocab_size: 300, ..Default::default() };
    let (bpe, _) = ondol_data::tokenizer::train(vec![corpus], &Default::default(), &cfg).unwrap();
    let bpe = Tokenizer::Text(Box::new(bpe));
    let (prompt, rest) = (bpe.encode("The floor").unwrap(), bpe.encode(" 온돌 한옥, 바다").unwrap());
    let mut text = TextStream::after(&bpe, &prompt).unwrap();
    let mut shown = String::new();
    let mut held_back = false;
    for &id in &rest {
        let piece = text.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        held_back |= piece.is_empty();
        shown += &piece;
    }
    assert!(held_back, "every token of {rest:?} was a whole character: the test shows nothing");
    assert_eq!(shown, " 온돌 한옥, 바다");
    assert_eq!(text.unfinished(), 0);
}

#[test]
fn import_then_init_from_starts_from_the_hugging_face_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imported");
    let Run { ok, stderr: err, .. } =
        ondol(dir.path(), &["import", "hf", fixture("tiny-gpt2").to_str().unwrap(), "--out", "imported"]);
    assert!(ok, "{err}");
    let hf = Pretrained::load(&fixture("tiny-gpt2")).unwrap();
    let imported = Pretrained::load(&out).unwrap();
    // Weights only: a run starts from them with AdamW's state fresh.
    assert!(!out.join("optimizer").exists());
    assert!(hf.params.iter().zip(&imported.params).all(|(a, b)| a.to_bits() == b.to_bits()));

    // The starter config continues from the imported weights once it has data.
    ondol_data::write_shard(
        dir.path().join("train.bin"),
        &(0..5000).map(|i| (i * 7 % 97) as u32).collect::<Vec<_>>(),
        None,
    )
    .unwrap();
    let cfg = RunConfig::load(
        &out.join("ondol.toml"),
        &["data.train=[\"train.bin\"]".into(), "data.val=[]".into(), "training.seq_len=16".into()],
    )
    .unwrap();
    let data = Data::open(&cfg, dir.path()).unwrap();
    let mut trainer = Trainer::new(CpuBackend, cfg, data).unwrap();
    assert_eq!(trainer.load_init_from().unwrap().as_deref(), Some(out.as_path()));
    assert!(trainer.whole_params().unwrap().unwrap().iter().zip(&hf.params).all(|(a, b)| a.to_bits() == b.to_bits()));

    // A run whose [model] differs from the directory is refused by key.
    let bad = RunConfig::load(
        &out.join("ondol.toml"),
        &[
            "data.train=[\"train.bin\"]".into(),
            "data.val=[]".into(),
            "training.seq_len=16".into(),
            "model.norm_eps=1e-6".into(),
        ],
    )
    .unwrap();
    let data = Data::open(&bad, dir.path()).unwrap();
    let e = Trainer::new(CpuBackend, bad, data).unwrap().load_init_from().err().unwrap().to_string();
    assert!(e.contains("model.norm_eps"), "{e}");

    // Not a model directory, and an unsupported architecture: clear errors, no panic.
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["import", "hf", "nowhere", "--out", "x"]);
    assert!(!ok && err.contains("nowhere") && !err.contains("panicked"), "{err}");
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["eval", "imported", "--data", "train.bin", "--json"]);
    assert!(ok, "{err}");
}

#[test]
fn eval_and_generate_on_a_trained_byte_level_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), "온돌은 바닥을 데운다. the floor is warm. ".repeat(300)).unwrap();
    let config = r#"
[model]
arch = "llama"
vocab_size = 257
d_model = 32
n_layers = 1
n_heads = 2
max_seq_len = 32
[training]
steps = 30
batch_size = 4
seq_len = 32
eval_batches = 2
[data]
train = ["corpus.txt"]
val_fraction = 0.1
format = "text"
tokenizer = "bytes"
[optimizer]
lr = 1e-2
"#;
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["train", "run.toml", "--run-dir", "run"]);
    assert!(ok, "{err}");
    let ckpt = "run/checkpoints/step-00000030";
    let Run { ok, stdout: out, stderr: err } =
        ondol(dir.path(), &["eval", ckpt, "--data", "corpus.txt", "--json", "--batches", "5"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!(loss < 3.0 && (v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9, "{out}");
    assert_eq!(v["tokens"], 5 * 4 * 32);
    // --data takes every value after it: the directory may come last, as its last value.
    let Run { ok, stdout: after, stderr: err } =
        ondol(dir.path(), &["eval", "--json", "--batches", "5", "--data", "corpus.txt", ckpt]);
    assert!(ok && after == out, "{err}");
    let generate = |seed: &str| {
        ondol(dir.path(), &["generate", ckpt, "--prompt", "온돌은", "--max-new-tokens", "20", "--seed", seed])
    };
    let first = generate("1");
    assert!(first.ok && first.stdout.starts_with("온돌은"), "{}", first.stderr);
    assert_eq!(first.stdout, generate("1").stdout, "same seed, different text");
    // The run directory, or its checkpoints/latest, stands for the checkpoint latest names.
    let checkpoints = dir.path().join("run/checkpoints");
    for (cwd, path) in
        [(dir.path(), "run"), (dir.path(), "run/checkpoints/latest"), (&*checkpoints, "."), (&*checkpoints, "latest")]
    {
        let Run { ok, stdout, stderr } =
            ondol(cwd, &["generate", path, "--prompt", "온돌은", "--max-new-tokens", "20", "--seed", "1"]);
        assert!(ok && stdout == first.stdout && stderr.contains("step-00000030"), "{path}: {stderr}");
    }
    // A run stopped before its first checkpoint says so; `latest` naming a checkpoint that is
    // gone falls back to the newest, saying so.
    std::fs::create_dir(dir.path().join("early")).unwrap();
    std::fs::copy(dir.path().join("run/ondol.toml"), dir.path().join("early/ondol.toml")).unwrap();
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["generate", "early", "--prompt", "a"]);
    assert!(!ok && err.contains("early: a run directory without a checkpoint"), "{err}");
    std::fs::write(checkpoints.join("latest"), "step-00000099").unwrap();
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["generate", "run", "--prompt", "a", "--max-new-tokens", "2"]);
    assert!(ok && err.contains("names step-00000099, which is gone") && err.contains("step-00000030"), "{err}");
    std::fs::write(checkpoints.join("latest"), "step-00000030").unwrap();
    // inspect reads the config a checkpoint or run was trained with.
    for path in ["run", ckpt, "run/checkpoints/latest"] {
        let Run { ok, stdout, stderr } = ondol(dir.path(), &["inspect", path, "--set", "parallelism.tp=2"]);
        assert!(ok && stdout.contains("parameters") && stdout.contains("(2, 1, 1)"), "{path}: {stderr}");
        assert!(stdout.contains("step 30, 3840 tokens trained on; AdamW's state too (resumable)"), "{stdout}");
        assert!(stdout.contains("checksums not read (--verify)"), "{stdout}");
    }
    // With --verify, it checks the checkpoint as a resume reads it: damage shows, and fails
    // the command.
    let state = dir.path().join(ckpt).join("optimizer/exp_avg.safetensors");
    let pristine = std::fs::read(&state).unwrap();
    let mut flipped = pristine.clone();
    flipped[pristine.len() / 2] ^= 1;
    std::fs::write(&state, flipped).unwrap();
    let Run { ok, stdout, .. } = ondol(dir.path(), &["inspect", "run"]);
    assert!(ok && stdout.contains("checksums not read"), "{stdout}");
    let Run { ok, stdout, .. } = ondol(dir.path(), &["inspect", "run", "--verify"]);
    assert!(!ok && stdout.contains("DAMAGED") && stdout.contains("exp_avg.safetensors"), "{stdout}");
    std::fs::write(&state, pristine).unwrap();
    // Negative numbers reach their check; a budget past the context is said.
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["generate", ckpt, "--prompt", "a", "--temperature", "-1"]);
    assert!(!ok && err.contains("--temperature") && err.contains("must be >= 0"), "{err}");
    let Run { ok, stderr: err, .. } =
        ondol(dir.path(), &["generate", ckpt, "--prompt", "a", "--max-new-tokens", "100"]);
    assert!(ok && err.contains("at most 31 new tokens"), "{err}");
    std::fs::write(dir.path().join("short.txt"), "too short for a batch").unwrap();
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["eval", ckpt, "--data", "short.txt"]);
    assert!(!ok && err.contains("fewer than one batch of 4 x 32") && err.contains("lower --batch-size"), "{err}");
    // An empty prompt samples from the start of a text (after an end-of-text, not shown).
    let Run { ok, stdout, stderr } = ondol(dir.path(), &["generate", ckpt, "--prompt", "", "--max-new-tokens", "8"]);
    assert!(ok && !stdout.trim().is_empty() && !stdout.contains("endoftext"), "{stdout} {stderr}");
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["generate", ckpt, "--prompt", "a", "--temperature", "inf"]);
    assert!(!ok && err.contains("--temperature"), "{err}");
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["eval", ckpt, "--data", "missing.bin"]);
    assert!(!ok && err.contains("missing.bin"), "{err}");
    // A device that is not one, and (in this build, without the CUDA backend) the GPU.
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["generate", ckpt, "--prompt", "a", "--device", "tpu"]);
    assert!(!ok && err.contains("cpu or cuda"), "{err}");
    if !cfg!(feature = "cuda") {
        let Run { ok, stderr: err, .. } =
            ondol(dir.path(), &["eval", ckpt, "--data", "corpus.txt", "--batches", "1", "--device", "cuda"]);
        assert!(
            !ok && err.contains("--device") && err.contains("--features cuda") && !err.contains("panicked"),
            "{err}"
        );
    }
}

/// A fine-tune names its start by run directory; it may raise a rotary model's context (no
/// weight depends on max_seq_len); once it has checkpoints of its own it resumes from them
/// without the start, which may be gone or named otherwise by then.
#[test]
fn a_fine_tune_starts_from_a_run_and_resumes_without_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), "온돌은 바닥을 데운다. the floor is warm. ".repeat(300)).unwrap();
    let config = r#"
[model]
arch = "llama"
vocab_size = 257
d_model = 16
n_layers = 1
n_heads = 2
max_seq_len = 16
[training]
steps = 3
batch_size = 2
seq_len = 16
eval_every = 0
[data]
train = ["corpus.txt"]
format = "text"
tokenizer = "bytes"
[optimizer]
lr = 1e-2
"#;
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    let Run { ok, stderr: err, .. } = ondol(dir.path(), &["train", "run.toml", "--run-dir", "pre"]);
    assert!(ok, "{err}");
    let longer = ["--set", "model.max_seq_len=32", "--set", "training.seq_len=32"];
    let fine_tune = |init: &str, steps: &str, extra: &[&str]| {
        let init = format!("model.init_from=\"{init}\"");
        let steps = format!("training.steps={steps}");
        let mut args = vec!["train", "run.toml", "--set", &init, "--set", &steps];
        args.extend(longer);
        args.extend(extra);
        ondol(dir.path(), &args)
    };
    let Run { ok, stderr: err, .. } = fine_tune("pre", "2", &["--run-dir", "ft"]);
    assert!(ok && err.contains("starting from the weights of") && err.contains("step-00000003"), "{err}");
    std::fs::rename(dir.path().join("pre"), dir.path().join("moved")).unwrap();
    for (init, steps) in [("pre", "3"), ("./moved", "4")] {
        let Run { ok, stderr: err, .. } = fine_tune(init, steps, &["--run-dir", "ft", "--resume", "auto"]);
        assert!(ok && err.contains("resumed at step") && !err.contains("starting from the weights"), "{init}: {err}");
    }
    // A fresh start needs its weights, and says which key names them.
    let Run { ok, stderr: err, .. } = fine_tune("pre", "2", &["--run-dir", "ft2"]);
    assert!(!ok && err.contains("model.init_from") && err.contains("pre"), "{err}");
}
