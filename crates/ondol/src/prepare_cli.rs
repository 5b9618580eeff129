//! `ondol tokenizer train` and `ondol data prepare`: flags, and the hand-off to ondol-data.
//! Also the trainer's side of prepared data: `[data] prepare = {...}` (prepare on first run)
//! and the check of `[data] tokenizer = "tokenizer.json"` against `model.vocab_size`.
//!
//! The flag defaults here are the library defaults (`TrainConfig::default`,
//! `PrepareConfig::new`); a test keeps them equal.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use ondol_core::{Error, Result};
use ondol_data::clean::CleanConfig;
use ondol_data::dedup::NearDedupConfig;
use ondol_data::expand_globs;
use ondol_data::input::{DocSplit, InputOptions, expand_inputs};
use ondol_data::prepare::{PrepareConfig, ShardTokenizer, prepare, write_atomic};
use ondol_data::tokenizer::{self, TextTokenizer, TrainConfig};

use crate::config::{DataFormat, PrepareTable, RunConfig, plain_path};
use crate::dir_lock::{DirLock, Purpose};
use crate::trainer::first_difference;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (NFC, no unknown tokens) and write tokenizer.json.
    Train(TokenizerTrainArgs),
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Clean, deduplicate, split and tokenize raw text into token shards with a manifest.
    Prepare(Box<DataPrepareArgs>),
}

/// Where documents come from; shared by both commands.
#[derive(Args, Debug)]
pub struct InputArgs {
    /// Input files or globs (quote globs): .txt, .jsonl/.ndjson/.json, each optionally .gz or .zst.
    /// Several may follow one --input, and --input may repeat.
    #[arg(long = "input", required = true, num_args = 1.., value_name = "FILE|GLOB")]
    pub input: Vec<String>,
    /// How plain-text files are cut into documents: file (one per file) or blank-line.
    #[arg(long, default_value = "file", value_name = "file|blank-line")]
    pub doc_split: DocSplit,
    /// The JSON Lines field that holds the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Stop with an error at the first unreadable file, invalid UTF-8 or malformed JSON line.
    #[arg(long)]
    pub strict: bool,
}

impl InputArgs {
    fn resolve(&self) -> Result<(Vec<PathBuf>, InputOptions)> {
        let files = expand_inputs(&self.input)?;
        Ok((
            files,
            InputOptions { doc_split: self.doc_split, text_field: self.text_field.clone(), ..InputOptions::default() },
        ))
    }
}

#[derive(Args, Debug)]
pub struct TokenizerTrainArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Vocabulary size: 256 byte symbols + merges + special tokens.
    #[arg(long, default_value_t = 32000)]
    pub vocab_size: usize,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Special tokens, comma-separated; the first is the end-of-text token.
    #[arg(long, value_delimiter = ',', default_value = tokenizer::EOT_TOKEN)]
    pub special_tokens: Vec<String>,
    /// Minimum count of a pair for it to be merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Fraction of each document (its tail) held out to measure fertility.
    #[arg(long, default_value_t = 0.05)]
    pub heldout_fraction: f64,
    /// Hold out tails from an input file until they reach this many bytes.
    #[arg(long, default_value_t = 100_000)]
    pub heldout_chars: usize,
    /// Replace the file --out names if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct DataPrepareArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// The tokenizer.json to encode with (copied to OUT/tokenizer.json).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The output directory: train_*.bin, val_*.bin, tokenizer.json, manifest.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The end-of-text token written before every document.
    #[arg(long, default_value = tokenizer::EOT_TOKEN)]
    pub eot_token: String,
    /// Read prompt-completion pairs for fine-tuning: the JSON Lines field that holds each
    /// completion (the prompt is in --text-field, e.g. `--text-field prompt --completion-field
    /// completion`). Training then learns the completions and the end-of-text after each, not
    /// the prompts (a loss mask beside each shard). The filters are off for pairs; the repairs
    /// and deduplication stay.
    #[arg(long, value_name = "FIELD")]
    pub completion_field: Option<String>,
    /// Read conversations for fine-tuning: the JSON Lines field that holds each one's messages
    /// (a list of {"role", "content"}, as transformers' chat templates take them). Each is
    /// rendered by the chat template, and training learns the assistant's turns (with the
    /// template's end-of-turn), not the rest. Filters off, as for pairs.
    #[arg(long, value_name = "FIELD")]
    pub messages_field: Option<String>,
    /// The chat template for --messages-field: a tokenizer_config.json (its chat_template) or
    /// a file holding the Jinja template [default: the tokenizer_config.json beside
    /// --tokenizer].
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Fraction of documents that go to validation (by a seeded hash of each document).
    #[arg(long, default_value_t = 0.005)]
    pub val_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per shard (the last shard of each split holds the rest).
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: usize,
    /// Replace prepared data already in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Keep text as it is instead of normalising it to NFC (a tokenizer that normalises
    /// itself, as ondol's do, still encodes NFC text).
    #[arg(long)]
    pub no_nfc: bool,
    /// Keep control characters.
    #[arg(long)]
    pub no_strip_control: bool,
    /// Remove documents shorter than this many characters.
    #[arg(long, default_value_t = 50)]
    pub min_chars: usize,
    /// Remove documents with more of their characters in repeated lines (1: off).
    #[arg(long, default_value_t = 0.3)]
    pub max_repeated_line_fraction: f64,
    /// Remove documents with more of their characters in repeated word n-grams (1: off).
    #[arg(long, default_value_t = 0.3)]
    pub max_repeated_ngram_fraction: f64,
    /// Word n-gram length for --max-repeated-ngram-fraction.
    #[arg(long, default_value_t = 5)]
    pub ngram: usize,
    /// Remove documents with more non-letter characters (of the non-whitespace ones; 1: off).
    #[arg(long, default_value_t = 0.5)]
    pub max_non_letter_fraction: f64,
    /// Keep exact duplicates.
    #[arg(long)]
    pub no_exact_dedup: bool,
    /// Keep near-duplicates (skip MinHash).
    #[arg(long)]
    pub no_near_dedup: bool,
    /// Characters per MinHash shingle.
    #[arg(long, default_value_t = 5)]
    pub shingle: usize,
    /// MinHash permutations.
    #[arg(long, default_value_t = 128)]
    pub num_perm: usize,
    /// LSH bands (default: chosen to catch 95% of pairs at --near-threshold).
    #[arg(long)]
    pub bands: Option<usize>,
    /// Jaccard similarity from which documents are near-duplicates.
    #[arg(long, default_value_t = 0.8)]
    pub near_threshold: f64,
    /// Documents per processing batch (bounds memory).
    #[arg(long, default_value_t = 4096)]
    pub batch_docs: usize,
    /// Bytes of text per processing batch (bounds memory).
    #[arg(long, default_value_t = 64 << 20)]
    pub batch_bytes: usize,
}

impl DataPrepareArgs {
    fn config(&self) -> Result<PrepareConfig> {
        let (inputs, mut input) = self.input.resolve()?;
        input.completion_field = self.completion_field.clone();
        input.messages_field = self.messages_field.clone();
        Ok(PrepareConfig {
            inputs,
            input,
            tokenizer: self.tokenizer.clone(),
            chat_template: self.chat_template.clone(),
            eot_token: self.eot_token.clone(),
            out: self.out.clone(),
            clean: CleanConfig {
                nfc: !self.no_nfc,
                strip_control: !self.no_strip_control,
                min_chars: self.min_chars,
                max_repeated_line_fraction: self.max_repeated_line_fraction,
                max_repeated_ngram_fraction: self.max_repeated_ngram_fraction,
                ngram: self.ngram,
                max_non_letter_fraction: self.max_non_letter_fraction,
            },
            exact_dedup: !self.no_exact_dedup,
            near_dedup: (!self.no_near_dedup).then(|| NearDedupConfig {
                shingle: self.shingle,
                num_perm: self.num_perm,
                bands: self.bands,
                threshold: self.near_threshold,
                ..NearDedupConfig::default()
            }),
            val_fraction: self.val_fraction,
            seed: self.seed,
            shard_tokens: self.shard_tokens,
            batch_docs: self.batch_docs,
            batch_bytes: self.batch_bytes,
            strict: self.input.strict,
            overwrite: self.overwrite,
            progress: true,
        })
    }
}

fn command_line() -> Vec<String> {
    std::env::args().collect()
}

/// `ondol tokenizer ...`
pub fn tokenizer(cmd: TokenizerCommand) -> Result<()> {
    let TokenizerCommand::Train(args) = cmd;
    // A tokenizer.json beside shards is what their ids mean: never replaced unasked.
    let refusal = if args.out.is_dir() {
        Some("is a directory: --out names the tokenizer.json file to write")
    } else if args.out.exists() && !args.overwrite {
        Some(
            "exists; pass --overwrite to replace it (shards made with it would no longer match it), or choose another path",
        )
    } else {
        None
    };
    if let Some(why) = refusal {
        return Err(Error::config("--out", format!("{} {why}", args.out.display())));
    }
    let (inputs, options) = args.input.resolve()?;
    let cfg = TrainConfig {
        vocab_size: args.vocab_size,
        special_tokens: args.special_tokens.clone(),
        min_frequency: args.min_frequency,
        heldout_fraction: args.heldout_fraction,
        heldout_chars: args.heldout_chars,
        strict: args.input.strict,
        progress: true,
    };
    train_tokenizer(inputs, &options, &cfg, &args.out)
}

fn train_tokenizer(inputs: Vec<PathBuf>, options: &InputOptions, cfg: &TrainConfig, out: &Path) -> Result<()> {
    let start = std::time::Instant::now();
    let (tok, report) = tokenizer::train(inputs, options, cfg)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    }
    tok.save(out)?;
    ondol_core::say!(
        "trained a {}-token byte-level BPE on {} documents in {:.1} s; wrote {}",
        report.vocab_size,
        report.documents,
        start.elapsed().as_secs_f64(),
        out.display()
    );
    if report.vocab_size < cfg.vocab_size {
        ondol_core::say!(
            "note: {} tokens, fewer than the {} asked for: no other pair occurs at least {} times in this \
             corpus (--min-frequency)",
            report.vocab_size,
            cfg.vocab_size,
            cfg.min_frequency
        );
    }
    for p in report.problems.iter().take(10) {
        ondol_core::say!("  skipped: {p}");
    }
    if report.problems.len() > 10 {
        ondol_core::say!("  ... {} inputs or documents skipped in all", report.problems.len());
    }
    ondol_core::say!(
        "fertility on held-out text (about the last {:.0}% of each document, from a word's start):",
        cfg.heldout_fraction * 100.0
    );
    ondol_core::say!("  {:>10} {:>10} {:>8} {:>11} {:>11}  input", "chars", "tokens", "script", "tok/char", "tok/word");
    for f in &report.fertility {
        ondol_core::say!(
            "  {:>10} {:>10} {:>8} {:>11.3} {:>11.3}  {}",
            f.chars,
            f.tokens,
            f.script,
            f.tokens_per_char(),
            f.tokens_per_word(),
            f.path.display()
        );
    }
    Ok(())
}

/// `ondol data ...`
pub fn data(cmd: DataCommand) -> Result<()> {
    let DataCommand::Prepare(args) = cmd;
    let cfg = args.config()?;
    let _out = DirLock::take(&cfg.out, Purpose::Prepare)?;
    run_prepare(&cfg, None)
}

/// Prepares `cfg.out` for the `[data] prepare` table `table` (recorded in the directory beside
/// the data), or by hand (`None`: the data is no longer a table's).
fn run_prepare(cfg: &PrepareConfig, table: Option<&PrepareTable>) -> Result<()> {
    let record = cfg.out.join(PREPARED_WITH);
    if let Some(table) = table {
        // Before the manifest makes the data usable, so that no run (nor a crash in between)
        // finds the data without its record; without a manifest the record means nothing.
        let json = serde_json::to_string_pretty(table).expect("the table serializes");
        write_atomic(&record, json.as_bytes())?;
    }
    // Data prepared by hand is no table's: the record goes before the data is replaced, so
    // that a crash in between never leaves new data beside a table's record.
    if table.is_none() && record.exists() {
        std::fs::remove_file(&record).map_err(|e| Error::io(format!("cannot remove {}", record.display()), e))?;
    }
    let manifest = prepare(cfg, command_line(), env!("CARGO_PKG_VERSION"))?;
    ondol_core::say!("{}", manifest.summary());
    ondol_core::say!("wrote {} (report: manifest.json)", cfg.out.display());
    Ok(())
}

/// Before training: runs `[data] prepare` when its output has no manifest yet, then checks
/// `[data] tokenizer` (a tokenizer.json must exist and fit `model.vocab_size`) against the
/// shards: the one their manifest.json records, with its end-of-text.
pub fn prepare_for_run(cfg: &RunConfig, base: &Path) -> Result<()> {
    if let Some(p) = &cfg.data.prepare {
        prepare_table(p, base)?;
    }
    if cfg.data.format != DataFormat::Shards {
        return Ok(());
    }
    let tokenizer = cfg.data.tokenizer.as_deref().filter(|t| *t != "bytes").map(|t| base.join(t));
    if let Some(tokenizer) = &tokenizer {
        check_vocab_fits(cfg, tokenizer)?;
    }
    check_shards_tokenizer(cfg, base, tokenizer.as_deref())
}

/// Refuses a tokenizer.json with more tokens than the model has embeddings.
fn check_vocab_fits(cfg: &RunConfig, tokenizer: &Path) -> Result<()> {
    let vocab = tokenizer::vocab_size_of_file(tokenizer).map_err(|e| {
        Error::config("data.tokenizer", format!("{e}; it must name a tokenizer.json (or be \"bytes\")"))
    })?;
    if vocab > cfg.model.vocab_size {
        return Err(Error::config(
            "model.vocab_size",
            format!(
                "{} is smaller than the vocabulary of data.tokenizer = \"{}\" ({} tokens); set model.vocab_size >= {}",
                cfg.model.vocab_size,
                tokenizer.display(),
                vocab,
                vocab
            ),
        ));
    }
    Ok(())
}

/// Refuses shards that `ondol data prepare` made with another tokenizer or end-of-text token
/// than the run's: their directory's manifest.json records both. (Token ids read with another
/// tokenizer are other text; training would go on without a word.)
fn check_shards_tokenizer(cfg: &RunConfig, base: &Path, tokenizer: Option<&Path>) -> Result<()> {
    let files = expand_globs(&cfg.data.patterns(), base)?;
    for (dir, made) in ShardTokenizer::of_files(&files)? {
        let manifest = dir.join("manifest.json");
        let Some(tokenizer) = tokenizer else {
            return Err(Error::config(
                "data.tokenizer",
                format!(
                    "the shards in {} were made with a tokenizer ({} records it): set data.tokenizer = {}, which \
                     checkpoints then carry for eval and generate",
                    dir.display(),
                    manifest.display(),
                    toml::Value::String(dir.join("tokenizer.json").display().to_string())
                ),
            ));
        };
        if !made.is(tokenizer)? {
            return Err(Error::config(
                "data.tokenizer",
                format!(
                    "{} is not the tokenizer the shards in {} were made with ({} records another SHA-256, {}): \
                     their token ids would be read as other text; set data.tokenizer = {} (data prepare's copy of \
                     it), or, to keep this tokenizer (a model's own, say), prepare the shards again with it: \
                     `ondol data prepare --tokenizer {}`",
                    tokenizer.display(),
                    dir.display(),
                    manifest.display(),
                    made.sha256.get(..12).unwrap_or(&made.sha256),
                    toml::Value::String(dir.join("tokenizer.json").display().to_string()),
                    tokenizer.display()
                ),
            ));
        }
        if made.eot_token != cfg.data.eot_token() {
            return Err(Error::config(
                "data.eot_token",
                format!(
                    "the shards in {} end their documents with {:?} ({}), not {:?}: set data.eot_token = {:?}",
                    dir.display(),
                    made.eot_token,
                    manifest.display(),
                    cfg.data.eot_token(),
                    made.eot_token
                ),
            ));
        }
        // Shards prepared before documents started with the tokenizer's BOS lack it.
        let start = TextTokenizer::from_file(tokenizer, cfg.data.eot_token())?.document_start().to_vec();
        if made.document_start.as_deref().unwrap_or_default() != start.as_slice() {
            return Err(Error::config(
                "data.train",
                format!(
                    "the shards in {} start their documents with {:?} ({}), but the tokenizer starts every text with \
                     {start:?} (its BOS, which the model expects): prepare them again with this ondol",
                    dir.display(),
                    made.document_start.as_deref().unwrap_or_default(),
                    manifest.display(),
                ),
            ));
        }
    }
    Ok(())
}

/// Where a `[data] prepare` table's output records the table that made it.
const PREPARED_WITH: &str = "prepared-with.json";

fn prepare_table(p: &PrepareTable, base: &Path) -> Result<()> {
    let out = base.join(&p.out);
    // Prepared data is read without the lock (it may be another user's, or read-only); runs
    // started together on one table take it to prepare: the first does, the others then
    // wait and use its data.
    let _out = match out.join("manifest.json").is_file() {
        true => None,
        false => Some(DirLock::wait(&out, Purpose::Prepare)?),
    };
    let record = out.join(PREPARED_WITH);
    if out.join("manifest.json").is_file() {
        // (Data prepared by hand, or by an older ondol, has no record to compare.)
        if let Ok(text) = std::fs::read_to_string(&record) {
            let theirs: PrepareTable = serde_json::from_str(&text).map_err(|e| {
                Error::Input(format!("{}: {e}; delete {} to prepare again", record.display(), out.display()))
            })?;
            if let Some(d) = first_difference("data.prepare", &what_prepares(&theirs), &what_prepares(p)) {
                return Err(Error::config(
                    d.key,
                    format!(
                        "{} was prepared with {}, not {}: delete it to prepare again with this value, or set \
                         data.prepare.out to another directory",
                        out.display(),
                        d.theirs,
                        d.ours
                    ),
                ));
            }
        }
        ondol_core::say!("data.prepare: using the prepared data in {} (delete it to prepare again)", out.display());
        return Ok(());
    }
    ondol_core::say!(
        "data.prepare: no {} yet; training a tokenizer and preparing shards",
        out.join("manifest.json").display()
    );
    let patterns: Vec<String> = p.input.iter().map(|i| base.join(i).to_string_lossy().into_owned()).collect();
    let inputs = expand_inputs(&patterns).map_err(|e| Error::config("data.prepare.input", e.to_string()))?;
    let options = InputOptions { doc_split: p.doc_split, ..InputOptions::default() };
    let tokenizer = out.join("tokenizer.json");
    let cfg = TrainConfig { vocab_size: p.vocab_size, ..TrainConfig::default() };
    std::fs::create_dir_all(&out).map_err(|e| Error::io(format!("cannot create {}", out.display()), e))?;
    train_tokenizer(inputs.clone(), &options, &cfg, &tokenizer)?;
    let mut prep = PrepareConfig::new(inputs, tokenizer, out);
    (prep.input, prep.val_fraction, prep.seed, prep.overwrite) = (options, p.val_fraction, p.seed, true);
    run_prepare(&prep, Some(p))
}

/// What a prepare table's output depends on: not where it goes (a moved directory is the same
/// data), and input patterns as paths (`./corpus/*.txt` is `corpus/*.txt`).
fn what_prepares(p: &PrepareTable) -> serde_json::Value {
    let p = PrepareTable { out: String::new(), input: p.input.iter().map(|i| plain_path(i)).collect(), ..p.clone() };
    serde_json::to_value(p).expect("the table serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        data: DataCommand,
    }

    #[test]
    fn flag_defaults_are_the_library_defaults() {
        // (A named input must exist.)
        let input = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let cli = Cli::parse_from(["x", "prepare", "--input", input, "--tokenizer", "t.json", "--out", "o"]);
        let DataCommand::Prepare(args) = cli.data;
        let mut ours = args.config().unwrap();
        let lib = PrepareConfig::new(vec![input.into()], "t.json".into(), "o".into());
        ours.progress = lib.progress;
        assert_eq!(format!("{ours:?}"), format!("{lib:?}"));
        let t = TrainConfig::default();
        assert_eq!((t.vocab_size, t.min_frequency, t.heldout_fraction, t.heldout_chars), (32000, 2, 0.05, 100_000));
    }
}
