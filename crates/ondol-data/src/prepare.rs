//! `ondol data prepare`: raw corpora in, token shards and a manifest out.
//!
//! ```text
//! read (sequential: decompress, split documents)           -> batch of <= batch_docs documents
//!   -> parse + clean + hash + MinHash      (rayon, per document)
//!   -> exact and near dedup decisions      (sequential, in input order: the first copy wins)
//!   -> train/validation split by document  (a seeded hash of the text: stable under reordering)
//!   -> tokenize the kept documents         (rayon)
//!   -> append "<|endoftext|> document" to the train or val buffer; every shard_tokens tokens,
//!      write a shard (atomically) and drop them
//! ```
//!
//! Memory bound: at most `batch_docs` documents and `batch_bytes` bytes of text are in flight
//! (a single document larger than `batch_bytes` forms a batch on its own, and `file`-mode text
//! inputs are read whole), plus two shard buffers of at most `shard_tokens + one document`
//! tokens, plus the dedup indexes (see [`crate::dedup`] for their bytes per document): the only
//! state that grows with the corpus. The manifest records the peaks actually reached.
//!
//! Output: `train_000000.bin ...`, `val_000000.bin ...` (llm.c format, v1 when the vocabulary
//! fits u16 else v2), `tokenizer.json` (a byte-for-byte copy), and `manifest.json`, written last:
//! a directory with a manifest is complete. Everything is written into `.partial/`, the
//! manifest last; a run that fails (or is killed) before that leaves nothing beside the
//! output it would replace. Then the previous output goes, `.partial/` becomes `.complete/`,
//! and its files move into place, the manifest last. A run killed in between left a complete
//! output half moved: the next `data prepare` into the directory finishes the move first
//! ([`finish_interrupted`]), and until then training refuses the directory
//! ([`ShardTokenizer::of_dir`]).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::chat::{ChatTemplate, Rendered, TEMPLATE_FILE};
use crate::clean::{CleanConfig, Rule};
use crate::dedup::{ExactIndex, MinHasher, NearDedupConfig, NearIndex, NearKey};
use crate::input::{DocReader, InputFormat, InputOptions, InputStats, Item, Problem, hex};
use crate::mask::{LossMask, write_mask};
use crate::tokenizer::{EOT_TOKEN, TextTokenizer, tokenizer_files};
use crate::{DataError, Shard, ShardVersion, write_shard};

/// Everything `data prepare` needs; each field has a flag of the same name.
#[derive(Clone, Debug, Serialize)]
pub struct PrepareConfig {
    pub inputs: Vec<PathBuf>,
    pub input: InputOptions,
    pub tokenizer: PathBuf,
    /// Conversations (`input.messages_field`): the chat template's file; None: the
    /// tokenizer_config.json beside the tokenizer.
    pub chat_template: Option<PathBuf>,
    pub eot_token: String,
    pub out: PathBuf,
    pub clean: CleanConfig,
    pub exact_dedup: bool,
    /// None: no near-duplicate removal (`--no-near-dedup`).
    pub near_dedup: Option<NearDedupConfig>,
    pub val_fraction: f64,
    pub seed: u64,
    pub shard_tokens: usize,
    pub batch_docs: usize,
    pub batch_bytes: usize,
    pub strict: bool,
    pub overwrite: bool,
    #[serde(skip)]
    pub progress: bool,
}

impl PrepareConfig {
    pub fn new(inputs: Vec<PathBuf>, tokenizer: PathBuf, out: PathBuf) -> Self {
        Self {
            inputs,
            input: InputOptions::default(),
            tokenizer,
            chat_template: None,
            eot_token: EOT_TOKEN.into(),
            out,
            clean: CleanConfig::default(),
            exact_dedup: true,
            near_dedup: Some(NearDedupConfig::default()),
            val_fraction: 0.005,
            seed: 0,
            shard_tokens: 100_000_000,
            batch_docs: 4096,
            batch_bytes: 64 << 20,
            strict: false,
            overwrite: false,
            progress: true,
        }
    }
}

/// Documents in and out; `read = kept + sum(removed)`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DocCounts {
    pub read: u64,
    pub kept: u64,
    pub train: u64,
    pub val: u64,
    /// Removed documents per rule: invalid_utf8, malformed_json, chat_template (conversations),
    /// the cleaning rules, exact_duplicate, near_duplicate.
    pub removed: BTreeMap<&'static str, u64>,
    /// Kept documents that a repair changed (nfc, control_chars), and conversations written
    /// one document per assistant turn (split_into_turns).
    pub modified: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShardInfo {
    pub file: String,
    pub split: &'static str,
    pub tokens: u64,
    /// Fine-tuning data only: the loss mask beside the shard, and the tokens it learns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned_tokens: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryReport {
    pub batch_docs: usize,
    pub batch_bytes: usize,
    pub peak_batch_docs: usize,
    pub peak_batch_bytes: usize,
    pub peak_buffered_tokens: usize,
    pub exact_index_entries: usize,
    pub near_index_entries: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenizerInfo {
    pub source: PathBuf,
    pub file: &'static str,
    pub sha256: String,
    pub vocab_size: usize,
    pub eot_token: String,
    pub eot_id: u32,
    /// The tokens each document starts with (the tokenizer's BOS, where its post-processor
    /// puts one first; see `TextTokenizer::encode_document`).
    pub document_start: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TemplateInfo {
    pub source: PathBuf,
    pub sha256: String,
}

/// `manifest.json`: what went in, what came out, what was removed and why.
#[derive(Clone, Debug, Serialize)]
pub struct Manifest {
    pub ondol_version: String,
    pub command: Vec<String>,
    pub inputs: Vec<InputStats>,
    pub tokenizer: TokenizerInfo,
    /// Conversations: the chat template they were rendered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<TemplateInfo>,
    pub settings: PrepareConfig,
    /// Near-dedup bands x rows actually used.
    pub near_dedup_bands: Option<(usize, usize)>,
    pub documents: DocCounts,
    /// Whole files that could not be used (unreadable, empty), counted by kind.
    pub file_problems: BTreeMap<&'static str, u64>,
    /// Every problem with file and line (the first 1000).
    pub problems: Vec<Problem>,
    pub problems_total: u64,
    pub bytes_in: u64,
    pub bytes_kept: u64,
    pub shard_version: u8,
    pub tokens: BTreeMap<&'static str, u64>,
    pub shards: Vec<ShardInfo>,
    pub memory: MemoryReport,
    pub seconds: f64,
}

impl Manifest {
    /// A short human report: documents kept and removed per rule, problems, tokens, shards.
    pub fn summary(&self) -> String {
        let d = &self.documents;
        let mut s = format!(
            "read {} documents ({:.1} MB) from {} input(s) in {:.1} s: kept {} ({} train, {} val, {:.1} MB)\n",
            d.read,
            self.bytes_in as f64 / 1e6,
            self.inputs.len(),
            self.seconds,
            d.kept,
            d.train,
            d.val,
            self.bytes_kept as f64 / 1e6
        );
        for (rule, n) in d.removed.iter().filter(|(_, n)| **n > 0) {
            s += &format!("  removed {n:>9}  {rule}\n");
        }
        for (what, n) in d.modified.iter().filter(|(_, n)| **n > 0) {
            s += &match *what {
                SPLIT_INTO_TURNS => format!(
                    "  split {n:>11}  conversations into a document per assistant turn (the template rewrites \
                     earlier turns)\n"
                ),
                _ => format!("  repaired {n:>8}  {what}\n"),
            };
        }
        for (kind, n) in &self.file_problems {
            s += &format!("  skipped {n:>9}  files: {kind}\n");
        }
        for p in self.problems.iter().take(10) {
            s += &format!("  problem: {p}\n");
        }
        if self.problems_total > 10 {
            s += &format!("  ... {} problems in all, listed in manifest.json\n", self.problems_total);
        }
        if d.kept > 0 && d.train == 0 {
            s += &format!(
                "  warning: no document went to training (all {} went to validation); lower --val-fraction or use \
                 more documents\n",
                d.kept
            );
        }
        if self.settings.val_fraction > 0.0 && d.val == 0 {
            s += "  warning: no document went to validation; raise --val-fraction or use more documents\n";
        }
        let shards = |split| self.shards.iter().filter(|s| s.split == split).count();
        s += &format!(
            "tokens: {} train in {} shard(s), {} val in {} shard(s) (v{} shards, vocabulary {})",
            self.tokens["train"],
            shards("train"),
            self.tokens["val"],
            shards("val"),
            self.shard_version,
            self.tokenizer.vocab_size
        );
        if self.shards.iter().any(|s| s.mask.is_some()) {
            let learned =
                |split| self.shards.iter().filter(|s| s.split == split).filter_map(|s| s.learned_tokens).sum::<u64>();
            s += &format!(
                "\nlearned: {} train and {} val tokens, the completions or the assistant's turns (loss masks beside \
                 the shards; the rest is context only)",
                learned("train"),
                learned("val")
            );
        }
        s
    }
}

const MAX_LISTED_PROBLEMS: usize = 1000;

/// The count of conversations written one document per assistant turn.
const SPLIT_INTO_TURNS: &str = "split_into_turns";

/// What a directory's `manifest.json` says its shards were tokenized with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardTokenizer {
    /// SHA-256 of the tokenizer.json, hex.
    pub sha256: String,
    pub eot_token: String,
    /// The tokens each document starts with; none recorded by versions before ondol started
    /// documents with the tokenizer's BOS.
    pub document_start: Option<Vec<u32>>,
}

impl ShardTokenizer {
    /// The tokenizer recorded in `dir/manifest.json`; None where the directory has no manifest
    /// of ours (shards made elsewhere, llm.c's say). Refuses a directory whose output a killed
    /// `data prepare` left half moved into place.
    pub fn of_dir(dir: &Path) -> Result<Option<Self>, DataError> {
        Ok(ours(dir)?.map(|(made, _)| made))
    }

    /// The tokenizer of every directory holding some of `files` that has a manifest of ours,
    /// with the directory (each once, refusing one half moved into place as [`Self::of_dir`]).
    /// Refuses a file there that the manifest does not list, or lists with another token
    /// count: a stray shard would be trained on unnoticed.
    pub fn of_files(files: &[PathBuf]) -> Result<Vec<(PathBuf, Self)>, DataError> {
        let dirs: std::collections::BTreeSet<&Path> = files.iter().filter_map(|f| f.parent()).collect();
        let mut found = Vec::new();
        for dir in dirs {
            if let Some((made, manifest)) = ours(dir)? {
                check_listed(dir, &manifest, files.iter().filter(|f| f.parent() == Some(dir)))?;
                found.push((dir.to_path_buf(), made));
            }
        }
        Ok(found)
    }

    /// Whether `tokenizer` (a tokenizer.json) is this one, by content.
    pub fn is(&self, tokenizer: &Path) -> Result<bool, DataError> {
        let bytes = std::fs::read(tokenizer).map_err(|e| DataError::io("read", tokenizer, e))?;
        Ok(hex(&Sha256::digest(&bytes)) == self.sha256)
    }
}

/// `dir/manifest.json` where it is ours (see [`ShardTokenizer::of_dir`]), with the tokenizer
/// it records.
fn ours(dir: &Path) -> Result<Option<(ShardTokenizer, serde_json::Value)>, DataError> {
    if interrupted(dir) {
        return Err(DataError::Invalid(format!(
            "{}: a `data prepare` into it finished but was stopped while moving its output into place; run \
                 `ondol data prepare` with --out {} again (it finishes the move first, and then stops unless \
                 --overwrite)",
            dir.display(),
            dir.display()
        )));
    }
    let path = dir.join("manifest.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io("read", &path, e)),
    };
    let bad = |what: &str| DataError::format(&path, format!("not a manifest of `ondol data prepare`: {what}"));
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    if !json["tokenizer"].is_object() {
        return Ok(None); // another tool's
    }
    let field = |key: &str| {
        let missing = || bad(&format!("no tokenizer.{key} (move it away if another tool wrote it)"));
        json["tokenizer"][key].as_str().map(str::to_owned).ok_or_else(missing)
    };
    let document_start = match &json["tokenizer"]["document_start"] {
        serde_json::Value::Null => None,
        ids => Some(
            ids.as_array()
                .and_then(|a| a.iter().map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok())).collect())
                .ok_or_else(|| bad("tokenizer.document_start is not a list of token ids"))?,
        ),
    };
    let made = ShardTokenizer { sha256: field("sha256")?, eot_token: field("eot_token")?, document_start };
    Ok(Some((made, json)))
}

/// Refuses any of `files` (in `dir`, whose `manifest` is ours) that the manifest does not
/// list, or lists with another token count than its header holds, or with a loss mask that
/// is missing, or without the one beside it.
fn check_listed<'a>(
    dir: &Path,
    manifest: &serde_json::Value,
    files: impl Iterator<Item = &'a PathBuf>,
) -> Result<(), DataError> {
    let path = dir.join("manifest.json");
    let listed: BTreeMap<&str, (u64, Option<&str>)> = manifest["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["file"].as_str()?, (s["tokens"].as_u64()?, s["mask"].as_str()))))
        .collect();
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let holds = Shard::open(file)?.len() as u64;
        let mask = LossMask::path_for(file);
        let mask_name = mask.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let problem = match listed.get(name.as_ref()) {
            None => "is not among the shards it lists (left by another `data prepare`, or copied in?)".to_string(),
            Some(&(tokens, _)) if tokens != holds => format!("lists it with {tokens} tokens, but it holds {holds}"),
            Some((_, Some(_))) if !mask.exists() => format!(
                "lists it with the loss mask {mask_name}, which is missing (without it, training would learn the \
                 prompts too)"
            ),
            Some((_, None)) if mask.exists() => {
                format!(
                    "lists it without a loss mask, but {mask_name} lies beside it (left by another `data prepare`?)"
                )
            }
            Some(_) => continue,
        };
        return Err(DataError::format(
            file,
            format!(
                "{} {problem}: move the file out of {}, or prepare the directory again",
                path.display(),
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a sibling temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::io("write", path, e)
    })
}

/// Accumulates one split's tokens and writes a shard every `shard_tokens`.
struct ShardWriter {
    dir: PathBuf,
    split: &'static str,
    version: ShardVersion,
    shard_tokens: usize,
    buf: Vec<u32>,
    /// Fine-tuning data: whether each token of `buf` is learned as a target.
    learned: Option<Vec<bool>>,
    /// Whether the end-of-text before a document is learned: after a pair's completion, yes
    /// (the model learns to stop); after a conversation, no (the template closes each turn with
    /// its own end-of-turn, which is learned).
    separator_learned: bool,
    shards: Vec<ShardInfo>,
    peak: usize,
}

impl ShardWriter {
    /// Appends the end-of-text and `doc`, whose tokens are learned where `learned` says
    /// (fine-tuning data: pairs or conversations).
    fn push(&mut self, eot: u32, doc: &[u32], learned: Option<&[bool]>) -> Result<(), DataError> {
        self.buf.push(eot);
        self.buf.extend_from_slice(doc);
        if let Some(mask) = &mut self.learned {
            mask.push(self.separator_learned);
            mask.extend_from_slice(learned.expect("fine-tuning data has learned tokens"));
        }
        self.peak = self.peak.max(self.buf.len());
        while self.buf.len() >= self.shard_tokens {
            self.flush(self.shard_tokens)?;
        }
        Ok(())
    }

    fn flush(&mut self, n: usize) -> Result<(), DataError> {
        let file = format!("{}_{:06}.bin", self.split, self.shards.len());
        write_shard(self.dir.join(&file), &self.buf[..n], Some(self.version))?;
        let (mut mask, mut learned_tokens) = (None, None);
        if let Some(learned) = &mut self.learned {
            let path = LossMask::path_for(&self.dir.join(&file));
            write_mask(&path, &learned[..n])?;
            mask = Some(path.file_name().expect("a file").to_string_lossy().into_owned());
            learned_tokens = Some(learned.drain(..n).filter(|&l| l).count() as u64);
        }
        self.shards.push(ShardInfo { file, split: self.split, tokens: n as u64, mask, learned_tokens });
        self.buf.drain(..n);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), DataError> {
        if !self.buf.is_empty() {
            self.flush(self.buf.len())?;
        }
        Ok(())
    }
}

/// A kept document, as it goes to the tokenizer.
enum Document {
    Text(String),
    /// Fine-tuning on completions: the prompt is context, the completion is learned.
    Pair {
        prompt: String,
        completion: String,
    },
    /// A conversation rendered by the chat template, its assistant turns learned: one
    /// document, or one per turn (see [`ChatTemplate::render`]).
    Chat(Vec<Rendered>),
}

impl Document {
    /// The tokens of each document it makes (one, but for a conversation written turn by
    /// turn), and which of them are learned as targets (fine-tuning data only); see
    /// [`ShardWriter::push`].
    fn tokenize(&self, tokenizer: &TextTokenizer) -> Result<Vec<Tokenized>, DataError> {
        Ok(match self {
            Document::Text(text) => vec![(tokenizer.encode_document(text)?, None)],
            // Whole, as the model reads it (and as TRL tokenizes a pair: a tokenizer that puts a
            // space before every text, as Llama 2's does, would put one before the completion
            // too if it were encoded apart), after the document start: a token is learned where
            // it starts in the completion.
            Document::Pair { prompt, completion } => {
                let start = tokenizer.document_start();
                let tokens = tokenizer.encode_with_starts(&format!("{prompt}{completion}"))?;
                let ids = start.iter().copied().chain(tokens.iter().map(|t| t.0)).collect();
                let in_completion = tokens.iter().map(|t| t.1 >= prompt.len());
                vec![(ids, Some(std::iter::repeat_n(false, start.len()).chain(in_completion).collect()))]
            }
            // Whole, as the model reads it: a token is learned where it starts in a turn. (The
            // template writes any BOS itself, as transformers tokenizes its output.)
            Document::Chat(documents) => documents
                .iter()
                .map(|Rendered { text, learned }| {
                    let tokens = tokenizer.encode_markup_with_starts(text)?;
                    let is_learned = |start: &usize| learned.iter().any(|span| span.contains(start));
                    Ok((tokens.iter().map(|t| t.0).collect(), Some(tokens.iter().map(|t| is_learned(&t.1)).collect())))
                })
                .collect::<Result<_, DataError>>()?,
        })
    }
}

/// A document's tokens, and which are learned (fine-tuning data).
type Tokenized = (Vec<u32>, Option<Vec<bool>>);

/// What the parallel stage found for one document.
enum Checked {
    Problem(Problem),
    Removed(Rule),
    Clean { doc: Document, exact: u128, near: Option<NearKey>, nfc: bool, control: bool, bytes: usize },
}

impl Checked {
    /// A document's verdict: repaired and filtered by `clean`, with its dedup keys.
    fn document(text: String, clean: &CleanConfig, hasher: Option<&MinHasher>) -> Self {
        match clean.clean(text) {
            Err(rule) => Checked::Removed(rule),
            Ok(c) => Checked::Clean {
                exact: ExactIndex::key(&c.text),
                near: hasher.map(|h| h.near_key(&c.text)),
                bytes: c.text.len(),
                doc: Document::Text(c.text),
                nfc: c.nfc_changed,
                control: c.control_removed,
            },
        }
    }

    /// A prompt-completion pair's verdict: both repaired, neither filtered (the filters are
    /// for web text; they would remove short answers, code and tables), deduplicated as one
    /// text.
    fn pair(prompt: String, completion: String, clean: &CleanConfig, hasher: Option<&MinHasher>) -> Self {
        let mut repairs = Repairs::new(clean);
        let (prompt, completion) = (repairs.apply(prompt), repairs.apply(completion));
        // The prompt's length keeps ("ab", "c") and ("a", "bc") apart.
        let whole = format!("{}:{prompt}{completion}", prompt.len());
        let bytes = prompt.len() + completion.len();
        repairs.verdict(&whole, bytes, hasher, Document::Pair { prompt, completion })
    }

    /// A conversation's verdict: every string in its messages repaired, none filtered (as
    /// pairs), rendered by `template`, deduplicated as the rendered text.
    fn conversation(
        mut messages: Vec<serde_json::Value>,
        clean: &CleanConfig,
        hasher: Option<&MinHasher>,
        template: &ChatTemplate,
        (path, line): (&Path, u64),
    ) -> Self {
        let mut repairs = Repairs::new(clean);
        messages.iter_mut().for_each(|m| repairs.apply_within(m));
        match template.render(&messages) {
            Ok(documents) => {
                let text = documents.last().expect("at least one").text.clone();
                repairs.verdict(&text, text.len(), hasher, Document::Chat(documents))
            }
            Err(message) => {
                Checked::Problem(Problem { path: path.to_path_buf(), line, kind: "chat_template", message })
            }
        }
    }
}

/// The repairs of a [`CleanConfig`] (no filter) over the texts of one document, remembering
/// which changed something.
struct Repairs {
    config: CleanConfig,
    nfc: bool,
    control: bool,
}

impl Repairs {
    fn new(clean: &CleanConfig) -> Self {
        Self { config: clean.repairs_only(), nfc: false, control: false }
    }

    fn apply(&mut self, text: String) -> String {
        let Ok(c) = self.config.clean(text) else { unreachable!("repairs remove no text") };
        self.nfc |= c.nfc_changed;
        self.control |= c.control_removed;
        c.text
    }

    /// Repairs every string within `value`.
    fn apply_within(&mut self, value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(s) => *s = self.apply(std::mem::take(s)),
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.apply_within(v)),
            serde_json::Value::Object(fields) => fields.values_mut().for_each(|v| self.apply_within(v)),
            _ => {}
        }
    }

    /// The document (of `bytes` bytes of text) kept, deduplicated by `key`.
    fn verdict(self, key: &str, bytes: usize, hasher: Option<&MinHasher>, doc: Document) -> Checked {
        Checked::Clean {
            exact: ExactIndex::key(key),
            near: hasher.map(|h| h.near_key(key)),
            bytes,
            doc,
            nfc: self.nfc,
            control: self.control,
        }
    }
}

/// Runs the pipeline of the module docs. On error, the shards this run wrote are removed
/// (and the --out it made), and the previous output that --overwrite replaces is kept.
pub fn prepare(cfg: &PrepareConfig, command: Vec<String>, version: &str) -> Result<Manifest, DataError> {
    let invalid = |m: String| Err(DataError::Invalid(m));
    if !(0.0..1.0).contains(&cfg.val_fraction) {
        return invalid(format!("--val-fraction {} is out of range: it must be in [0, 1)", cfg.val_fraction));
    }
    if cfg.shard_tokens == 0 || cfg.shard_tokens > i32::MAX as usize {
        return invalid(format!("--shard-tokens {} must be between 1 and {}", cfg.shard_tokens, i32::MAX));
    }
    if cfg.batch_docs == 0 || cfg.batch_bytes == 0 {
        return invalid("--batch-docs and --batch-bytes must be at least 1".into());
    }
    cfg.clean.validate().map_err(DataError::Invalid)?;
    let fine_tuning = match (&cfg.input.completion_field, &cfg.input.messages_field) {
        (Some(_), Some(_)) => {
            return invalid(
                "--completion-field and --messages-field: a run reads pairs or conversations, not both".into(),
            );
        }
        (Some(field), None) => Some(format!("--completion-field {field} reads prompt-completion pairs")),
        (None, Some(field)) => Some(format!("--messages-field {field} reads conversations")),
        (None, None) => None,
    };
    if let Some(what) = fine_tuning
        && let Some(text) = cfg.inputs.iter().find(|f| InputFormat::of(f) != InputFormat::JsonLines)
    {
        return invalid(format!(
            "{what} from JSON Lines, but {} is plain text (JSON Lines files end in .jsonl, .ndjson or .json, \
             optionally .gz or .zst)",
            text.display()
        ));
    }
    let template = match cfg.input.messages_field {
        Some(_) => {
            let tokenizer_dir = cfg.tokenizer.parent().unwrap_or(Path::new("."));
            let path = cfg.chat_template.clone().unwrap_or_else(|| ChatTemplate::file_in(tokenizer_dir));
            let hint = "give it with --chat-template: a .jinja file or a tokenizer_config.json";
            let template = ChatTemplate::load(&path, tokenizer_dir)
                .map_err(|e| DataError::Invalid(format!("the chat template: {e} ({hint})")))?;
            let info = TemplateInfo { sha256: hex(&Sha256::digest(template.source())), source: path };
            Some((template, info))
        }
        None => None,
    };
    let hasher = cfg.near_dedup.as_ref().map(MinHasher::new).transpose().map_err(DataError::Invalid)?;
    let mut tokenizer = TextTokenizer::from_file(&cfg.tokenizer, &cfg.eot_token)?;
    if cfg.clean.nfc {
        tokenizer.skip_nfc_normalizer(); // the cleaned text is NFC already
    } else if tokenizer.normalizes_to_nfc() {
        ondol_core::say!(
            "note: --no-nfc keeps the text as it is, but {} normalises to NFC itself: the tokens are of NFC text",
            cfg.tokenizer.display()
        );
    }
    let tokenizer_bytes = std::fs::read(&cfg.tokenizer).map_err(|e| DataError::io("read", &cfg.tokenizer, e))?;
    let shard_version = if tokenizer.vocab_size() <= 1 << 16 { ShardVersion::V1 } else { ShardVersion::V2 };

    let created = !cfg.out.exists();
    std::fs::create_dir_all(&cfg.out).map_err(|e| DataError::io("create directory", &cfg.out, e))?;
    if finish_interrupted(&cfg.out)? {
        ondol_core::say!("finished moving the output of an interrupted `data prepare` into {}", cfg.out.display());
    }
    // Shards are written into a hidden staging directory and moved beside the manifest only
    // when the run succeeds: a killed run leaves nothing that a glob like train_*.bin finds.
    let staging = cfg.out.join(STAGING);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io("remove", &staging, e))?;
    }
    let existing = previous_output(&cfg.out)?;
    if !existing.is_empty() && !cfg.overwrite {
        return invalid(format!(
            "--out {} already holds prepared data ({}{}); pass --overwrite to replace it, or choose another directory",
            cfg.out.display(),
            existing[..existing.len().min(3)].join(", "),
            if existing.len() > 3 { ", ..." } else { "" }
        ));
    }
    std::fs::create_dir(&staging).map_err(|e| DataError::io("create directory", &staging, e))?;
    let writer = |split| ShardWriter {
        dir: staging.clone(),
        split,
        version: shard_version,
        shard_tokens: cfg.shard_tokens,
        buf: Vec::new(),
        learned: (cfg.input.completion_field.is_some() || cfg.input.messages_field.is_some()).then(Vec::new),
        separator_learned: cfg.input.completion_field.is_some(),
        shards: Vec::new(),
        peak: 0,
    };
    let mut writers = [writer("train"), writer("val")];
    let result = run(cfg, &tokenizer, hasher.as_ref(), template.as_ref().map(|(t, _)| t), &mut writers);
    let (counts, problems, problems_total, file_problems, inputs, bytes, memory, seconds) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            if created {
                let _ = std::fs::remove_dir(&cfg.out); // only if empty
            }
            return Err(e);
        }
    };
    let same_file =
        std::fs::canonicalize(&cfg.tokenizer).ok() == std::fs::canonicalize(cfg.out.join("tokenizer.json")).ok();
    if !same_file {
        write_atomic(&staging.join("tokenizer.json"), &tokenizer_bytes)?;
        // Its special tokens and chat template, for the checkpoints of runs on these shards.
        for (name, source) in tokenizer_files(&cfg.tokenizer).into_iter().skip(1) {
            let bytes = std::fs::read(&source).map_err(|e| DataError::io("read", &source, e))?;
            write_atomic(&staging.join(name), &bytes)?;
        }
    }
    // The template the conversations were rendered with, where transformers (and `generate
    // --chat`) look first.
    if let Some((template, _)) = &template {
        write_atomic(&staging.join(TEMPLATE_FILE), template.source().as_bytes())?;
    }
    let [train, val] = writers;
    let tokens = BTreeMap::from([
        ("train", train.shards.iter().map(|s| s.tokens).sum()),
        ("val", val.shards.iter().map(|s| s.tokens).sum()),
    ]);
    let manifest = Manifest {
        ondol_version: version.into(),
        command,
        inputs,
        tokenizer: TokenizerInfo {
            source: cfg.tokenizer.clone(),
            file: "tokenizer.json",
            sha256: hex(&Sha256::digest(&tokenizer_bytes)),
            vocab_size: tokenizer.vocab_size(),
            eot_token: cfg.eot_token.clone(),
            eot_id: tokenizer.eot_id(),
            document_start: tokenizer.document_start().to_vec(),
        },
        chat_template: template.map(|(_, info)| info),
        settings: cfg.clone(),
        near_dedup_bands: hasher.map(|h| (h.bands(), h.rows())),
        documents: counts,
        file_problems,
        problems,
        problems_total,
        bytes_in: bytes.0,
        bytes_kept: bytes.1,
        shard_version: if shard_version == ShardVersion::V1 { 1 } else { 2 },
        tokens,
        shards: train.shards.into_iter().chain(val.shards).collect(),
        memory: MemoryReport { peak_buffered_tokens: train.peak.max(val.peak), ..memory },
        seconds,
    };
    let json = serde_json::to_string_pretty(&manifest).expect("the manifest serializes");
    write_atomic(&staging.join("manifest.json"), json.as_bytes())?;
    sync_dir(&staging)?;
    // (The previous output, --overwrite's, goes only now that this run has succeeded.)
    commit(&cfg.out)?;
    Ok(manifest)
}

/// The directory under `--out` that a run writes its output into until it succeeds; complete
/// once it holds a manifest.
const STAGING: &str = ".partial";
/// What the staging directory becomes once the previous output is gone: its files are moved
/// into place.
const COMPLETE: &str = ".complete";

/// Whether `out` holds the output of a run that finished but was stopped while moving it
/// into place.
fn interrupted(out: &Path) -> bool {
    out.join(STAGING).join("manifest.json").is_file() || out.join(COMPLETE).is_dir()
}

/// Finishes moving a complete output that a killed run left in `out`, if there is one;
/// returns whether there was.
pub fn finish_interrupted(out: &Path) -> Result<bool, DataError> {
    if out.join(STAGING).join("manifest.json").is_file() {
        commit(out)?;
    } else if out.join(COMPLETE).is_dir() {
        move_into_place(out)?;
    } else {
        return Ok(false);
    }
    Ok(true)
}

/// With a complete output in `out`'s staging directory: removes the previous output (its
/// manifest first: a directory without one is never mistaken for a complete run), marks the
/// staging directory complete, and moves its files into place.
fn commit(out: &Path) -> Result<(), DataError> {
    let mut existing = previous_output(out)?;
    existing.sort_by_key(|f| f != "manifest.json");
    for f in existing {
        let path = out.join(f);
        std::fs::remove_file(&path).map_err(|e| DataError::io("remove", &path, e))?;
    }
    let (staging, complete) = (out.join(STAGING), out.join(COMPLETE));
    std::fs::rename(&staging, &complete).map_err(|e| DataError::io("rename", &staging, e))?;
    sync_dir(out)?;
    move_into_place(out)
}

/// Moves every file of `out`'s complete directory into `out`, the manifest last, and removes
/// the emptied directory. Nothing of the previous output is left to collide with.
fn move_into_place(out: &Path) -> Result<(), DataError> {
    let complete = out.join(COMPLETE);
    let entries = std::fs::read_dir(&complete).map_err(|e| DataError::io("read directory", &complete, e))?;
    let mut names: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    names.sort_by_key(|n| n == "manifest.json");
    for name in names {
        let from = complete.join(&name);
        std::fs::rename(&from, out.join(&name)).map_err(|e| DataError::io("move into place", &from, e))?;
    }
    sync_dir(out)?;
    std::fs::remove_dir(&complete).map_err(|e| DataError::io("remove", &complete, e))
}

/// Makes a directory's entries (renames, new files) durable.
fn sync_dir(dir: &Path) -> Result<(), DataError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| DataError::io("sync", dir, e))
}

/// Names of files in `dir` that a previous run wrote.
fn previous_output(dir: &Path) -> Result<Vec<String>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io("read directory", dir, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n == "manifest.json"
                || ((n.starts_with("train_") || n.starts_with("val_"))
                    && [".bin", ".bin.tmp", ".mask", ".mask.tmp"].iter().any(|ext| n.ends_with(ext)))
        })
        .collect();
    names.sort();
    Ok(names)
}

type RunResult =
    (DocCounts, Vec<Problem>, u64, BTreeMap<&'static str, u64>, Vec<InputStats>, (u64, u64), MemoryReport, f64);

fn run(
    cfg: &PrepareConfig,
    tokenizer: &TextTokenizer,
    hasher: Option<&MinHasher>,
    template: Option<&ChatTemplate>,
    writers: &mut [ShardWriter; 2],
) -> Result<RunResult, DataError> {
    let start = Instant::now();
    let mut reader = DocReader::new(cfg.inputs.clone(), cfg.input.clone());
    let progress = progress_bar(cfg);
    let bytes_read = reader.bytes_read.clone();
    let mut counts = DocCounts::default();
    let mut problems = Vec::new();
    let mut problems_total = 0u64;
    let mut file_problems = BTreeMap::new();
    let mut exact = ExactIndex::default();
    let mut near = hasher.map(NearIndex::new);
    let mut memory = MemoryReport { batch_docs: cfg.batch_docs, batch_bytes: cfg.batch_bytes, ..Default::default() };
    let (mut bytes_in, mut bytes_kept) = (0u64, 0u64);
    let val_cut = (cfg.val_fraction * 2f64.powi(64)) as u64;
    let eot = tokenizer.eot_id();
    let mut record = |p: Problem, strict: bool| -> Result<(), DataError> {
        if strict {
            return Err(DataError::Invalid(format!("{p} (--strict stops at the first malformed input)")));
        }
        problems_total += 1;
        if problems.len() < MAX_LISTED_PROBLEMS {
            problems.push(p);
        }
        Ok(())
    };

    let mut batch = Vec::with_capacity(cfg.batch_docs);
    loop {
        // 1. Read a batch (bounded by documents and bytes).
        batch.clear();
        let mut batch_bytes = 0usize;
        for item in reader.by_ref() {
            match item {
                Item::Doc(doc) => {
                    batch_bytes += doc.bytes.len();
                    batch.push(doc);
                    if batch.len() >= cfg.batch_docs || batch_bytes >= cfg.batch_bytes {
                        break;
                    }
                }
                Item::Problem(p) => {
                    *file_problems.entry(p.kind).or_insert(0) += 1;
                    record(p, cfg.strict)?;
                }
            }
        }
        if batch.is_empty() {
            break;
        }
        memory.peak_batch_docs = memory.peak_batch_docs.max(batch.len());
        memory.peak_batch_bytes = memory.peak_batch_bytes.max(batch_bytes);
        counts.read += batch.len() as u64;
        bytes_in += batch_bytes as u64;

        // 2. Parse, clean and hash in parallel.
        let checked: Vec<Checked> = batch
            .par_drain(..)
            .map(|doc| {
                let (field, at) = (&cfg.input.text_field, (cfg.inputs[doc.input].as_path(), doc.line));
                let checked = match (&cfg.input.completion_field, &cfg.input.messages_field, template) {
                    (Some(completion), ..) => doc
                        .into_pair(&cfg.inputs, field, completion)
                        .map(|(prompt, completion)| Checked::pair(prompt, completion, &cfg.clean, hasher)),
                    (None, Some(messages), Some(template)) => doc
                        .into_messages(&cfg.inputs, messages)
                        .map(|m| Checked::conversation(m, &cfg.clean, hasher, template, at)),
                    _ => doc.into_text(&cfg.inputs, field).map(|text| Checked::document(text, &cfg.clean, hasher)),
                };
                checked.unwrap_or_else(Checked::Problem)
            })
            .collect();

        // 3. Dedup decisions and the split, in input order.
        let mut kept: Vec<(Document, bool)> = Vec::new();
        for c in checked {
            match c {
                Checked::Problem(p) => {
                    *counts.removed.entry(p.kind).or_insert(0) += 1;
                    record(p, cfg.strict)?;
                }
                Checked::Removed(rule) => *counts.removed.entry(rule.name()).or_insert(0) += 1,
                Checked::Clean { doc, exact: key, near: near_key, nfc, control, bytes } => {
                    if cfg.exact_dedup && exact.check_and_insert(key) {
                        *counts.removed.entry("exact_duplicate").or_insert(0) += 1;
                    } else if let (Some(near), Some(key)) = (&mut near, &near_key)
                        && near.check_and_insert(key)
                    {
                        *counts.removed.entry("near_duplicate").or_insert(0) += 1;
                    } else {
                        counts.kept += 1;
                        bytes_kept += bytes as u64;
                        *counts.modified.entry("nfc").or_insert(0) += u64::from(nfc);
                        *counts.modified.entry("control_chars").or_insert(0) += u64::from(control);
                        let key_bytes = key.to_le_bytes();
                        let val = xxh3_64_with_seed(&key_bytes, cfg.seed) < val_cut;
                        kept.push((doc, val));
                    }
                }
            }
        }

        // 4. Tokenize in parallel; append in order.
        let tokens: Vec<Vec<Tokenized>> =
            kept.par_iter().map(|(doc, _)| doc.tokenize(tokenizer)).collect::<Result<_, _>>()?;
        for ((_, val), documents) in kept.iter().zip(&tokens) {
            let split = usize::from(*val);
            if *val {
                counts.val += 1
            } else {
                counts.train += 1
            }
            if documents.len() > 1 {
                *counts.modified.entry(SPLIT_INTO_TURNS).or_insert(0) += 1;
            }
            for (doc, learned) in documents {
                writers[split].push(eot, doc, learned.as_deref())?;
            }
        }
        if let Some(bar) = &progress {
            bar.set_position(bytes_read.load(Ordering::Relaxed));
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{} docs ({:.0}/s), {} kept", counts.read, counts.read as f64 / secs, counts.kept));
        }
    }
    for w in writers.iter_mut() {
        w.finish()?;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if counts.kept == 0 {
        let first = problems.first().map_or(String::new(), |p| format!(" (the first problem: {p})"));
        return Err(DataError::Invalid(format!(
            "no document is left after reading and cleaning {} document(s) from {} input(s) (removed: {:?}){first}; \
             check --input, --text-field and the cleaning flags",
            counts.read,
            cfg.inputs.len(),
            counts.removed
        )));
    }
    memory.exact_index_entries = exact.len();
    memory.near_index_entries = near.as_ref().map_or(0, NearIndex::len);
    for rule in Rule::ALL.map(Rule::name).into_iter().chain([
        "invalid_utf8",
        "malformed_json",
        "exact_duplicate",
        "near_duplicate",
    ]) {
        counts.removed.entry(rule).or_insert(0);
    }
    if template.is_some() {
        counts.removed.entry("chat_template").or_insert(0);
    }
    let inputs = reader.stats().to_vec();
    Ok((
        counts,
        problems,
        problems_total,
        file_problems,
        inputs,
        (bytes_in, bytes_kept),
        memory,
        start.elapsed().as_secs_f64(),
    ))
}

fn progress_bar(cfg: &PrepareConfig) -> Option<indicatif::ProgressBar> {
    progress_bar_for(&cfg.inputs, cfg.progress)
}

/// A bar over the stored bytes of `inputs`, shown only when `show` and stderr is a terminal.
pub(crate) fn progress_bar_for(inputs: &[PathBuf], show: bool) -> Option<indicatif::ProgressBar> {
    if !show || !std::io::stderr().is_terminal() {
        return None;
    }
    let total: u64 = inputs.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::DocSplit;
    use crate::{Loader, Order, SourceKind, TokenStream};
    use std::collections::HashSet;

    /// Paragraphs of the shipped English sample, long enough to pass the cleaning rules.
    fn paragraphs() -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
        let text = std::fs::read_to_string(root.join("en-alice-in-wonderland.txt")).unwrap();
        let mut seen = HashSet::new();
        text.split("\n\n")
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| p.chars().count() >= 300 && seen.insert(p.clone()))
            .take(120)
            .collect()
    }

    fn jsonl(docs: &[String]) -> String {
        docs.iter().map(|d| serde_json::json!({ "text": d }).to_string() + "\n").collect()
    }

    /// The documents of a split, decoded from its shards (documents start with end-of-text).
    fn split_docs(dir: &Path, tok: &TextTokenizer, split: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        for i in 0.. {
            let path = dir.join(format!("{split}_{i:06}.bin"));
            if !path.exists() {
                break;
            }
            let shard = Shard::open(&path).unwrap();
            assert_eq!(shard.version(), ShardVersion::V1);
            let mut out = vec![0; shard.len()];
            shard.read(0, &mut out);
            tokens.extend(out);
        }
        assert!(tokens.is_empty() || tokens[0] == tok.eot_id());
        tokens.split(|&t| t == tok.eot_id()).skip(1).map(|d| tok.decode(d).unwrap()).collect()
    }

    #[test]
    fn counts_add_up_shards_load_and_validation_is_split_by_document() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let tok = crate::tokenizer::tests::sample_tokenizer(dir.path());
        let paras = paragraphs();
        assert!(paras.len() >= 100);
        let mut docs = paras.clone();
        docs.push(paras[3].clone()); // exact duplicate
        docs.push(format!("  {}\n", paras[4])); // exact after trimming
        let mut edited: Vec<&str> = paras[5].split(' ').collect();
        edited[10] = "changed";
        docs.push(edited.join(" ")); // near duplicate
        docs.push("too short".into());
        docs.push("Click here to subscribe to the newsletter\n".repeat(6));
        docs.push((0..40).map(|i| format!("{} ", i * 7919 % 10007)).collect::<String>() + "abc");
        let mut lines = jsonl(&docs);
        let middle = lines[lines.len() / 2..].find('\n').unwrap() + lines.len() / 2 + 1;
        lines.insert_str(middle, "{\"text\": broken\n");
        std::fs::write(p("a.jsonl"), lines).unwrap();
        std::fs::write(p("bad.txt"), b"caf\xE9 au lait is what this file would say in Latin-1 encoding").unwrap();
        std::fs::write(p("empty.txt"), "").unwrap();
        let inputs = vec![p("a.jsonl"), p("bad.txt"), p("empty.txt"), p("missing.txt")];
        let mut cfg = PrepareConfig::new(inputs, p("tokenizer.json"), p("out"));
        cfg.val_fraction = 0.2;
        cfg.shard_tokens = 3000;
        cfg.progress = false;
        let m = prepare(&cfg, vec!["ondol".into(), "data".into(), "prepare".into()], "test").unwrap();

        let d = &m.documents;
        let removed: u64 = d.removed.values().sum();
        assert_eq!(d.read, d.kept + removed, "{d:?}");
        assert_eq!(d.read, docs.len() as u64 + 2); // + the broken line + bad.txt
        assert_eq!(d.kept, d.train + d.val);
        let r = |k: &str| d.removed[k];
        assert_eq!(
            [r("exact_duplicate"), r("near_duplicate"), r("too_short"), r("repeated_lines"), r("non_letter")],
            [2, 1, 1, 1, 1],
            "{d:?}"
        );
        assert_eq!((r("malformed_json"), r("invalid_utf8")), (1, 1));
        assert_eq!(m.file_problems, BTreeMap::from([("empty_file", 1), ("unreadable", 1)]));
        let located: Vec<String> = m.problems.iter().map(|p| p.to_string()).collect();
        assert!(located.iter().any(|l| l.contains("a.jsonl:") && l.contains("malformed JSON")), "{located:?}");
        assert!(located.iter().any(|l| l.contains("bad.txt:1: invalid UTF-8")), "{located:?}");
        assert!(located.iter().any(|l| l.contains("missing.txt:0: cannot open")), "{located:?}");
        assert_eq!(m.inputs[0].sha256.len(), 64);

        // Shards: the documents come back whole, each in exactly one split.
        let train = split_docs(&cfg.out, &tok, "train");
        let val = split_docs(&cfg.out, &tok, "val");
        assert_eq!((train.len() as u64, val.len() as u64), (d.train, d.val));
        assert!(d.val >= 10 && d.train >= 60, "{d:?}");
        let all: HashSet<&String> = train.iter().chain(&val).collect();
        assert_eq!(all.len() as u64, d.kept);
        assert!(paras.iter().all(|p| all.contains(p)), "a clean paragraph went missing");
        assert!(m.shards.len() > 2 && m.shards.iter().all(|s| s.tokens <= 3000));
        let tokens: u64 = m.shards.iter().map(|s| s.tokens).sum();
        assert_eq!(tokens, m.tokens["train"] + m.tokens["val"]);
        let files: Vec<PathBuf> =
            m.shards.iter().filter(|s| s.split == "train").map(|s| cfg.out.join(&s.file)).collect();
        let stream = std::sync::Arc::new(TokenStream::open(&files, SourceKind::Shards).unwrap());
        assert_eq!(stream.len() as u64, m.tokens["train"]);
        Loader::new(stream, 64, 4, 1, Order::Shuffled { seed: 1 }, 0, 1).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cfg.out.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["documents"]["kept"], d.kept);
        assert_eq!(std::fs::read(cfg.out.join("tokenizer.json")).unwrap(), std::fs::read(&cfg.tokenizer).unwrap());

        // The same seed gives the same split; a second run into the directory is refused.
        let err = prepare(&cfg, vec![], "test").unwrap_err().to_string();
        assert!(err.contains("--overwrite") && err.contains("manifest.json"), "{err}");
        let again = prepare(&PrepareConfig { overwrite: true, ..cfg.clone() }, vec![], "test").unwrap();
        assert_eq!((again.documents.train, again.documents.val), (d.train, d.val));
        assert_eq!(split_docs(&cfg.out, &tok, "val"), val);

        // What the manifest does not list, or lists otherwise, is refused by name.
        let glob = |pattern: &str| crate::expand_globs(&[pattern.to_string()], &cfg.out).unwrap();
        assert_eq!(ShardTokenizer::of_files(&glob("train_*.bin")).unwrap().len(), 1);
        std::fs::copy(cfg.out.join("train_000000.bin"), cfg.out.join("train_000999.bin")).unwrap();
        let err = ShardTokenizer::of_files(&glob("train_*.bin")).unwrap_err().to_string();
        assert!(err.contains("train_000999.bin") && err.contains("is not among the shards it lists"), "{err}");
        // Over the last shard, which holds fewer tokens than a full one.
        let last = &m.shards.iter().rfind(|s| s.split == "train").unwrap().file;
        std::fs::rename(cfg.out.join("train_000999.bin"), cfg.out.join(last)).unwrap();
        let err = ShardTokenizer::of_files(&glob("train_*.bin")).unwrap_err().to_string();
        assert!(err.contains(last.as_str()) && err.contains("but it holds 3000"), "{err}");
    }

    /// A split left empty is warned about: training on these shards would find no file.
    #[test]
    fn an_empty_split_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        crate::tokenizer::tests::sample_tokenizer(dir.path());
        std::fs::write(p("a.jsonl"), jsonl(&paragraphs()[..2])).unwrap();
        let mut cfg = PrepareConfig::new(vec![p("a.jsonl")], p("tokenizer.json"), p("out"));
        (cfg.progress, cfg.val_fraction) = (false, 0.999);
        let m = prepare(&cfg, vec![], "test").unwrap();
        assert_eq!((m.documents.train, m.documents.val), (0, 2));
        assert!(m.summary().contains("no document went to training (all 2 went to validation)"), "{}", m.summary());
    }

    #[test]
    fn strict_mode_fails_with_one_message_and_leaves_no_shard() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        crate::tokenizer::tests::sample_tokenizer(dir.path());
        std::fs::write(p("a.jsonl"), jsonl(&paragraphs())).unwrap();
        std::fs::write(p("b.jsonl"), "{\"text\": \"fine\"}\n{\"txt\": \"wrong field\"}\n").unwrap();
        let mut cfg = PrepareConfig::new(vec![p("a.jsonl"), p("b.jsonl")], p("tokenizer.json"), p("out"));
        (cfg.strict, cfg.progress, cfg.shard_tokens, cfg.batch_docs) = (true, false, 500, 8);
        let err = prepare(&cfg, vec![], "test").unwrap_err().to_string();
        assert!(err.contains("b.jsonl:2") && err.contains("no field `text`") && err.contains("--strict"), "{err}");
        assert!(!cfg.out.exists(), "a failed run left the directory it made");
        // A directory that was there stays, without the shards a killed run left staged.
        std::fs::create_dir_all(cfg.out.join(STAGING)).unwrap();
        std::fs::write(cfg.out.join(STAGING).join("train_000000.bin"), "killed").unwrap();
        assert!(prepare(&cfg, vec![], "test").is_err());
        let left: Vec<_> = std::fs::read_dir(&cfg.out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "a failed run left {left:?}");
        // A failed --overwrite keeps the data it would have replaced.
        let good = PrepareConfig { inputs: vec![p("a.jsonl")], strict: false, ..cfg.clone() };
        prepare(&good, vec![], "test").unwrap();
        let manifest = std::fs::read(cfg.out.join("manifest.json")).unwrap();
        assert!(prepare(&PrepareConfig { overwrite: true, ..cfg.clone() }, vec![], "test").is_err());
        assert_eq!(std::fs::read(cfg.out.join("manifest.json")).unwrap(), manifest, "a failed overwrite lost the data");

        cfg.tokenizer = p("nope.json");
        let err = prepare(&cfg, vec![], "test").unwrap_err().to_string();
        assert!(err.contains("nope.json") && err.contains("ondol tokenizer train"), "{err}");
    }

    /// A run killed after its output was complete, while moving it into place: the directory
    /// is refused as data until the next `data prepare` into it finishes the move, wherever
    /// the kill fell (removing the previous output, or moving the new).
    #[test]
    fn an_output_half_moved_into_place_is_refused_then_finished() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        crate::tokenizer::tests::sample_tokenizer(dir.path());
        std::fs::write(p("a.jsonl"), jsonl(&paragraphs())).unwrap();
        let mut cfg = PrepareConfig::new(vec![p("a.jsonl")], p("tokenizer.json"), p("out"));
        (cfg.progress, cfg.shard_tokens, cfg.val_fraction) = (false, 300, 0.2);
        prepare(&cfg, vec![], "test").unwrap();
        let out = &cfg.out;
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let whole = listing();
        let bytes: Vec<Vec<u8>> = whole.iter().map(|n| std::fs::read(out.join(n)).unwrap()).collect();
        assert!(whole.iter().filter(|n| n.starts_with("train_")).count() > 1, "{whole:?}");
        // Killed while removing the previous output: the new one complete in staging, the
        // old one partly gone. Killed while moving: some files still in .complete.
        let staged = |into: &str, moved: &[&str]| {
            std::fs::create_dir(out.join(into)).unwrap();
            for name in whole.iter().filter(|n| !moved.contains(&n.as_str())) {
                std::fs::rename(out.join(name), out.join(into).join(name)).unwrap();
            }
        };
        for (into, moved) in [(STAGING, &[][..]), (COMPLETE, &["tokenizer.json", "train_000000.bin"][..])] {
            staged(into, moved);
            if into == STAGING {
                std::fs::write(out.join("train_000000.bin"), "the previous output").unwrap();
            }
            let err = ShardTokenizer::of_dir(out).unwrap_err().to_string();
            assert!(err.contains("stopped while moving") && err.contains("--out"), "{err}");
            let err = prepare(&cfg, vec![], "test").unwrap_err().to_string();
            assert!(err.contains("already holds prepared data"), "{err}");
            assert_eq!(listing(), whole, "after a kill in {into}");
            let now: Vec<Vec<u8>> = whole.iter().map(|n| std::fs::read(out.join(n)).unwrap()).collect();
            assert!(now == bytes, "after a kill in {into}: other bytes");
            assert!(ShardTokenizer::of_dir(out).unwrap().is_some());
        }
    }

    #[test]
    fn memory_stays_bounded_on_a_corpus_many_times_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        crate::tokenizer::tests::sample_tokenizer(dir.path());
        // 4000 distinct documents in blank-line separated text, 32 documents per batch.
        let mut rng = ondol_core::Rng::new(11);
        let words = ["온돌", "floor", "warm", "바닥", "house", "stone", "불", "smoke", "room", "winter"];
        let text: String = (0..4000)
            .map(|_| {
                let doc: Vec<&str> = (0..30).map(|_| words[rng.below(10) as usize]).collect();
                doc.join(" ") + "\n\n"
            })
            .collect();
        std::fs::write(p("big.txt"), &text).unwrap();
        let mut cfg = PrepareConfig::new(vec![p("big.txt")], p("tokenizer.json"), p("out"));
        cfg.input.doc_split = DocSplit::BlankLine;
        (cfg.batch_docs, cfg.batch_bytes, cfg.shard_tokens, cfg.progress) = (32, 1 << 20, 2000, false);
        cfg.near_dedup = None;
        cfg.clean.max_repeated_ngram_fraction = 1.0;
        let m = prepare(&cfg, vec![], "test").unwrap();
        assert_eq!(m.documents.read, 4000);
        assert!(m.documents.kept > 3900, "{:?}", m.documents);
        assert!(m.memory.peak_batch_docs <= 32, "{:?}", m.memory);
        assert!(m.memory.peak_batch_bytes <= 32 * 400, "{:?}", m.memory);
        // A shard buffer holds at most shard_tokens + one document (+ its end-of-text).
        assert!(m.memory.peak_buffered_tokens < 2000 + 200, "{:?}", m.memory);
        assert!(m.shards.len() >= 10);

        // A smaller byte budget cuts batches by bytes.
        cfg.batch_bytes = 1000;
        cfg.overwrite = true;
        let m = prepare(&cfg, vec![], "test").unwrap();
        assert!(m.memory.peak_batch_docs < 32 && m.memory.peak_batch_bytes < 1000 + 400, "{:?}", m.memory);
    }
}
