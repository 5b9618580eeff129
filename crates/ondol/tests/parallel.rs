//! Data parallelism against one rank, same global batch, fp32: ranks are threads joined by a
//! deterministic communicator, so the only difference from one rank is the order in which
//! the two halves of each gradient are summed.

mod common;
use common::ondol_err;

use ondol::config::RunConfig;
use ondol::trainer::{Data, Trainer};
use ondol_ckpt::checkpoint;
use ondol_comm::{Mesh, RankComms};
use ondol_cpu::CpuBackend;
use ondol_parallel::HEAD_ROW_ALIGN;
use std::path::Path;
use std::time::Duration;

const CONFIG: &str = r#"
[model]
arch = "llama"
vocab_size = 257
d_model = 32
n_layers = 4
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

/// A parallel layout: (tp, pp, dp).
type Shape = (usize, usize, usize);

const ZERO_1: &[&str] = &["parallelism.zero=1"];

/// Runs `work` on a trainer for each thread rank of `shape`, with micro-batches of `8 / dp`
/// sequences and `extra` overrides; returns each rank's result in rank order.
fn on_ranks<R: Send>(
    dir: &Path,
    (tp, pp, dp): Shape,
    extra: &[&str],
    work: impl Fn(&mut Trainer<CpuBackend>) -> R + Sync,
) -> Vec<R> {
    let mut overrides = vec![
        format!("training.batch_size={}", 8 / dp),
        format!("parallelism.tp={tp}"),
        format!("parallelism.pp={pp}"),
        format!("parallelism.dp={dp}"),
    ];
    overrides.extend(extra.iter().map(|o| o.to_string()));
    let cfg = RunConfig::load(&dir.join("run.toml"), &overrides).unwrap();
    let data = Data::open(&cfg, dir).unwrap();
    let comms = RankComms::threads(Mesh::new(tp, pp, dp).unwrap(), Duration::from_secs(60)).unwrap();
    std::thread::scope(|s| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let (cfg, data, work) = (cfg.clone(), data.clone(), &work);
                s.spawn(move || work(&mut Trainer::rank(CpuBackend, cfg, data, c.boxed()).unwrap()))
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// Runs `steps` steps on the ranks of `shape` (optionally resuming every rank from `resume`,
/// and saving the leader's checkpoint into `save`); returns the losses (the same on every
/// rank, checked), the final whole weights and rank 0's AdamW floats per moment.
fn train_with(
    dir: &Path,
    shape: Shape,
    extra: &[&str],
    steps: usize,
    resume: Option<&Path>,
    save: Option<&Path>,
) -> (Vec<f64>, Vec<f32>, usize) {
    let results = on_ranks(dir, shape, extra, |t| {
        if let Some(ckpt) = resume {
            t.restore(checkpoint::load(ckpt, &t.model().cfg, &t.model().layout).unwrap()).unwrap();
        }
        let losses: Vec<f64> = (0..steps).map(|_| t.step().unwrap().loss).collect();
        // Every rank takes part in the snapshot (pieces are gathered); the leader saves.
        if let (Some(run_dir), Some(snap)) = (save, t.snapshot().unwrap()) {
            checkpoint::save(run_dir, &snap).unwrap();
        }
        (losses, t.whole_params().unwrap(), t.engine.moment_elems() / 2)
    });
    for r in &results[1..] {
        assert_eq!(r.0, results[0].0, "ranks report different losses");
    }
    let (losses, weights, opt) = results.into_iter().next().unwrap();
    (losses, weights.expect("rank 0 gathers the whole weights"), opt)
}

fn train(dir: &Path, shape: Shape) -> (Vec<f64>, Vec<f32>) {
    let (losses, weights, _) = train_with(dir, shape, &[], 20, None, None);
    (losses, weights)
}

/// Losses within 1e-5 relative, and weights within 1e-5, of `want`.
fn assert_matches(what: &str, (want, w_want): (&[f64], &[f32]), (got, w_got): (&[f64], &[f32])) {
    for (step, (a, b)) in want.iter().zip(got).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{what} step {}: loss {b} vs {a}", step + 1);
    }
    let worst = ondol_core::gradcheck::max_abs_diff(w_want, w_got);
    assert!(worst <= 1e-5, "{what}: weights differ by {worst:e}");
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corpus.txt"), "온돌 warms the floor from below; ".repeat(2000)).unwrap();
    std::fs::write(dir.path().join("run.toml"), CONFIG).unwrap();
    dir
}

/// The trainer (data loading, schedule, optimizer) at several layouts against one rank, on
/// real text: the same 20 losses within 1e-5 and the same final weights.
#[test]
fn parallel_layouts_train_like_one_rank() {
    let dir = setup();
    let (one, w1) = train(dir.path(), (1, 1, 1));
    for shape in [(1, 1, 4), (2, 1, 1), (1, 2, 1), (2, 2, 2)] {
        let (many, w) = train(dir.path(), shape);
        assert_matches(&format!("{shape:?}"), (&one, &w1), (&many, &w));
    }
}

/// Fine-tuning on completions: with a loss mask beside the shard, each step's loss is the mean
/// over the learned targets of the whole global batch, which every layout divides by as one
/// rank does (a rank dividing by its own share would not match). A mask that learns every
/// target changes nothing, bit for bit; one that learns a third of them changes the run.
#[test]
fn masked_targets_train_alike_on_every_layout() {
    let dir = setup();
    let text = std::fs::read_to_string(dir.path().join("corpus.txt")).unwrap();
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    ondol_data::write_shard(dir.path().join("train.bin"), &tokens, None).unwrap();
    let config =
        CONFIG.replace("train = [\"corpus.txt\"]\nformat = \"text\"", "train = [\"train.bin\"]\nformat = \"shards\"");
    assert_ne!(config, CONFIG);
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    let mask = dir.path().join("train.mask");
    let (plain, _) = train(dir.path(), (1, 1, 1));
    ondol_data::mask::write_mask(&mask, &vec![true; tokens.len()]).unwrap();
    assert_eq!(train(dir.path(), (1, 1, 1)).0, plain, "a mask that learns every target");
    // Runs of learned and ignored targets, so ranks hold unequal shares.
    let learned: Vec<bool> = (0..tokens.len()).map(|i| (i / 37) % 3 == 0).collect();
    ondol_data::mask::write_mask(&mask, &learned).unwrap();
    let (one, w1) = train(dir.path(), (1, 1, 1));
    assert!(one.iter().zip(&plain).all(|(a, b)| a != b), "the mask changes every step's loss");
    for shape in [(1, 1, 4), (2, 2, 2)] {
        let (many, w) = train(dir.path(), shape);
        assert_matches(&format!("masked {shape:?}"), (&one, &w1), (&many, &w));
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
    assert!(ok && err.contains("tp 1 x pp 1 x dp 2") && err.contains("done: 20 steps"), "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 2, "one writer only:\n{metrics}");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("run/checkpoints/step-00000020/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["layout"]["dp"], 2);
    // Another data-parallel size must keep the global batch (here 16 sequences), which
    // accumulation may make up.
    let resume =
        |more: &[&str]| ondol(&[&["train", "run.toml", "--run-dir", "run", "--resume", "auto"], more].concat());
    let (ok, err) = resume(&["--set", "training.batch_size=4"]);
    assert!(!ok && err.contains("global batch") && err.contains("grad_accum"), "{err}");
    assert!(err.contains("at fewer replicas, more training.grad_accum") && !err.contains("patterns"), "{err}");
    let (ok, err) =
        resume(&["--set", "training.steps=24", "--set", "training.batch_size=4", "--set", "training.grad_accum=4"]);
    assert!(ok && err.contains("resumed at step 20"), "{err}");
    let (ok, err) = ondol(&["train", "run.toml", "--set", "parallelism.tp=3"]);
    assert!(!ok && err.contains("parallelism.tp") && err.contains("does not divide model.n_heads = 4"), "{err}");
    let (ok, err) = ondol(&["train", "run.toml", "--set", "parallelism.pp=5"]);
    assert!(!ok && err.contains("parallelism.pp") && err.contains("every stage needs a layer"), "{err}");
    assert!(!dir.path().join("runs").exists(), "a refused run left a run directory behind");
}

/// The issue's command: tp 2 x pp 2 x dp 2 as 8 threads, here with sequence parallelism on,
/// gives one rank's loss curve (the trainer's test above covers it off).
#[test]
fn the_cli_trains_eight_ranks_like_one() {
    let dir = setup();
    // Training and validation losses, in the order metrics.jsonl logs them.
    let losses = |run: &str, sets: &[&str]| -> Vec<f64> {
        let mut args = vec![
            "train",
            "run.toml",
            "--run-dir",
            run,
            "--set",
            "metrics.log_every=1",
            "--set",
            "data.val_fraction=0.1",
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, err) = ondol_err(dir.path(), &args);
        assert!(ok, "{err}");
        std::fs::read_to_string(dir.path().join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let row = serde_json::from_str::<serde_json::Value>(l).ok()?;
                row["loss"].as_f64().or(row["val_loss"].as_f64())
            })
            .collect()
    };
    let one = losses("one", &[]);
    let eight = losses(
        "eight",
        &[
            "parallelism.tp=2",
            "parallelism.pp=2",
            "parallelism.dp=2",
            "parallelism.sequence_parallel=true",
            "training.batch_size=4",
        ],
    );
    assert_eq!(one.len(), 22, "20 training rows and 2 evaluations");
    assert_eq!(one.len(), eight.len());
    for (step, (a, b)) in one.iter().zip(&eight).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a, "step {}: loss {b} at (2,2,2) vs {a} on one rank", step + 1);
    }
}

/// `training.loss_chunk_rows` reaches the workspaces: the loss in chunks of 5 rows (its
/// logits a fraction of the memory) trains like the whole, vocabulary-parallel too.
#[test]
fn a_loss_in_chunks_of_rows_trains_like_the_whole() {
    let dir = setup();
    let chunks = ["training.loss_chunk_rows=5"];
    for shape in [(1, 1, 1), (2, 1, 1)] {
        let (whole, w_whole, _) = train_with(dir.path(), shape, &[], 20, None, None);
        let (chunked, w_chunked, _) = train_with(dir.path(), shape, &chunks, 20, None, None);
        assert_matches(&format!("{shape:?} in chunks"), (&whole, &w_whole), (&chunked, &w_chunked));
    }
    let memory = |extra: &[&str]| on_ranks(dir.path(), (1, 1, 1), extra, |t| t.memory_bytes())[0];
    assert!(memory(&chunks) < memory(&[]), "the workspaces hold a whole micro-batch's logits");
}

#[test]
fn zero_1_equals_plain_data_parallel_with_a_fraction_of_the_optimizer_state() {
    let dir = setup();
    let (plain, w_plain, m_plain) = train_with(dir.path(), (1, 1, 4), &[], 20, None, None);
    let (zero, w_zero, m_zero) = train_with(dir.path(), (1, 1, 4), ZERO_1, 20, None, None);
    let n = w_plain.len();
    // Each plain replica holds the whole model, its head padded to aligned rows (CONFIG's
    // vocabulary of 257, d_model 32).
    let head_padding = (257usize.next_multiple_of(HEAD_ROW_ALIGN) - 257) * 32;
    assert_eq!(m_plain, n + head_padding);
    assert_eq!(m_zero, m_plain.div_ceil(4), "ZeRO-1 AdamW state per rank must be 1/dp of the parameters");
    for (a, b) in plain.iter().zip(&zero) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "loss {a} vs {b}");
    }
    let worst = ondol_core::gradcheck::max_abs_diff(&w_plain, &w_zero);
    assert!(worst <= 1e-6, "ZeRO-1 weights differ from plain DP by {worst:e}");
    eprintln!("zero-1 vs plain dp=4: max weight difference {worst:e}; AdamW state {m_zero} of {n} per rank");
}

/// Every rank finds and loads its checkpoint itself; ranks that loaded different ones, or
/// found none where others found one (a node that sees another filesystem), are refused, on
/// every rank, and none trains.
#[test]
fn ranks_that_loaded_different_checkpoints_are_refused_on_every_rank() {
    let dir = setup();
    let run = dir.path().join("run");
    train_with(dir.path(), (1, 1, 2), &[], 3, None, Some(&run));
    train_with(dir.path(), (1, 1, 2), &[], 6, None, Some(&run));
    let ckpt = |step: u64| run.join(format!("checkpoints/step-{step:08}"));
    // Per rank, the step of its checkpoint, or none (a rank starting from scratch).
    let outcomes = |steps: [Option<u64>; 2]| {
        on_ranks(dir.path(), (1, 1, 2), &[], |t| match steps[t.engine.comms.rank()] {
            Some(step) => {
                let loaded = checkpoint::load(&ckpt(step), &t.model().cfg, &t.model().layout).unwrap();
                t.restore(loaded).map(|_| t.step)
            }
            None => t.check_every_rank_loaded(None).map(|_| t.step),
        })
    };
    for r in outcomes([Some(3), Some(3)]) {
        assert_eq!(r.unwrap(), 3, "the same checkpoint on both ranks resumes");
    }
    for r in outcomes([None, None]) {
        assert_eq!(r.unwrap(), 0, "no checkpoint on either rank starts from scratch");
    }
    for (steps, want) in [
        ([Some(3), Some(6)], "world rank 0 loaded one of step 3, world rank 1 loaded one of step 6"),
        ([Some(6), None], "world rank 0 loaded one of step 6, world rank 1 found no checkpoint"),
    ] {
        for r in outcomes(steps) {
            let err = r.expect_err("ranks that resume differently must be refused").to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}

#[test]
fn a_zero_1_run_resumes_exactly_from_its_whole_checkpoint() {
    let dir = setup();
    let (want, w_want, _) = train_with(dir.path(), (1, 1, 2), ZERO_1, 12, None, None);
    let run = dir.path().join("run");
    let (mut got, _, _) = train_with(dir.path(), (1, 1, 2), ZERO_1, 6, None, Some(&run));
    let ckpt = checkpoint::latest(&run).unwrap();
    let (rest, w_got, _) = train_with(dir.path(), (1, 1, 2), ZERO_1, 6, Some(&ckpt), None);
    got.extend(rest);
    assert_eq!(got, want, "loss curves differ after resuming");
    assert!(w_got.iter().zip(&w_want).all(|(a, b)| a.to_bits() == b.to_bits()), "weights differ after resuming");
}

/// Resharding: a checkpoint saved at (tp 2, pp 2, dp 2), 2 micro-batches of 4 sequences a
/// replica, holds whole tensors; resumed at one rank, at (1, 4, 2), at (4, 1, 1) with ZeRO-1,
/// and with the global batch of 16 cut otherwise (4 micro-batches of 2 at dp 2, one of 16 at
/// pp 2), the next losses and the final weights match an uninterrupted run.
#[test]
fn a_checkpoint_resumes_on_any_layout() {
    let dir = setup();
    let (want, w_want, _) = train_with(dir.path(), (1, 1, 1), &[], 12, None, None);
    let run = dir.path().join("run");
    let (first, _, _) = train_with(dir.path(), (2, 2, 2), &[], 6, None, Some(&run));
    let ckpt = checkpoint::latest(&run).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!((state["layout"]["tp"].as_u64(), state["layout"]["pp"].as_u64()), (Some(2), Some(2)));
    let resumed: [(Shape, &[&str]); 5] = [
        ((1, 1, 1), &[]),
        ((1, 4, 2), &[]),
        ((4, 1, 1), ZERO_1),
        ((1, 1, 2), &["training.batch_size=2", "training.grad_accum=4"]),
        ((1, 2, 1), &["training.batch_size=16", "training.grad_accum=1"]),
    ];
    for (shape, extra) in resumed {
        let (rest, w, _) = train_with(dir.path(), shape, extra, 6, Some(&ckpt), None);
        let got: Vec<f64> = first.iter().chain(&rest).copied().collect();
        assert_matches(&format!("resumed at {shape:?}"), (&want, &w_want), (&got, &w));
    }
}

/// Validation covers `eval_batches` global batches whatever cuts them, so the curve goes on
/// where a run resumed with another split left it: here 3 batches of 16 sequences, as 2
/// micro-batches of 8, as 4 of 2 on each of 2 replicas and as 4 of 1 on each of 4 (pp 2); and
/// of a validation file of 44 sequences, the 2 whole global batches it holds.
#[test]
fn validation_reads_the_same_sequences_however_the_global_batch_is_cut() {
    let dir = setup();
    std::fs::write(dir.path().join("val.txt"), &"a short validation text. ".repeat(29)[..44 * 16 + 1]).unwrap();
    for val in ["data.val_fraction=0.1", "data.val=[\"val.txt\"]"] {
        let val_loss = |shape: Shape, extra: &[&str]| -> f64 {
            let extra = [&[val, "training.eval_batches=3"], extra].concat();
            let losses = on_ranks(dir.path(), shape, &extra, |t| t.evaluate().unwrap());
            losses[0].expect("the leader gets the validation loss")
        };
        let want = val_loss((1, 1, 1), &[]);
        for (shape, extra) in [
            ((1, 1, 2), &["training.batch_size=2", "training.grad_accum=4"]),
            ((1, 2, 4), &["training.batch_size=1", "training.grad_accum=4"]),
        ] {
            let got = val_loss(shape, extra);
            assert!((got - want).abs() <= 1e-6 * want, "{val}, {shape:?} {extra:?}: validation loss {got} vs {want}");
        }
        // eval_batches = 0 reads the least there is: one micro-batch of 8, a global batch
        // without accumulation.
        let least = val_loss((1, 1, 1), &["training.eval_batches=0"]);
        let one = val_loss((1, 1, 1), &["training.grad_accum=1", "training.eval_batches=1"]);
        assert_eq!(least.to_bits(), one.to_bits(), "{val}: eval_batches = 0 read {least}, one micro-batch {one}");
    }
}

/// `ondol launch` with 8 processes trains exactly as the same layout on 8 threads: TcpComm sums
/// in the rank order ThreadComm does, so the losses, the validation losses and the
/// checkpoint's files are the same bits. (2, 2, 2) with ZeRO-1 uses every channel; at (2, 1, 4)
/// a dp sum has four terms, whose order shows in the bits (two terms commute).
#[test]
fn launched_processes_train_bit_for_bit_like_thread_ranks() {
    let dir = setup();
    for (tp, pp, dp, zero) in [(2, 2, 2, 1), (2, 1, 4, 0)] {
        let sets = [
            format!("parallelism.tp={tp}"),
            format!("parallelism.pp={pp}"),
            format!("parallelism.dp={dp}"),
            format!("parallelism.zero={zero}"),
            format!("training.batch_size={}", 8 / dp),
            "data.val_fraction=0.1".into(),
            "training.threads=1".into(),
        ];
        let layout: Vec<&str> = sets.iter().flat_map(|s| ["--set", s.as_str()]).collect();
        let threads: Vec<&str> =
            ["train", "run.toml", "--run-dir", "threads"].iter().copied().chain(layout.clone()).collect();
        let (ok, err) = ondol_err(dir.path(), &threads);
        assert!(ok, "{err}");
        let launched: Vec<&str> = [
            "launch",
            "--nproc-per-node",
            "8",
            "--master-port",
            "0",
            "--",
            "train",
            "run.toml",
            "--run-dir",
            "launched",
        ]
        .iter()
        .copied()
        .chain(layout)
        .collect();
        let run = common::ondol(dir.path(), &launched);
        assert!(run.ok && run.stderr.contains("[rank 0] done: 20 steps"), "{}\n{}", run.stdout, run.stderr);
        // Every logged number but the timings.
        let rows = |run: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(dir.path().join(run).join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
                    let row_map = row.as_object_mut().unwrap();
                    row_map.retain(|k, _| ["step", "loss", "lr", "grad_norm", "val_loss"].contains(&k.as_str()));
                    row
                })
                .collect()
        };
        let want = rows("threads");
        assert_eq!(want.len(), 4, "2 training rows and 2 evaluations: {want:?}");
        assert_eq!(rows("launched"), want, "({tp}, {pp}, {dp})");
        for file in ["model.safetensors", "optimizer/exp_avg.safetensors", "optimizer/exp_avg_sq.safetensors"] {
            let read =
                |run: &str| std::fs::read(dir.path().join(run).join("checkpoints/step-00000020").join(file)).unwrap();
            assert!(
                read("threads") == read("launched"),
                "({tp}, {pp}, {dp}): {file} differs between threads and processes"
            );
        }
        for run in ["threads", "launched"] {
            std::fs::remove_dir_all(dir.path().join(run)).unwrap();
        }
    }
}

#[test]
fn a_layout_that_does_not_cover_the_launched_processes_is_refused() {
    let dir = setup();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(["train", "run.toml", "--run-dir", "run", "--set", "parallelism.tp=2"])
        .current_dir(dir.path())
        .env("RANK", "1")
        .env("WORLD_SIZE", "4")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("4 processes") && err.contains("parallelism.dp = 2"), "{err}");
    assert!(!dir.path().join("run").exists(), "a refused run left a run directory behind");
}

/// A rank waiting for a node that never comes says so before the timeout ends the wait.
#[test]
fn a_rank_waiting_for_the_others_says_so() {
    let dir = setup();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(["train", "run.toml", "--set", "parallelism.dp=2", "--set", "parallelism.timeout_s=2"])
        .current_dir(dir.path())
        .envs([("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")])
        .env("MASTER_PORT", &port)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let said = format!("rank 0: waiting for the job's 2 ranks to meet at 127.0.0.1:{port} (parallelism.timeout_s = 2)");
    assert!(err.contains(&said) && err.contains("did not connect within 2.0 s"), "{err}");
}

/// A mistake every launched rank meets is printed once, and the launch's message says which
/// ranks wrote it too (those the launcher stopped first may not have).
#[test]
fn an_error_every_launched_rank_writes_is_printed_once() {
    let dir = setup();
    let args = ["launch", "--nproc-per-node", "4", "--master-port", "0", "--", "train", "run.toml", "--run-dir", "run"];
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(!ok, "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("[rank ") && l.contains("] error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("4 processes"), "{err}");
    // Refused before rank 0 took the run directory, which it would have kept if stopped.
    assert!(!dir.path().join("run").exists(), "a refused launch left its run directory behind");
}

/// A rank whose node holds other data (here a corpus one line longer) is refused on every
/// rank, before any step: its replica would train on other batches.
#[test]
fn ranks_that_read_other_data_are_refused_on_every_rank() {
    let dir = setup();
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("corpus.txt"), "온돌 warms the floor from below; ".repeat(2001)).unwrap();
    std::fs::write(other.join("run.toml"), CONFIG).unwrap();
    let comms = RankComms::threads(Mesh::new(1, 1, 2).unwrap(), Duration::from_secs(60)).unwrap();
    let results: Vec<String> = std::thread::scope(|s| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let node = if c.coords.dp == 0 { dir.path().to_path_buf() } else { other.clone() };
                s.spawn(move || {
                    let cfg = RunConfig::load(&node.join("run.toml"), &["parallelism.dp=2".into()]).unwrap();
                    let data = Data::open(&cfg, &node).unwrap();
                    let t = Trainer::rank(CpuBackend, cfg, data, c.boxed()).unwrap();
                    t.check_every_rank_has_the_data().unwrap_err().to_string()
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for err in results {
        assert!(err.contains("world rank 1 reads other data than world rank 0"), "{err}");
    }
    let same = on_ranks(dir.path(), (1, 1, 2), &[], |t| t.check_every_rank_has_the_data().is_ok());
    assert_eq!(same, [true, true]);
}

/// Ranks that start from `model.init_from` check that they all read the same weights (here
/// they do: tp 2 x dp 2 threads on one filesystem) and train on from them.
#[test]
fn every_rank_starts_from_the_same_init_from_weights() {
    let dir = setup();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "pre", "--set", "training.steps=4"]);
    assert!(ok, "{err}");
    let sets = [
        "model.init_from=\"pre\"",
        "parallelism.tp=2",
        "parallelism.dp=2",
        "training.batch_size=4",
        "lr_scheduler.warmup_steps=0",
    ];
    let mut args = vec!["train", "run.toml", "--run-dir", "ft", "--set", "training.steps=2"];
    args.extend(sets.iter().flat_map(|s| ["--set", s]));
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(ok && err.contains("starting from the weights of") && err.contains("step-00000004"), "{err}");
}
