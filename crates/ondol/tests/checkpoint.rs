//! Checkpoints: exact resume, crash safety under kill -9, and damaged or mismatched
//! checkpoints refused with a message that names the file or key.

mod common;
use common::ondol_err;

use ondol::config::RunConfig;
use ondol::trainer::{Data, DataPosition, Trainer};
use ondol_ckpt::checkpoint;
use ondol_core::Rng;
use ondol_cpu::CpuBackend;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Stdio};
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
steps = 12
batch_size = 2
grad_accum = 2
seq_len = 16
seed = 9
eval_batches = 1

[data]
train = ["corpus.txt"]
val_fraction = 0.1
format = "text"
tokenizer = "bytes"

[optimizer]
lr = 3e-3

[lr_scheduler]
warmup_steps = 3
decay = "cosine"
"#;

/// The same run drawing from two weighted sources.
fn mixture_config() -> String {
    CONFIG.replace(
        "train = [\"corpus.txt\"]\n",
        "[[data.sources]]\ntrain = [\"corpus.txt\"]\nweight = 3.0\n\n[[data.sources]]\ntrain = [\"other.txt\"]\nweight = 1.0\n\n[data]\n",
    )
    .replacen("[data]\n", "", 1)
}

fn setup_with(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(1);
    let text: String = (0..40_000).map(|_| ['가', 'a', 'b', ' ', '\n', '한', 'z'][rng.below(7) as usize]).collect();
    std::fs::write(dir.path().join("corpus.txt"), text).unwrap();
    std::fs::write(dir.path().join("other.txt"), "the other source. ".repeat(1500)).unwrap();
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    dir
}

fn setup() -> tempfile::TempDir {
    setup_with(CONFIG)
}

/// A trainer of `dir/run.toml` with `--set` overrides.
fn trainer(dir: &Path, overrides: &[&str]) -> Trainer<CpuBackend> {
    let overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
    let cfg = RunConfig::load(&dir.join("run.toml"), &overrides).unwrap();
    let data = Data::open(&cfg, dir).unwrap();
    Trainer::new(CpuBackend, cfg, data).unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    resume_is_exact(setup());
}

#[test]
fn a_resumed_mixture_run_is_bit_identical_too() {
    resume_is_exact(setup_with(&mixture_config()));
}

/// Restores `t` from the checkpoint `ckpt`.
fn restore(t: &mut Trainer<CpuBackend>, ckpt: &Path) -> ondol_core::Result<DataPosition> {
    let loaded = checkpoint::load(ckpt, &t.model().cfg, &t.model().layout).unwrap();
    t.restore(loaded)
}

/// A mixture run saved after 6 steps of 2 micro-batches of 2 sequences and resumed with the
/// global batch cut as 4 micro-batches of 1 trains on the same sequences: its losses and
/// weights match an uninterrupted run's to 1e-5 (the sums of micro-batches differ in order).
#[test]
fn a_resumed_mixture_run_may_cut_its_global_batch_otherwise() {
    let dir = setup_with(&mixture_config());
    let mut straight = trainer(dir.path(), &[]);
    let want: Vec<f64> = (0..12).map(|_| straight.step().unwrap().loss).collect();
    let mut first = trainer(dir.path(), &[]);
    let mut got: Vec<f64> = (0..6).map(|_| first.step().unwrap().loss).collect();
    let saved = checkpoint::save(&dir.path().join("run"), &first.snapshot().unwrap().unwrap()).unwrap();
    let mut second = trainer(dir.path(), &["training.batch_size=1", "training.grad_accum=4"]);
    assert_eq!(restore(&mut second, &saved).unwrap(), DataPosition::Continued);
    got.extend((0..6).map(|_| second.step().unwrap().loss));
    for (step, (a, b)) in want.iter().zip(&got).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "step {}: loss {b} vs {a}", step + 1);
    }
    let worst = ondol_core::gradcheck::max_abs_diff(
        &straight.whole_params().unwrap().unwrap(),
        &second.whole_params().unwrap().unwrap(),
    );
    assert!(worst <= 1e-5, "weights differ by {worst:e}");
    // Weights of the same shares, written at another scale, are the same mixture.
    let scaled = "data.sources=[{train=[\"corpus.txt\"], weight=6.0}, {train=[\"other.txt\"], weight=2.0}]";
    assert_eq!(restore(&mut trainer(dir.path(), &[scaled]), &saved).unwrap(), DataPosition::Continued);
    // New shares (an annealing stage) go on from every source's saved position, not from the
    // start of the data (which would read the first steps' sequences again).
    let mut annealed = trainer(dir.path(), &["data.sources[1].weight=3.0"]);
    assert_eq!(restore(&mut annealed, &saved).unwrap(), DataPosition::Continued);
    let position = |t: &Trainer<CpuBackend>| t.snapshot().unwrap().unwrap().data;
    assert_eq!(position(&annealed), position(&first));
    assert!(annealed.step().unwrap().loss.is_finite());
}

fn resume_is_exact(dir: tempfile::TempDir) {
    let mut straight = trainer(dir.path(), &[]);
    let want: Vec<u64> = (0..12).map(|_| straight.step().unwrap().loss.to_bits()).collect();

    // Run 6 of the 12 steps, checkpoint, drop everything (as a killed process would), resume.
    let mut first = trainer(dir.path(), &[]);
    let mut got: Vec<u64> = (0..6).map(|_| first.step().unwrap().loss.to_bits()).collect();
    let run_dir = dir.path().join("run");
    let saved = checkpoint::save(&run_dir, &first.snapshot().unwrap().unwrap()).unwrap();
    drop(first);
    let mut second = trainer(dir.path(), &[]);
    let loaded = checkpoint::load(&saved, &second.model().cfg, &second.model().layout).unwrap();
    second.restore(loaded).unwrap();
    assert_eq!(second.step, 6);
    got.extend((0..6).map(|_| second.step().unwrap().loss.to_bits()));

    assert_eq!(got, want, "loss curves differ after resuming");
    let [p2, _, v2] = second.engine.whole_state().unwrap().unwrap();
    let [p1, _, v1] = straight.engine.whole_state().unwrap().unwrap();
    assert!(bits(&p2) == bits(&p1), "final weights differ after resuming");
    assert!(bits(&v2) == bits(&v1), "AdamW moments differ after resuming");
}

#[test]
fn kill_9_at_random_moments_never_breaks_resume() {
    let dir = setup();
    let args = [
        "train",
        "run.toml",
        "--run-dir",
        "run",
        "--resume",
        "auto",
        "--set",
        "training.steps=400",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep_last=2",
        "--set",
        "training.eval_batches=0",
        "--set",
        "metrics.log_every=50",
    ];
    let mut rng = Rng::new(7);
    let mut killed = 0;
    for _ in 0..8 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ondol"))
            .args(args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        // Whatever moment the kill hit, the newest checkpoint is complete and verifies.
        if let Some(latest) = checkpoint::latest(&dir.path().join("run")) {
            checkpoint::verify(&latest).unwrap();
        }
    }
    assert!(killed >= 4, "only {killed} runs were still going when killed");
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(ok, "{err}");
    // (The killed runs may have finished: then it trains nothing.)
    assert!(err.contains("resumed at step") || err.contains("nothing to train"), "{err}");
    let latest = checkpoint::latest(&dir.path().join("run")).unwrap();
    assert_eq!(checkpoint::verify(&latest).unwrap().step, 400);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("run/checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left behind");
}

/// `checkpoint.at_end = false` writes only the periodic checkpoints (none with `every = 0`).
#[test]
fn a_run_can_skip_its_final_checkpoint() {
    let dir = setup();
    let train = |every: &str| {
        let (ok, err) = ondol_err(
            dir.path(),
            &["train", "run.toml", "--run-dir", "run", "--set", "checkpoint.at_end=false", "--set", every],
        );
        assert!(ok, "{err}");
        let ckpts = dir.path().join("run/checkpoints");
        let mut names: Vec<String> = std::fs::read_dir(&ckpts)
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
        names
    };
    assert_eq!(train("checkpoint.every=0"), Vec::<String>::new());
    let periodic = train("checkpoint.every=5");
    assert_eq!(
        periodic.iter().filter(|n| n.starts_with("step-")).collect::<Vec<_>>(),
        ["step-00000005", "step-00000010"]
    );
    // A run started again over one that left no checkpoint keeps the earlier rows aside.
    let args = ["train", "run.toml", "--run-dir", "run", "--set", "checkpoint.at_end=false"];
    assert!(ondol_err(dir.path(), &args).0);
    let earlier = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(ok && err.contains("added to") && err.contains("metrics.earlier.jsonl"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("run/metrics.earlier.jsonl")).unwrap(), earlier);
    // A third run adds the second's rows after the first's.
    let second = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert!(ondol_err(dir.path(), &args).0);
    let kept = std::fs::read_to_string(dir.path().join("run/metrics.earlier.jsonl")).unwrap();
    assert_eq!(kept, earlier + &second);
}

/// After a resume from an earlier checkpoint, the abandoned continuation's later checkpoints
/// neither count for `keep_last` nor go before the run passes them, and an auto resume whose
/// `latest` is damaged prefers the run's own earlier ones to them. Counting them deleted what
/// the run had just written (keep_last = 1), or its own older ones while keeping a stale one.
#[test]
fn a_run_resumed_from_an_earlier_checkpoint_keeps_its_own_and_drops_the_abandoned_ones() {
    let dir = setup();
    let train = |extra: &[&str]| {
        let args = [&["train", "run.toml", "--run-dir", "run"], extra].concat();
        let (ok, err) = ondol_err(dir.path(), &args);
        assert!(ok, "{err}");
        err
    };
    let ckpts = dir.path().join("run/checkpoints");
    let names = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    let latest = || checkpoint::verify(&checkpoint::latest(&dir.path().join("run")).unwrap()).unwrap().step;
    train(&["--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=3"]);
    assert_eq!(names(), ["latest", "step-00000010", "step-00000011", "step-00000012"]);

    // From step 10 to 11, keeping 1: step 11 is replaced and kept, 12 (not passed) stays.
    let from = ckpts.join("step-00000010");
    let keep_one = ["--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=1", "--set", "training.steps=11"];
    let err = train(&[&["--resume", from.to_str().unwrap()], &keep_one[..]].concat());
    assert!(err.contains("steps 11, 12 in") && err.contains("past step 10"), "{err}");
    assert!(err.contains("done: 1 step (step 10 -> 11)"), "{err}");
    assert_eq!(names(), ["latest", "step-00000011", "step-00000012"]);
    assert_eq!(latest(), 11);

    // Again from a fresh first run, to 11 keeping 2; then with the checkpoint `latest` names
    // damaged, an auto resume goes on from step 10, not the abandoned 12, and writing step 15
    // (every 5) passes 11 and 12, which go, while its own 10 stays among the 2 kept.
    std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    train(&["--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=3"]);
    let keep_two = ["--set", "checkpoint.every=1", "--set", "checkpoint.keep_last=2", "--set", "training.steps=11"];
    train(&[&["--resume", from.to_str().unwrap()], &keep_two[..]].concat());
    assert_eq!(names(), ["latest", "step-00000010", "step-00000011", "step-00000012"]);
    std::fs::write(ckpts.join("step-00000011/model.safetensors"), b"damaged").unwrap();
    let err = train(&[
        "--resume",
        "auto",
        "--set",
        "checkpoint.every=5",
        "--set",
        "checkpoint.keep_last=2",
        "--set",
        "training.steps=15",
    ]);
    assert!(err.contains("skipping checkpoint") && err.contains("resumed at step 10"), "{err}");
    // 15 steps reshape the 12-step run's cosine: the jump in rate is said.
    assert!(err.contains("note: the learning rate of step 11") && err.contains("training.steps 12"), "{err}");
    assert_eq!(names(), ["latest", "step-00000010", "step-00000015"]);
    assert_eq!(latest(), 15);
    // metrics.jsonl reads as one run: one evaluation per step evaluated, the resumed one too.
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let evals: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|row| row.get("val_loss").is_some())
        .map(|row| row["step"].as_u64().unwrap())
        .collect();
    assert!(evals.windows(2).all(|w| w[0] < w[1]) && evals.contains(&10), "evaluations at steps {evals:?}");
}

/// A new stage on other data (here another file, in global batches twice the size): refused
/// by default, naming the key that allows it; with `checkpoint.on_data_change = "restart"` the
/// weights, AdamW state, step and token count come from the checkpoint and the new data is
/// read from its start, and the stage's own checkpoints then continue its data exactly.
#[test]
fn a_new_stage_on_other_data_keeps_the_training_state_and_starts_its_data() {
    let dir = setup();
    let mut first = trainer(dir.path(), &[]);
    for _ in 0..6 {
        first.step().unwrap();
    }
    let saved = checkpoint::save(&dir.path().join("run"), &first.snapshot().unwrap().unwrap()).unwrap();
    let stage = |extra: &[&str]| {
        trainer(dir.path(), &[&["data.train=[\"other.txt\"]", "training.batch_size=4"], extra].concat())
    };
    let restart = "checkpoint.on_data_change=\"restart\"";

    let err = restore(&mut stage(&[]), &saved).unwrap_err().to_string();
    assert!(err.contains("data.train") && err.contains("corpus.txt") && err.contains("on_data_change"), "{err}");
    let err = restore(&mut trainer(dir.path(), &["training.batch_size=4"]), &saved).unwrap_err().to_string();
    assert!(
        err.contains("the global batch")
            && err.contains("8 differs")
            && err.contains("it has 4")
            && err.contains("on_data_change"),
        "{err}"
    );

    let mut second = stage(&[restart]);
    assert_eq!(restore(&mut second, &saved).unwrap(), DataPosition::Restarted);
    assert_eq!((second.step, second.tokens), (6, first.tokens));
    let [p1, m1, v1] = first.engine.whole_state().unwrap().unwrap();
    let [p2, m2, v2] = second.engine.whole_state().unwrap().unwrap();
    assert!(bits(&p2) == bits(&p1) && bits(&m2) == bits(&m1) && bits(&v2) == bits(&v1), "the state was not restored");
    let start = stage(&[restart]).snapshot().unwrap().unwrap().data;
    assert_eq!(second.snapshot().unwrap().unwrap().data, start, "the new data does not start at its beginning");
    second.step().unwrap();
    assert_eq!(second.tokens, first.tokens + second.tokens_per_step());

    // The second stage's own checkpoint: the same data, so its position goes on.
    let stage_dir = dir.path().join("stage");
    let own = checkpoint::save(&stage_dir, &second.snapshot().unwrap().unwrap()).unwrap();
    let want: Vec<u64> = (0..3).map(|_| second.step().unwrap().loss.to_bits()).collect();
    let mut third = stage(&[restart]);
    assert_eq!(restore(&mut third, &own).unwrap(), DataPosition::Continued);
    let got: Vec<u64> = (0..3).map(|_| third.step().unwrap().loss.to_bits()).collect();
    assert_eq!(got, want, "the stage's own checkpoint did not continue its data");

    // On the CLI, the stage names its start in checkpoint.resume_from: a run without
    // checkpoints of its own starts there (saying the data starts over), and `--resume auto`
    // takes the stage's own once it has one.
    let from = format!("checkpoint.resume_from=\"{}\"", saved.display());
    let stage_cli = |more: &[&str]| {
        let args =
            ["train", "run.toml", "--run-dir", "stage-cli", "--set", "data.train=[\"other.txt\"]", "--set", restart];
        ondol_err(dir.path(), &[&args[..], more].concat())
    };
    let (ok, err) = stage_cli(&["--set", &from, "--set", "training.steps=7", "--resume", "auto"]);
    assert!(ok && err.contains("starting from") && err.contains("reading it from its start"), "{err}");
    assert!(err.contains("resumed at step 6"), "{err}");
    let (ok, err) = stage_cli(&["--set", &from, "--set", "training.steps=8", "--resume", "auto"]);
    assert!(ok && err.contains("resumed at step 7") && !err.contains("reading it from its start"), "{err}");
    // Without --resume it would start over on top of them; a named checkpoint goes first.
    let (ok, err) = stage_cli(&["--set", &from, "--set", "training.steps=9"]);
    assert!(!ok && err.contains("checkpoint.resume_from") && err.contains("--resume auto"), "{err}");
    let own = dir.path().join("stage-cli/checkpoints/step-00000007");
    let (ok, err) = stage_cli(&["--set", &from, "--set", "training.steps=8", "--resume", own.to_str().unwrap()]);
    assert!(ok && err.contains("resumed at step 7"), "{err}");
    let args = ["train", "run.toml", "--run-dir", "fresh", "--set", "checkpoint.resume_from=\"nowhere\""];
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(!ok && err.contains("checkpoint.resume_from") && err.contains("nowhere"), "{err}");
}

/// What does not move the training data is no data change: validation files of their own
/// (here others), and a file pattern spelled as another path to the same file. Switching to a
/// fraction held out of the training files is one.
#[test]
fn another_validation_set_or_spelling_of_a_path_continues_the_data() {
    let dir = setup();
    let mut first = trainer(dir.path(), &["data.val=[\"other.txt\"]"]);
    for _ in 0..3 {
        first.step().unwrap();
    }
    let saved = checkpoint::save(&dir.path().join("run"), &first.snapshot().unwrap().unwrap()).unwrap();
    let want: Vec<u64> = (0..3).map(|_| first.step().unwrap().loss.to_bits()).collect();
    std::fs::write(dir.path().join("held-out.txt"), "a held-out text. ".repeat(1500)).unwrap();
    let mut second = trainer(dir.path(), &["data.val=[\"held-out.txt\"]", "data.train=[\"./corpus.txt\"]"]);
    assert_eq!(restore(&mut second, &saved).unwrap(), DataPosition::Continued);
    let got: Vec<u64> = (0..3).map(|_| second.step().unwrap().loss.to_bits()).collect();
    assert_eq!(got, want, "the data did not continue");
    let err = restore(&mut trainer(dir.path(), &[]), &saved).unwrap_err().to_string();
    assert!(err.contains("data.val") && err.contains("on_data_change"), "{err}");
    // Patterns written otherwise that match the same files (here an absolute path, as a job
    // requeued in another directory needs) continue too; a pattern matching more is a change.
    let absolute = format!("data.train=[\"{}\"]", dir.path().join("corpus.txt").display());
    let mut third = trainer(dir.path(), &["data.val=[\"other.txt\"]", &absolute]);
    assert_eq!(restore(&mut third, &saved).unwrap(), DataPosition::Continued);
    let got: Vec<u64> = (0..3).map(|_| third.step().unwrap().loss.to_bits()).collect();
    assert_eq!(got, want, "the data did not continue");
    let err = restore(
        &mut trainer(dir.path(), &["data.val=[\"other.txt\"]", "data.train=[\"corpus.txt\", \"held-out.txt\"]"]),
        &saved,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("data.train") && err.contains("on_data_change"), "{err}");
}

/// The same patterns over files that changed since the checkpoint (prepared again, or grown)
/// are other data: refused by default, read from the start with on_data_change = "restart".
#[test]
fn files_changed_under_the_same_names_are_a_data_change() {
    let dir = setup_with(&mixture_config());
    let mut first = trainer(dir.path(), &[]);
    for _ in 0..2 {
        first.step().unwrap();
    }
    let saved = checkpoint::save(&dir.path().join("run"), &first.snapshot().unwrap().unwrap()).unwrap();
    assert_eq!(restore(&mut trainer(dir.path(), &[]), &saved).unwrap(), DataPosition::Continued);
    std::fs::write(dir.path().join("other.txt"), "the other source, prepared again. ".repeat(1200)).unwrap();
    let err = restore(&mut trainer(dir.path(), &[]), &saved).unwrap_err().to_string();
    assert!(
        err.contains("data.sources[1].train") && err.contains("prepared again") && err.contains("restart"),
        "{err}"
    );
    let restart = ["checkpoint.on_data_change=\"restart\""];
    assert_eq!(restore(&mut trainer(dir.path(), &restart), &saved).unwrap(), DataPosition::Restarted);
}

/// A file matched by two sources, or by training and validation, is refused naming both fields,
/// however its path is spelled.
#[test]
fn a_file_in_two_data_fields_is_refused() {
    let dir = setup_with(&mixture_config());
    let open = |overrides: &[&str]| {
        let overrides: Vec<String> = overrides.iter().map(|o| o.to_string()).collect();
        let cfg = RunConfig::load(&dir.path().join("run.toml"), &overrides).unwrap();
        Data::open(&cfg, dir.path()).err().map(|e| e.to_string())
    };
    let err = open(&["data.sources[1].train=[\"./*.txt\"]"]).expect("a file in two sources");
    assert!(err.contains("data.sources[1].train") && err.contains("data.sources[0].train"), "{err}");
    let err = open(&["data.val=[\"./other.txt\"]"]).expect("a validation file trained on");
    assert!(err.contains("data.val") && err.contains("other.txt") && err.contains("memorisation"), "{err}");
    std::fs::write(dir.path().join("held-out.txt"), "held out").unwrap();
    assert_eq!(open(&["data.val=[\"held-out.txt\"]"]), None);
}

#[test]
fn damaged_checkpoints_are_refused_and_auto_falls_back() {
    let dir = setup();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run", "--set", "checkpoint.every=4"]);
    assert!(ok, "{err}");
    let ckpts = dir.path().join("run/checkpoints");
    let newest = ckpts.join("step-00000012");
    let model = newest.join("model.safetensors");
    let pristine = std::fs::read(&model).unwrap();
    let resume = |spec: &str| {
        ondol_err(
            dir.path(),
            &["train", "run.toml", "--run-dir", "run", "--resume", spec, "--set", "training.steps=14"],
        )
    };

    // A flipped byte.
    let mut flipped = pristine.clone();
    flipped[pristine.len() / 2] ^= 0x40;
    std::fs::write(&model, &flipped).unwrap();
    let (ok, err) = resume(newest.to_str().unwrap());
    assert!(!ok && err.contains("model.safetensors") && err.contains("checksum mismatch"), "{err}");
    // Evaluation of the run refuses its damaged latest, naming the newest intact one.
    let (ok, err) = ondol_err(dir.path(), &["eval", "run", "--data", "corpus.txt", "--batches", "1"]);
    assert!(!ok && err.contains("checksum mismatch") && err.contains("newest intact checkpoint is"), "{err}");
    assert!(err.contains("step-00000008"), "{err}");
    // auto skips it with a warning and resumes from the previous checkpoint.
    let (ok, err) = resume("auto");
    assert!(ok, "{err}");
    assert!(err.contains("warning: skipping checkpoint") && err.contains("resumed at step 8"), "{err}");

    // A truncated file and a missing file (in the previous checkpoint, now the fallback).
    let older = ckpts.join("step-00000008");
    let opt = older.join("optimizer/exp_avg.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() - 10]).unwrap();
    let (ok, err) = resume(older.to_str().unwrap());
    assert!(!ok && err.contains("exp_avg.safetensors") && !err.contains("panicked"), "{err}");
    std::fs::remove_file(older.join("config.json")).unwrap();
    let (ok, err) = resume(older.to_str().unwrap());
    assert!(!ok && err.contains("config.json") && err.contains("missing"), "{err}");

    // A checkpoint of another architecture.
    let intact = checkpoint::latest(&dir.path().join("run")).unwrap();
    let (ok, err) = ondol_err(
        dir.path(),
        &[
            "train",
            "run.toml",
            "--resume",
            intact.to_str().unwrap(),
            "--set",
            "model.arch=\"gpt2\"",
            "--set",
            "model.n_kv_heads=4",
        ],
    );
    assert!(!ok && err.contains("model.arch") && err.contains("llama"), "{err}");
}

/// A checkpoint whose optimizer/ was deleted to save space holds weights only: evaluation,
/// generation and init_from use it (its weights still verified), a resume is refused with
/// what to do instead.
#[test]
fn a_checkpoint_of_weights_only_serves_all_but_a_resume() {
    let dir = setup();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run"]);
    assert!(ok, "{err}");
    let slim = dir.path().join("run/checkpoints/step-00000012");
    std::fs::remove_dir_all(slim.join("optimizer")).unwrap();
    let slim = slim.to_str().unwrap();
    let (ok, err) = ondol_err(dir.path(), &["eval", slim, "--data", "corpus.txt", "--batches", "1"]);
    assert!(ok, "{err}");
    let (ok, err) = ondol_err(dir.path(), &["generate", slim, "--prompt", "a", "--max-new-tokens", "2"]);
    assert!(ok, "{err}");
    let init = format!("model.init_from=\"{slim}\"");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "ft", "--set", &init]);
    assert!(ok && err.contains("starting from the weights"), "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run2", "--resume", slim]);
    assert!(!ok && err.contains("weights only") && err.contains("model.init_from"), "{err}");
    // A run directory given to --resume stands for its latest checkpoint, as it does for eval;
    // a directory that is neither is not called weights.
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run2", "--resume", "run"]);
    assert!(!ok && err.contains("--resume run: the checkpoint") && err.contains("weights only"), "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run2", "--resume", "."]);
    assert!(!ok && err.contains("not a checkpoint") && !err.contains("weights only"), "{err}");
    // With no checkpoint it can resume, the run says which weights would start a new one; a
    // `latest` that names no checkpoint is said to.
    let latest = dir.path().join("run/checkpoints/latest");
    std::fs::write(&latest, "step-00000099").unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "run", "--resume", "auto"]);
    assert!(err.contains("names \"step-00000099\", which is not a checkpoint here"), "{err}");
    assert!(
        !ok && err.contains("can be resumed") && err.contains("model.init_from=\"run/checkpoints/step-00000012\""),
        "{err}"
    );
    std::fs::write(&latest, "step-00000012").unwrap();
    // The weights are still checked.
    let model = dir.path().join("run/checkpoints/step-00000012/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let (ok, err) = ondol_err(dir.path(), &["eval", slim, "--data", "corpus.txt", "--batches", "1"]);
    assert!(!ok && err.contains("checksum mismatch"), "{err}");
}

/// A checkpoint an earlier version wrote may hold a setting its run did not read, which a
/// config a user writes is now refused for: it still inspects, evaluates and resumes.
#[test]
fn a_checkpoint_holding_a_setting_its_run_did_not_read_still_serves() {
    let dir = setup();
    let constant = ["--set", "lr_scheduler.decay=\"constant\"", "--set", "training.steps=4"];
    let (ok, err) = ondol_err(dir.path(), &[&["train", "run.toml", "--run-dir", "run"][..], &constant].concat());
    assert!(ok, "{err}");
    // As an earlier version wrote it: a rate's end beside a constant rate, checksummed.
    let ckpt = dir.path().join("run/checkpoints/step-00000004");
    let toml = ckpt.join("ondol.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| if l.starts_with("min_lr_ratio") { "min_lr_ratio = 0.0".to_string() } else { l.to_string() })
        .collect();
    assert!(text.iter().any(|l| l == "min_lr_ratio = 0.0"), "no min_lr_ratio in {}", toml.display());
    std::fs::write(&toml, text.join("\n") + "\n").unwrap();
    let state_file = ckpt.join("trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let sha: String = Sha256::digest(std::fs::read(&toml).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    state["files"]["ondol.toml"] = sha.into();
    std::fs::write(&state_file, serde_json::to_string(&state).unwrap()).unwrap();

    let (ok, err) = ondol_err(dir.path(), &["inspect", "run"]);
    assert!(ok, "{err}");
    let (ok, err) = ondol_err(dir.path(), &["eval", "run", "--data", "corpus.txt", "--batches", "1"]);
    assert!(ok, "{err}");
    let longer = ["--set", "lr_scheduler.decay=\"constant\"", "--set", "training.steps=5"];
    let (ok, err) =
        ondol_err(dir.path(), &[&["train", "run.toml", "--run-dir", "run", "--resume", "auto"][..], &longer].concat());
    assert!(ok && err.contains("resumed at step 4"), "{err}");
}

/// A finished run, a run directory trained over from scratch, an edited trainer_state.json
/// and a half-written checkpoint: each refused (or, for the finished run, a no-op), with
/// nothing the run wrote before changed.
#[test]
fn runs_and_checkpoints_are_never_overwritten_or_trusted_unchecked() {
    let dir = setup();
    let train = |extra: &[&str]| {
        let args = [&["train", "run.toml", "--run-dir", "run", "--set", "checkpoint.every=4"], extra].concat();
        ondol_err(dir.path(), &args)
    };
    let (ok, err) = train(&[]);
    assert!(ok, "{err}");
    let metrics = dir.path().join("run/metrics.jsonl");
    let before = std::fs::read(&metrics).unwrap();

    // Training again without --resume would start over on top of the run.
    let (ok, err) = train(&[]);
    assert!(!ok && err.contains("already holds a run") && err.contains("--resume auto"), "{err}");
    // A finished run trains nothing; fewer steps than the checkpoint's is an error.
    let (ok, err) = train(&["--resume", "auto"]);
    assert!(ok && err.contains("nothing to train"), "{err}");
    let (ok, err) = train(&["--resume", "auto", "--set", "training.steps=8"]);
    assert!(!ok && err.contains("training.steps") && err.contains("12"), "{err}");
    assert_eq!(std::fs::read(&metrics).unwrap(), before, "metrics.jsonl changed");

    // trainer_state.json without a file's checksum, or with another step than its directory's.
    let ckpts = dir.path().join("run/checkpoints");
    let edit = |step: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let path = ckpts.join(step).join("trainer_state.json");
        let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        change(&mut state);
        std::fs::write(&path, state.to_string()).unwrap();
        ckpts.join(step).to_str().unwrap().to_string()
    };
    let unlisted = edit("step-00000012", &|s| {
        s["files"].as_object_mut().unwrap().remove("model.safetensors");
    });
    let (ok, err) = train(&["--resume", &unlisted, "--set", "training.steps=14"]);
    assert!(!ok && err.contains("model.safetensors") && err.contains("not among the checksums"), "{err}");
    let restepped = edit("step-00000008", &|s| s["step"] = 7.into());
    let (ok, err) = train(&["--resume", &restepped, "--set", "training.steps=14"]);
    assert!(!ok && err.contains("step 7 in the directory of step 8"), "{err}");

    // A checkpoint still being written (or left so by a crash) is no model to evaluate.
    let tmp = ckpts.join(".step-00000016.tmp");
    std::fs::create_dir(&tmp).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(ckpts.join("step-00000004").join(f), tmp.join(f)).unwrap();
    }
    let (ok, err) = ondol_err(dir.path(), &["eval", tmp.to_str().unwrap(), "--data", "corpus.txt", "--batches", "1"]);
    assert!(!ok && err.contains("half-written"), "{err}");

    // Importing into a directory that holds anything would replace it whole.
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let src = ckpts.join("step-00000004");
    let (ok, err) = ondol_err(dir.path(), &["import", "hf", src.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("not an empty directory"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "keep me");
}

/// Ranks as threads of one process: the refusal to train over a run comes before any rank
/// starts, so none is left waiting at its first collective for the one that refused (with a
/// 10-minute collective timeout here, a rank left waiting would hold the process past the
/// deadline below).
#[test]
fn a_rerun_of_a_thread_ranked_run_is_refused_before_its_ranks_start() {
    let dir = setup();
    let args =
        ["train", "run.toml", "--run-dir", "run", "--set", "parallelism.dp=2", "--set", "parallelism.timeout_s=600"];
    let (ok, err) = ondol_err(dir.path(), &[&args[..], &["--set", "training.steps=4"]].concat());
    assert!(ok, "{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(args)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the refused rerun still runs after 60 s: a rank waits for the one that refused");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already holds a run"), "{err}");
}
