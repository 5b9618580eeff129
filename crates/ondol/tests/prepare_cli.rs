//! `ondol tokenizer train` and `ondol data prepare` as a user runs them, then training on the
//! result with `[data] tokenizer = "tokenizer.json"`.

mod common;
use common::ondol_err;

use std::io::Write;
use std::path::Path;

const RUN: &str = r#"
[model]
arch = "llama"
vocab_size = 400
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
train = ["shards/train_*.bin"]
val = ["shards/val_*.bin"]
format = "shards"
tokenizer = "shards/tokenizer.json"

[optimizer]
lr = 1e-3
"#;

#[test]
fn tokenizer_train_then_data_prepare_then_train_on_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    std::fs::create_dir(dir.path().join("corpus")).unwrap();
    let mut jsonl = Vec::new();
    for name in ["ko-constitution.txt", "en-web-mark.txt"] {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        std::fs::write(dir.path().join("corpus").join(name), &text).unwrap();
        for para in text.split("\n\n") {
            jsonl.push(serde_json::json!({ "text": para }).to_string());
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all((jsonl.join("\n") + "\n{not json}\n").as_bytes()).unwrap();
    std::fs::write(dir.path().join("corpus/docs.jsonl.gz"), gz.finish().unwrap()).unwrap();

    let (ok, err) = ondol_err(
        dir.path(),
        &["tokenizer", "train", "--input", "corpus/*.txt", "--vocab-size", "400", "--out", "tok.json"],
    );
    assert!(ok, "{err}");
    assert!(err.contains("Hangul") && err.contains("Latin") && err.contains("tok/char"), "{err}");
    // Not again over the same file, unasked.
    let again = ["tokenizer", "train", "--input", "corpus/en-web-mark.txt", "--vocab-size", "300", "--out", "tok.json"];
    let before = std::fs::read(dir.path().join("tok.json")).unwrap();
    let (ok, err) = ondol_err(dir.path(), &again);
    assert!(!ok && err.contains("tok.json exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("tok.json")).unwrap(), before);

    let prepare = |extra: &[&str]| {
        let mut args = vec!["data", "prepare", "--input", "corpus/*.jsonl.gz", "--tokenizer", "tok.json"];
        args.extend(["--out", "shards", "--val-fraction", "0.1", "--shard-tokens", "20000"]);
        args.extend(extra);
        ondol_err(dir.path(), &args)
    };
    let (ok, err) = prepare(&[]);
    assert!(ok, "{err}");
    assert!(err.contains("docs.jsonl.gz:") && err.contains("malformed JSON"), "{err}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("shards/manifest.json")).unwrap()).unwrap();
    let d = &manifest["documents"];
    let removed: u64 = d["removed"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(d["read"].as_u64().unwrap(), d["kept"].as_u64().unwrap() + removed, "{d}");
    assert_eq!(manifest["command"][1], "data");
    assert!(dir.path().join("shards/train_000000.bin").exists() && dir.path().join("shards/val_000000.bin").exists());

    // Again into the same directory: refused; with --strict on a broken line: one clear error.
    let (ok, err) = prepare(&[]);
    assert!(!ok && err.contains("--overwrite") && err.trim().lines().count() == 1, "{err}");
    let (ok, err) = prepare(&["--overwrite", "--strict"]);
    assert!(!ok && err.contains("docs.jsonl.gz:") && err.contains("--strict"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (ok, err) = prepare(&["--overwrite", "--near-threshold", "2"]);
    assert!(!ok && err.contains("--near-threshold 2") && err.contains("(0, 1]"), "{err}");
    // (The tokenizer normalises to NFC itself: --no-nfc changes no token, and says so.)
    let (ok, err) = prepare(&["--overwrite", "--no-nfc"]);
    assert!(ok && err.contains("normalises to NFC itself"), "{err}");
    // A named input that is not there stops it before any work; an input with no document
    // says why.
    let other = |input: &str| {
        ondol_err(dir.path(), &["data", "prepare", "--input", input, "--tokenizer", "tok.json", "--out", "x"])
    };
    let (ok, err) = other("corpus/nothere.txt");
    assert!(!ok && err.contains("corpus/nothere.txt: no such file"), "{err}");
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    let (ok, err) = other("empty.txt");
    assert!(!ok && err.contains("no document is left") && err.contains("the first problem: empty.txt"), "{err}");
    assert!(!dir.path().join("x").exists(), "a failed prepare left its new --out behind");

    // Train on the shards with the tokenizer (the file as the user named it); a vocabulary
    // that does not fit is refused.
    std::fs::write(dir.path().join("run.toml"), RUN).unwrap();
    let (ok, err) =
        ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "out", "--set", "data.tokenizer=\"tok.json\""]);
    assert!(ok && err.contains("done: 2 steps"), "{err}");
    // The checkpoint carries the tokenizer as tokenizer.json, names its end-of-text, and
    // generates through it.
    let ckpt = dir.path().join("out/checkpoints/step-00000002");
    let copied = std::fs::read(ckpt.join("tokenizer.json")).unwrap();
    assert_eq!(copied, std::fs::read(dir.path().join("tok.json")).unwrap());
    assert!(!ckpt.join("tok.json").exists());
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
    assert!(config["eos_token_id"].is_u64(), "{config}");
    // For transformers' AutoTokenizer, which without tokenizer_config.json knows no end of text.
    let read = std::fs::read(ckpt.join("tokenizer_config.json")).unwrap();
    let tokenizer_config: serde_json::Value = serde_json::from_slice(&read).unwrap();
    assert_eq!(tokenizer_config["eos_token"], "<|endoftext|>", "{tokenizer_config}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(["generate", ckpt.to_str().unwrap(), "--prompt", "온돌 floor", "--max-new-tokens", "5"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with("온돌 floor"), "{text} {}", String::from_utf8_lossy(&out.stderr));
    // Resuming needs the tokenizer the weights were trained with, compared by content: a copy
    // elsewhere will do, bytes will not (whatever on_data_change says).
    std::fs::copy(dir.path().join("tok.json"), dir.path().join("moved.json")).unwrap();
    let resume = |tokenizer: &str, data: &[&str]| {
        let tokenizer = format!("data.tokenizer=\"{tokenizer}\"");
        let restart = "checkpoint.on_data_change=\"restart\"";
        let mut args = vec!["train", "run.toml", "--set", &tokenizer, "--run-dir", "out", "--resume", "auto"];
        args.extend(["--set", "training.steps=3", "--set", restart]);
        data.iter().for_each(|d| args.extend(["--set", d]));
        ondol_err(dir.path(), &args)
    };
    let (ok, err) = resume("moved.json", &[]);
    assert!(ok && err.contains("resumed at step 2") && !err.contains("reading it from its start"), "{err}");
    // (Byte-level text data, which the shards' manifest would refuse with bytes.)
    let text = ["data.format=\"text\"", "data.train=[\"corpus/*.txt\"]", "data.val=[]"];
    let (ok, err) = resume("bytes", &text);
    assert!(!ok && err.contains("data.tokenizer") && err.contains("its tokenizer.json"), "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--set", "model.vocab_size=300"]);
    assert!(!ok && err.contains("model.vocab_size") && err.contains("data.tokenizer") && err.contains("400"), "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--set", "data.tokenizer=\"none.json\""]);
    assert!(!ok && err.contains("data.tokenizer") && err.contains("none.json"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // The shards' manifest names their tokenizer: another one, or none, is refused (their ids
    // would be read as other text); so is starting from weights that know another's ids.
    let args =
        ["tokenizer", "train", "--input", "corpus/en-web-mark.txt", "--vocab-size", "300", "--out", "other.json"];
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(ok, "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--set", "data.tokenizer=\"other.json\""]);
    assert!(
        !ok && err.contains("other.json is not the tokenizer the shards in") && err.contains("manifest.json"),
        "{err}"
    );
    // Nor does eval read shards of another tokenizer with a checkpoint's.
    let args = ["data", "prepare", "--input", "corpus/*.txt", "--tokenizer", "other.json", "--out", "other"];
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(ok, "{err}");
    let eval = |data: &str| ondol_err(dir.path(), &["eval", ckpt.to_str().unwrap(), "--data", data, "--batches", "1"]);
    let (ok, err) = eval("other/train_*.bin");
    assert!(!ok && err.contains("--data") && err.contains("made with another tokenizer"), "{err}");
    let (ok, err) = eval("shards/train_*.bin");
    assert!(ok, "{err}");
    std::fs::write(dir.path().join("none.toml"), RUN.replace("tokenizer = \"shards/tokenizer.json\"\n", "")).unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "none.toml"]);
    assert!(!ok && err.contains("data.tokenizer") && err.contains("were made with a tokenizer"), "{err}");
    let init = format!("model.init_from=\"{}\"", ckpt.display());
    let mut args = vec!["train", "run.toml", "--run-dir", "init", "--set", &init, "--set", "data.tokenizer=\"bytes\""];
    text.iter().for_each(|b| args.extend(["--set", b]));
    let (ok, err) = ondol_err(dir.path(), &args);
    assert!(
        !ok && err.contains("data.tokenizer = \"bytes\", but the weights of")
            && err.contains("know the token ids of its tokenizer.json"),
        "{err}"
    );
    assert!(err.contains(&format!("set data.tokenizer = \"{}/tokenizer.json\"", ckpt.display())), "{err}");

    // Shards without a manifest train without a tokenizer, but their checkpoint's ids are not
    // bytes: generate asks for the tokenizer instead of printing noise.
    std::fs::create_dir(dir.path().join("bare")).unwrap();
    for f in ["train_000000.bin", "val_000000.bin"] {
        std::fs::copy(dir.path().join("shards").join(f), dir.path().join("bare").join(f)).unwrap();
    }
    let bare = ["data.train=[\"bare/train_*.bin\"]", "data.val=[\"bare/val_*.bin\"]"];
    let (ok, err) =
        ondol_err(dir.path(), &["train", "none.toml", "--run-dir", "bare-run", "--set", bare[0], "--set", bare[1]]);
    assert!(ok, "{err}");
    let (ok, err) = ondol_err(dir.path(), &["generate", "bare-run/checkpoints/step-00000002", "--prompt", "a"]);
    assert!(!ok && err.contains("no tokenizer.json") && err.contains("not bytes"), "{err}");

    // Imported, a checkpoint's starter config tokenizes with the tokenizer.json it carries.
    let (ok, err) = ondol_err(dir.path(), &["import", "hf", ckpt.to_str().unwrap(), "--out", "imported"]);
    assert!(ok, "{err}");
    let starter = std::fs::read_to_string(dir.path().join("imported/ondol.toml")).unwrap();
    let tokenizer = std::path::absolute(dir.path().join("imported/tokenizer.json")).unwrap();
    assert!(starter.contains(&format!("tokenizer = \"{}\"", tokenizer.display())), "{starter}");
}

/// A tokenizer whose end-of-text is not `<|endoftext|>`: prepared with `--eot-token`, trained
/// with `data.eot_token`, which the shards' manifest asks for by name.
#[test]
fn shards_with_another_end_of_text_train_with_data_eot_token() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    std::fs::copy(root.join("en-web-mark.txt"), dir.path().join("mark.txt")).unwrap();
    let run = |args: &[&str]| ondol_err(dir.path(), args);
    let (ok, err) = run(&[
        "tokenizer",
        "train",
        "--input",
        "mark.txt",
        "--vocab-size",
        "400",
        "--special-tokens",
        "<|eos|>",
        "--out",
        "t.json",
    ]);
    assert!(ok, "{err}");
    let args = ["data", "prepare", "--input", "mark.txt", "--doc-split", "blank-line", "--tokenizer", "t.json"];
    let (ok, err) = run(&[&args[..], &["--out", "shards", "--eot-token", "<|eos|>", "--val-fraction", "0.1"]].concat());
    assert!(ok, "{err}");
    std::fs::write(dir.path().join("run.toml"), RUN).unwrap();
    let (ok, err) = run(&["train", "run.toml"]);
    assert!(!ok && err.contains("data.eot_token") && err.contains("set data.eot_token = \"<|eos|>\""), "{err}");
    let (ok, err) = run(&["train", "run.toml", "--set", "data.eot_token=\"<|eos|>\""]);
    assert!(ok && err.contains("done: 2 steps"), "{err}");
    let (ok, err) = run(&[
        "train",
        "run.toml",
        "--run-dir",
        "x",
        "--set",
        "data.eot_token=\"<|eos|>\"",
        "--set",
        "data.tokenizer=\"bytes\"",
    ]);
    assert!(!ok && err.contains("data.eot_token") && err.contains("tokenizer.json"), "{err}");

    // The manifest records how documents start (here with nothing: the tokenizer puts no BOS
    // first); shards that start them otherwise than the tokenizer does are prepared again.
    let manifest_path = dir.path().join("shards/manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["tokenizer"]["document_start"], serde_json::json!([]));
    manifest["tokenizer"]["document_start"] = serde_json::json!([7]);
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let eot = ["--set", "data.eot_token=\"<|eos|>\""];
    let (ok, err) = run(&[&["train", "run.toml", "--run-dir", "y"][..], &eot].concat());
    assert!(!ok && err.contains("start their documents with [7]") && err.contains("prepare them again"), "{err}");
    // A manifest from before the field: documents without a start, as this tokenizer's.
    manifest["tokenizer"].as_object_mut().unwrap().remove("document_start");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let (ok, err) = run(&[&["train", "run.toml", "--run-dir", "z"][..], &eot].concat());
    assert!(ok && err.contains("done: 2 steps"), "{err}");
}

/// A directory with a corpus and a run.toml whose `[data] prepare` table prepares it.
fn table_setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    std::fs::create_dir(dir.path().join("corpus")).unwrap();
    for name in ["ko-constitution.txt", "en-web-mark.txt"] {
        std::fs::copy(root.join(name), dir.path().join("corpus").join(name)).unwrap();
    }
    let config = RUN.replace(
        "tokenizer = \"shards/tokenizer.json\"",
        "tokenizer = \"shards/tokenizer.json\"\nprepare = { input = [\"corpus/*.txt\"], vocab_size = 400, out = \"shards\", doc_split = \"blank-line\", val_fraction = 0.1 }",
    );
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    dir
}

#[test]
fn a_prepare_table_prepares_on_the_first_run_only() {
    let dir = table_setup();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "out"]);
    assert!(ok && err.contains("training a tokenizer") && err.contains("done: 2 steps"), "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "again"]);
    assert!(ok && err.contains("using the prepared data"), "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--set", "data.prepare.vocab_size=500"]);
    assert!(!ok && err.contains("data.prepare.vocab_size") && err.contains("model.vocab_size = 400"), "{err}");
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--set", "data.prepare.bogus=1"]);
    assert!(!ok && err.contains("bogus") && err.contains("unknown field"), "{err}");
    // Other settings do not reuse data prepared with these (a 300-token tokenizer would have
    // been trained on over shards of the 400-token one).
    let same = "data.prepare.input=[\"./corpus/*.txt\"]";
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "y", "--set", same]);
    assert!(ok && err.contains("using the prepared data"), "{err}");
    let (ok, err) =
        ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "x", "--set", "data.prepare.vocab_size=300"]);
    assert!(!ok && err.contains("data.prepare.vocab_size") && err.contains("was prepared with 400, not "), "{err}");
    // Prepared again by hand, the directory no longer claims to be the table's.
    assert!(dir.path().join("shards/prepared-with.json").exists());
    let by_hand = ["data", "prepare", "--input", "corpus/*.txt", "--tokenizer", "shards/tokenizer.json"];
    let (ok, err) = ondol_err(dir.path(), &[&by_hand[..], &["--out", "shards", "--overwrite"]].concat());
    assert!(ok, "{err}");
    assert!(!dir.path().join("shards/prepared-with.json").exists());
}

/// Runs of a sweep started together on one prepare table: the first prepares, the others wait
/// for it and use its data (two preparing at once mixed their shards under one manifest).
#[test]
fn runs_started_together_on_a_prepare_table_prepare_once() {
    let dir = table_setup();
    let runs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|run| {
            std::process::Command::new(env!("CARGO_BIN_EXE_ondol"))
                .args(["train", "run.toml", "--run-dir", run])
                .current_dir(dir.path())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let errs: Vec<String> = runs
        .into_iter()
        .map(|r| {
            let out = r.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "{err}");
            err
        })
        .collect();
    let prepared = errs.iter().filter(|e| e.contains("training a tokenizer")).count();
    assert_eq!(prepared, 1, "{errs:#?}");
    assert_eq!(errs.iter().filter(|e| e.contains("using the prepared data")).count(), 2, "{errs:#?}");
}

/// Fine-tuning data: prompt-completion pairs from JSON Lines become shards with a loss mask
/// beside each, which learns each completion and the end-of-text after it and no prompt
/// token; training on them reports the loss of the completions; the manifest guards the masks.
#[test]
fn prompt_completion_pairs_are_prepared_with_loss_masks_and_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    let text = std::fs::read_to_string(root.join("en-web-mark.txt")).unwrap();
    std::fs::write(dir.path().join("mark.txt"), &text).unwrap();
    let (ok, err) = ondol_err(
        dir.path(),
        &["tokenizer", "train", "--input", "mark.txt", "--vocab-size", "400", "--out", "tok.json"],
    );
    assert!(ok, "{err}");
    // Each paragraph's first line asks, the rest answers; short ones too (no filter drops them).
    let mut pairs = Vec::new();
    for para in text.split("\n\n").filter(|p| p.contains('\n')) {
        let (prompt, completion) = para.split_once('\n').unwrap();
        if !completion.trim().is_empty() {
            pairs.push((format!("{prompt}\n"), completion.to_string()));
        }
    }
    pairs.push(("Who?\n".into(), "Mark.".into()));
    let jsonl: Vec<String> =
        pairs.iter().map(|(p, c)| serde_json::json!({ "prompt": p, "completion": c }).to_string()).collect();
    std::fs::write(dir.path().join("pairs.jsonl"), jsonl.join("\n") + "\n{\"prompt\": \"no answer\"}\n").unwrap();
    let prepare = |input: &str| {
        let mut args = vec!["data", "prepare", "--input", input, "--tokenizer", "tok.json", "--out", "shards"];
        args.extend(["--text-field", "prompt", "--completion-field", "completion", "--val-fraction", "0.25"]);
        ondol_err(dir.path(), &args)
    };
    let (ok, err) = prepare("mark.txt");
    assert!(!ok && err.contains("mark.txt is plain text") && err.contains("--completion-field"), "{err}");
    let (ok, err) = prepare("pairs.jsonl");
    assert!(ok, "{err}");
    assert!(err.contains("no field `completion`") && err.contains("learned:"), "{err}");

    // Every document of the shards: its end-of-text learned, its prompt (with the tokenizer's
    // document start) not, its completion learned and decoding to the pair's completion.
    let shards = dir.path().join("shards");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shards.join("manifest.json")).unwrap()).unwrap();
    let tok = ondol_data::TextTokenizer::from_file(&dir.path().join("tok.json"), "<|endoftext|>").unwrap();
    let eot = tok.eot_id();
    let mut seen = 0;
    for info in manifest["shards"].as_array().unwrap() {
        let file = shards.join(info["file"].as_str().unwrap());
        let shard = ondol_data::Shard::open(&file).unwrap();
        let mask = ondol_data::mask::LossMask::open(&shards.join(info["mask"].as_str().unwrap()), shard.len()).unwrap();
        let mut tokens = vec![0; shard.len()];
        shard.read(0, &mut tokens);
        let learned: Vec<bool> = (0..tokens.len()).map(|i| mask.learned(i)).collect();
        assert_eq!(info["learned_tokens"].as_u64().unwrap(), learned.iter().filter(|&&l| l).count() as u64);
        let starts: Vec<usize> = (0..tokens.len()).filter(|&i| tokens[i] == eot).collect();
        for (k, &start) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(tokens.len());
            assert!(learned[start], "the end-of-text at {start}");
            let doc = &tokens[start + 1..end];
            let prompt_len = learned[start + 1..end].iter().position(|&l| l).expect("a completion");
            assert!(learned[start + 1 + prompt_len..end].iter().all(|&l| l), "a learned completion");
            let (prompt, completion) =
                (tok.decode(&doc[..prompt_len]).unwrap(), tok.decode(&doc[prompt_len..]).unwrap());
            assert!(pairs.contains(&(prompt.clone(), completion.clone())), "{prompt:?} -> {completion:?}");
            seen += 1;
        }
    }
    assert_eq!(seen, pairs.len(), "every pair is a document");

    // Training reads the masks; the manifest refuses a shard that lost its mask.
    std::fs::write(dir.path().join("run.toml"), RUN).unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "out"]);
    assert!(ok && err.contains("done: 2 steps") && err.contains("loss masks lie beside"), "{err}");
    std::fs::remove_file(shards.join("val_000000.mask")).unwrap();
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "out2"]);
    assert!(!ok && err.contains("val_000000.mask, which is missing"), "{err}");
    // A model without a chat template does not chat.
    let (ok, err) = ondol_err(dir.path(), &["generate", "out", "--chat", "--prompt", "Who?"]);
    assert!(!ok && err.contains("--chat needs the model's chat template"), "{err}");
}

/// The end-of-text id of the tokenizer at `path`.
fn tok_eot(path: &Path) -> u32 {
    ondol_data::TextTokenizer::from_file(path, "<|endoftext|>").unwrap().eot_id()
}

/// Fine-tuning on conversations: each is rendered by the chat template of the
/// tokenizer_config.json beside the tokenizer, and only the assistant's turns (with the
/// template's end-of-turn) are learned; the template travels with the shards into checkpoints.
#[test]
fn conversations_are_rendered_by_the_chat_template_and_only_assistant_turns_are_learned() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
    let text = std::fs::read_to_string(root.join("ko-constitution.txt")).unwrap();
    std::fs::write(dir.path().join("law.txt"), &text).unwrap();
    let specials = "<|endoftext|>,<|im_start|>,<|im_end|>";
    let (ok, err) = ondol_err(
        dir.path(),
        &[
            "tokenizer",
            "train",
            "--input",
            "law.txt",
            "--vocab-size",
            "400",
            "--out",
            "tok.json",
            "--special-tokens",
            specials,
        ],
    );
    assert!(ok, "{err}");
    let template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}\
        {% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let config = serde_json::json!({ "chat_template": template, "eos_token": "<|im_end|>" });
    // Two-turn conversations over the articles; one that ends before the assistant speaks.
    let paras: Vec<&str> = text.split("\n\n").map(str::trim).filter(|p| p.chars().count() > 20).collect();
    let mut rows: Vec<String> = paras
        .chunks_exact(2)
        .map(|two| {
            let messages = serde_json::json!([
                {"role": "user", "content": "다음은?"}, {"role": "assistant", "content": two[0]},
                {"role": "user", "content": "그 다음은?"}, {"role": "assistant", "content": two[1]},
            ]);
            serde_json::json!({ "messages": messages }).to_string()
        })
        .collect();
    rows.push(serde_json::json!({"messages": [{"role": "user", "content": "?"}]}).to_string());
    std::fs::write(dir.path().join("chats.jsonl"), rows.join("\n") + "\n").unwrap();
    let prepare = |out: &str, template: &[&str]| {
        let mut args = vec!["data", "prepare", "--input", "chats.jsonl", "--tokenizer", "tok.json", "--out", out];
        args.extend(["--messages-field", "messages", "--val-fraction", "0.1"]);
        args.extend(template);
        ondol_err(dir.path(), &args)
    };
    let (ok, err) = prepare("shards", &[]);
    let unread = "the chat template: cannot read tokenizer_config.json";
    assert!(!ok && err.contains(unread) && err.contains("--chat-template"), "{err}");
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let (ok, err) = prepare("shards", &[]);
    assert!(ok, "{err}");
    assert!(err.contains("no assistant message") && err.contains("chats.jsonl:"), "{err}");
    // The same template in a file of its own makes the same shards.
    std::fs::write(dir.path().join("chat.jinja"), template).unwrap();
    let (ok, err) = prepare("shards2", &["--chat-template", "chat.jinja"]);
    assert!(ok, "{err}");
    let shard = |d: &str| std::fs::read(dir.path().join(d).join("train_000000.bin")).unwrap();
    let mask = |d: &str| std::fs::read(dir.path().join(d).join("train_000000.mask")).unwrap();
    assert!(shard("shards") == shard("shards2") && mask("shards") == mask("shards2"));
    // A template that marks only the last assistant turn (as Qwen3's does its reasoning) makes
    // a document per assistant turn: the conversation through it, only it learned.
    let marked = template.replace(
        "m['content'] | trim",
        "('(last) ' if loop.last and m['role'] == 'assistant' else '') + m['content'] | trim",
    );
    std::fs::write(dir.path().join("marked.jinja"), marked).unwrap();
    let (ok, err) = prepare("shards3", &["--chat-template", "marked.jinja"]);
    assert!(ok && err.contains("split") && err.contains("a document per assistant turn"), "{err}");
    let eot = tok_eot(&dir.path().join("tok.json"));
    let documents: usize = ["train", "val"]
        .iter()
        .map(|split| dir.path().join(format!("shards3/{split}_000000.bin")))
        .filter(|file| file.exists())
        .map(|file| {
            let shard = ondol_data::Shard::open(file).unwrap();
            (0..shard.len()).filter(|&i| shard.get(i) == eot).count()
        })
        .sum();
    assert_eq!(documents, 2 * (rows.len() - 1), "two documents per two-turn conversation");

    // What is learned, decoded per run of learned tokens, is each assistant content closed by
    // the end-of-turn, in order; nothing else is.
    let shards = dir.path().join("shards");
    let tok = ondol_data::TextTokenizer::from_file(&dir.path().join("tok.json"), "<|endoftext|>").unwrap();
    // (The template's <|im_end|> is the special token, as transformers encodes a template's
    // output, not its spelling in plain text.)
    let im_end = ondol_data::TextTokenizer::from_file(&dir.path().join("tok.json"), "<|im_end|>").unwrap().eot_id();
    let (mut turns, mut ends) = (Vec::new(), 0);
    for split in ["train", "val"] {
        let file = shards.join(format!("{split}_000000.bin"));
        let shard = ondol_data::Shard::open(&file).unwrap();
        let mask = ondol_data::mask::LossMask::beside(&file, shard.len()).unwrap().expect("a mask");
        let mut tokens = vec![0; shard.len()];
        shard.read(0, &mut tokens);
        let mut run = Vec::new();
        for (i, &t) in tokens.iter().enumerate() {
            if mask.learned(i) {
                assert_ne!(t, tok.eot_id(), "a document's separator is not learned after a conversation");
                ends += usize::from(t == im_end);
                run.push(t);
            } else if !run.is_empty() {
                turns.push(tok.decode(&std::mem::take(&mut run)).unwrap());
            }
        }
        turns.extend((!run.is_empty()).then(|| tok.decode(&run).unwrap()));
    }
    assert_eq!(turns.len(), 2 * (rows.len() - 1), "{turns:?}");
    assert_eq!(ends, turns.len(), "each learned turn closes with the end-of-turn token");
    for turn in &turns {
        let content = turn.strip_suffix("<|im_end|>\n").unwrap_or_else(|| panic!("{turn:?}"));
        assert!(paras.contains(&content), "{content:?}");
    }
    // The template goes into the checkpoints of a run on these shards.
    std::fs::write(dir.path().join("run.toml"), RUN).unwrap();
    // (A context long enough for the chat prompt below.)
    let (ok, err) = ondol_err(dir.path(), &["train", "run.toml", "--run-dir", "out", "--set", "model.max_seq_len=64"]);
    assert!(ok && err.contains("done: 2 steps"), "{err}");
    let ckpt = dir.path().join("out/checkpoints/step-00000002");
    let saved = std::fs::read_to_string(ckpt.join("tokenizer_config.json")).unwrap();
    assert!(saved.contains("add_generation_prompt"), "{saved}");
    // It answers a user's message through the template; only the reply is shown.
    let ckpt = ckpt.to_str().unwrap();
    let args = ["generate", ckpt, "--chat", "--prompt", "다음은?", "--max-new-tokens", "8", "--temperature", "0"];
    let r = common::ondol(dir.path(), &args);
    assert!(r.ok && !r.stdout.contains("다음은?"), "{} {}", r.stdout, r.stderr);
    // An import keeps the template (transformers 5 keeps it in chat_template.jinja).
    let (ok, err) = ondol_err(dir.path(), &["import", "hf", ckpt, "--out", "imported"]);
    assert!(ok, "{err}");
    let imported = std::fs::read_to_string(dir.path().join("imported/chat_template.jinja")).unwrap();
    assert_eq!(imported, template);
}
