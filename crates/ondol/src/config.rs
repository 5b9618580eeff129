//! The run config: TOML with sections in torchtitan's spirit, `--set section.key=value`
//! overrides, unknown keys rejected, and every invalid value reported with its dotted key,
//! the file, and what would be valid. The resolved config is written into the run directory.

use ondol_core::Error;
use ondol_data::input::DocSplit;
use ondol_data::tokenizer::EOT_TOKEN;
use ondol_model::ModelConfig;
use ondol_optim::{OptimizerConfig, SchedulerConfig};
use ondol_parallel::{Layout, ScheduleKind};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub training: TrainingConfig,
    pub data: DataConfig,
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub lr_scheduler: SchedulerConfig,
    #[serde(default)]
    pub parallelism: ParallelismConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

/// The type a backend computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout (the CPU's only type; on a GPU, for checking against it).
    Fp32,
    /// bf16 weights and activations with fp32 master weights, gradients and reductions.
    Bf16,
}

impl Precision {
    /// Bytes of an element of the compute type.
    pub fn bytes(self) -> usize {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

impl TrainingConfig {
    /// The compute type the run trains in: `precision`, or left out, the device's default.
    pub fn compute_precision(&self) -> Precision {
        match (self.device, self.precision) {
            (_, Some(p)) => p,
            (Device::Cpu, None) => Precision::Fp32,
            (Device::Cuda, None) => Precision::Bf16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Optimizer updates to run.
    pub steps: u64,
    /// Sequences per micro-batch (per data-parallel rank).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each update.
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub seq_len: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: Device,
    /// Compute type; left out, bf16 on "cuda" and fp32 on "cpu".
    #[serde(default)]
    pub precision: Option<Precision>,
    /// Evaluate every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Global batches of validation data per evaluation (each as many sequences as a step:
    /// batch_size x dp x grad_accum, so `grad_accum` micro-batches of every replica); 0: one
    /// micro-batch of every replica, the least an evaluation reads.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Draw training sequences in a seeded random order (false: in file order).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Activation checkpointing: keep no activations of every k-th transformer block and
    /// recompute them in backward (0: off; 1: every block). Same results, less memory.
    #[serde(default)]
    pub activation_checkpointing: usize,
    /// Rows (tokens) of logits the loss makes and uses up at a time (0: automatic, about 2^29
    /// logits, chunks of at least 4096 rows). Smaller saves memory at a large vocabulary and
    /// micro-batch; the same results up to rounding.
    #[serde(default)]
    pub loss_chunk_rows: usize,
    /// Worker threads (default: every core).
    #[serde(default)]
    pub threads: Option<usize>,
    /// On "cuda": attention and Mamba-2's scan on tensor cores (flash attention and the SSD's
    /// mma.sync forms). false runs their CUDA-core kernels instead, to measure what the
    /// tensor-core ones gain.
    #[serde(default = "yes")]
    pub tensor_cores: bool,
    /// Documents packed into one sequence attend only within their own, as Llama 3 trained
    /// (Megatron's `--reset-attention-mask`): a document starts at an end-of-text token (which
    /// `data prepare` writes before each document, and raw text after each file, so the next
    /// file's document starts at it). Positions still count from the sequence's start. Models
    /// without Mamba layers (Mamba's scans carry their state across documents).
    #[serde(default)]
    pub mask_documents: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// llm.c token shards (`.bin`).
    Shards,
    /// Raw UTF-8 text, each file one document, tokenized as bytes.
    Text,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Paths or globs, relative to the working directory.
    #[serde(default)]
    pub train: Vec<String>,
    /// Several weighted sources instead of `train`: `[[data.sources]]` tables, each with its
    /// own `train` patterns and a `weight` (the share of sequences drawn from it).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Validation paths or globs; when empty, `val_fraction` of each training file is held out.
    #[serde(default)]
    pub val: Vec<String>,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    #[serde(default = "default_format")]
    pub format: DataFormat,
    /// "bytes" (256 byte values + end-of-text) or a tokenizer.json (shards only; its vocabulary
    /// must fit model.vocab_size, and shards with a manifest.json of `data prepare` need the
    /// tokenizer it records); optional for other shards.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// A tokenizer.json's end-of-text token, which separates the documents in its shards
    /// (`data prepare --eot-token` writes it before each); left out, "<|endoftext|>".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eot_token: Option<String>,
    /// Prepare the data on the first run: train a tokenizer and write shards (see [`PrepareTable`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<PrepareTable>,
}

/// A path or pattern as the same file is named otherwise too: without `.` components
/// (`./shards/*.bin` is `shards/*.bin`).
pub fn plain_path(p: &str) -> String {
    let plain: std::path::PathBuf = Path::new(p).components().filter(|c| *c != std::path::Component::CurDir).collect();
    plain.display().to_string()
}

impl DataConfig {
    /// The end-of-text token of the run's tokenizer.json.
    pub fn eot_token(&self) -> &str {
        self.eot_token.as_deref().unwrap_or(EOT_TOKEN)
    }

    /// Every data pattern: the training sources' and validation's.
    pub fn patterns(&self) -> Vec<String> {
        let sources = self.sources.iter().flat_map(|s| s.train.iter());
        self.train.iter().chain(sources).chain(&self.val).cloned().collect()
    }
}

/// `[data] prepare = { input = [...], vocab_size = N, out = "DIR" }`: when `DIR/manifest.json`
/// does not exist yet, train a byte-level BPE tokenizer of `vocab_size` on `input` into
/// `DIR/tokenizer.json` and run `data prepare` into `DIR` with default cleaning and dedup.
/// `data.train`, `data.val` and `data.tokenizer` then name files in `DIR`. Later runs reuse
/// `DIR`, and refuse it where this table has changed since (`DIR/prepared-with.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareTable {
    /// Input files or globs (text, JSON Lines, .gz, .zst), relative to the working directory.
    pub input: Vec<String>,
    pub vocab_size: usize,
    pub out: String,
    /// "file" or "blank-line".
    #[serde(default)]
    pub doc_split: DocSplit,
    /// Fraction of documents held out for validation.
    #[serde(default = "default_prepare_val_fraction")]
    pub val_fraction: f64,
    #[serde(default)]
    pub seed: u64,
}

fn default_prepare_val_fraction() -> f64 {
    0.05
}

/// One `[[data.sources]]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub train: Vec<String>,
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelismConfig {
    #[serde(default = "one")]
    pub tp: usize,
    #[serde(default = "one")]
    pub pp: usize,
    /// Data-parallel ranks. On the CPU all tp x pp x dp ranks are threads of this process.
    #[serde(default = "one")]
    pub dp: usize,
    /// The pipeline schedule; its micro-batches are `training.grad_accum`.
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    /// Micro-batches per optimizer step, Megatron's name for `training.grad_accum` (the same
    /// count: the schedule's micro-batches are the accumulated ones). Given, it sets
    /// grad_accum, which must then be left out or agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microbatches: Option<usize>,
    /// Model chunks per pipeline rank (the interleaved schedule's virtual stages).
    #[serde(default = "one")]
    pub virtual_stages: usize,
    /// Layers of each (virtual) stage in order; empty: as even a split as the layers allow.
    #[serde(default)]
    pub stage_layers: Vec<usize>,
    /// 1: shard the AdamW state across the data-parallel ranks (ZeRO-1); 0: replicate it.
    #[serde(default)]
    pub zero: u8,
    /// Megatron's sequence parallelism: with tp > 1, split the tokens between the mixers
    /// (residual stream, norms) across the tp ranks too; less activation memory, the same
    /// communication volume.
    #[serde(default)]
    pub sequence_parallel: bool,
    /// A collective that does not complete within this many seconds aborts the run, naming
    /// the operation and the ranks that did not arrive.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Sum data-parallel gradients in buckets during the last backward of each step while
    /// backward goes on: on NCCL's side stream, or on a worker thread with CPU communicators
    /// (under ZeRO-1, each bucket reduced into the ranks whose shards hold it).
    #[serde(default = "yes")]
    pub overlap_grad_sync: bool,
    /// Megabytes of fp32 gradients per bucket.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
}

fn default_bucket_mb() -> f64 {
    25.0
}

fn default_schedule() -> ScheduleKind {
    ScheduleKind::OneFOneB
}

impl Default for ParallelismConfig {
    fn default() -> Self {
        Self {
            tp: 1,
            pp: 1,
            dp: 1,
            schedule: default_schedule(),
            microbatches: None,
            virtual_stages: 1,
            stage_layers: Vec::new(),
            zero: 0,
            sequence_parallel: false,
            timeout_s: default_timeout_s(),
            overlap_grad_sync: true,
            bucket_mb: default_bucket_mb(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N steps (0: only at the end).
    #[serde(default)]
    pub every: u64,
    /// Save at the last step too (whatever `every` says). Benchmarks turn it off: writing a
    /// large model's weights and AdamW moments is no part of what they measure.
    #[serde(default = "yes")]
    pub at_end: bool,
    /// Keep only the newest N checkpoints up to the step just written (0: keep all). Those of
    /// a continuation abandoned by resuming from an earlier checkpoint do not count: each is
    /// replaced or removed when the run writes a checkpoint at or past its step.
    #[serde(default)]
    pub keep_last: usize,
    /// Split model files above this many bytes into shards with an index, as transformers does.
    #[serde(default = "default_max_shard_bytes")]
    pub max_shard_bytes: u64,
    /// What resuming does when the checkpoint was trained on other data.
    #[serde(default)]
    pub on_data_change: OnDataChange,
    /// A checkpoint (`.../checkpoints/step-XXXXXXXX`) this run starts from (weights, AdamW
    /// state, step) while it has none of its own: a new stage of a longer run. `--resume auto`
    /// takes the run's own newest checkpoint once there is one, so a requeued job goes on where
    /// the stage left off; without `--resume`, a run that has its own is refused.
    #[serde(default)]
    pub resume_from: Option<String>,
}

/// What resuming does when the checkpoint's data differs from the run's: another `[data]`
/// section, global batch, seq_len, seed or shuffle (the model must always be the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDataChange {
    /// Refuse to resume, naming the first difference.
    #[default]
    Refuse,
    /// Load the weights, AdamW state and step, and read the new data from its start: a new
    /// stage of one run (an annealing mixture, say). Where the data is the same (the stage's
    /// own checkpoints) the position continues as always.
    Restart,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 0,
            at_end: true,
            keep_last: 0,
            max_shard_bytes: default_max_shard_bytes(),
            on_data_change: OnDataChange::Refuse,
            resume_from: None,
        }
    }
}

fn default_max_shard_bytes() -> u64 {
    5_000_000_000
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { log_every: default_log_every() }
    }
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_device() -> Device {
    Device::Cpu
}
fn default_eval_batches() -> usize {
    10
}
fn default_val_fraction() -> f64 {
    0.0
}
fn default_format() -> DataFormat {
    DataFormat::Shards
}
fn default_timeout_s() -> u64 {
    300
}
fn default_log_every() -> u64 {
    10
}

/// The byte-level tokenizer's vocabulary: 256 byte values and end-of-text.
pub const BYTE_VOCAB: usize = 257;
/// The byte-level tokenizer's end-of-text id.
pub const BYTE_EOT: u32 = 256;

impl RunConfig {
    /// The parallel layout of this run on `mesh`.
    pub fn layout(&self, mesh: ondol_comm::Mesh) -> Layout {
        let (t, p) = (&self.training, &self.parallelism);
        Layout {
            mesh,
            schedule: p.schedule,
            chunks: p.virtual_stages,
            stage_layers: p.stage_layers.clone(),
            micro: t.grad_accum,
            batch: t.batch_size,
            seq: t.seq_len,
            recompute: t.activation_checkpointing,
            loss_chunk: t.loss_chunk_rows,
            zero: p.zero == 1,
            sequence_parallel: p.sequence_parallel,
            grad_buckets: p.overlap_grad_sync.then(|| ((p.bucket_mb * 1e6 / 4.0) as usize).max(1)),
            // Set by the trainer, which knows the tokenizer's end-of-text token.
            document_mask: None,
        }
    }

    /// Sequences one optimizer step trains on: micro-batch x data-parallel replicas x
    /// accumulated micro-batches.
    pub fn global_batch(&self) -> usize {
        self.training.batch_size.saturating_mul(self.parallelism.dp).saturating_mul(self.training.grad_accum)
    }

    /// Reads the config a user wrote at `path`, applies `--set` overrides in order, and
    /// validates the result, refusing settings it would not read.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, Error> {
        Self::load_checked(path, overrides, true)
    }

    /// [`Self::load`] of a config ondol wrote (a checkpoint's `ondol.toml`): an earlier
    /// version may have written settings it does not read, which are let be.
    pub fn load_written(path: &Path, overrides: &[String]) -> Result<Self, Error> {
        Self::load_checked(path, overrides, false)
    }

    fn load_checked(path: &Path, overrides: &[String], refuse_unread: bool) -> Result<Self, Error> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("cannot read config {file}"), e))?;
        Self::parse_checked(&text, &file, overrides, refuse_unread)
    }

    /// Parses config text (as [`Self::load_written`] does); `file` names its origin in errors.
    pub fn parse(text: &str, file: &str, overrides: &[String]) -> Result<Self, Error> {
        Self::parse_checked(text, file, overrides, false)
    }

    fn parse_checked(text: &str, file: &str, overrides: &[String], refuse_unread: bool) -> Result<Self, Error> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::Input(format!("{file} is not valid TOML: {e}")))?;
        let written = table.clone();
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let grad_accum_given = table.get("training").and_then(|t| t.get("grad_accum")).is_some();
        // A key's value comes from a --set of it, else from the file.
        // (A value inside a --set table or array, like data.sources[0].weight, is the --set's.)
        let set_here = |key: &str| {
            let given = overrides.iter().filter_map(|o| o.split('=').next().map(str::trim));
            given
                .into_iter()
                .any(|k| key == k || key.starts_with(&format!("{k}.")) || key.starts_with(&format!("{k}[")))
        };
        // A key neither set nor written has its default.
        let in_file = |key: &str| {
            let mut at = Some(&written);
            let parts: Vec<&str> = key.split('.').map(|p| p.split('[').next().unwrap_or(p)).collect();
            for (i, part) in parts.iter().enumerate() {
                let value = at.and_then(|t| t.get(*part));
                if i + 1 == parts.len() || !value.is_some_and(toml::Value::is_table) {
                    return value.is_some();
                }
                at = value.and_then(toml::Value::as_table);
            }
            false
        };
        let blame = |key: &str, message: String| match (set_here(key), in_file(key)) {
            (true, _) => Error::config(format!("{key}` from `--set"), message),
            (false, true) => Error::config(format!("{key}` in `{file}"), message),
            (false, false) => Error::config(key, format!("{message} (its default: {file} leaves it out)")),
        };
        let mut cfg: RunConfig = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().message().to_string();
            match key.as_str() {
                "." => Error::Input(format!("{file}: {message} (a [section] of the config)")),
                _ => blame(&key, message),
            }
        })?;
        if let (Some(m), false) = (cfg.parallelism.microbatches, grad_accum_given) {
            cfg.training.grad_accum = m;
        }
        let unread = || match refuse_unread {
            true => cfg.model.refuse_unread().and_then(|()| cfg.lr_scheduler.refuse_unread()),
            false => Ok(()),
        };
        cfg.validate().and_then(|()| unread()).map_err(|e| match e {
            Error::Config { key, message } => blame(&key, message),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Every constraint between fields that serde's types do not already enforce.
    pub fn validate(&self) -> Result<(), Error> {
        self.model.validate()?;
        self.optimizer.validate()?;
        let t = &self.training;
        if t.steps == 0 {
            return Err(Error::config("training.steps", "must be at least 1"));
        }
        self.lr_scheduler.validate(t.steps)?;
        match self.parallelism.microbatches {
            Some(0) => return Err(Error::config("parallelism.microbatches", "must be at least 1")),
            Some(m) if m != t.grad_accum => {
                return Err(Error::config(
                    "parallelism.microbatches",
                    format!(
                        "{m} disagrees with training.grad_accum = {}: they are two names of one count (micro-batches \
                         per optimizer step); set training.grad_accum = {m} instead",
                        t.grad_accum
                    ),
                ));
            }
            _ => {}
        }
        let at_least_one = [("steps", t.steps as usize), ("batch_size", t.batch_size), ("grad_accum", t.grad_accum)];
        for (key, v) in at_least_one {
            if v == 0 {
                return Err(Error::config(format!("training.{key}"), "must be at least 1"));
            }
        }
        if t.seq_len == 0 || t.seq_len > self.model.max_seq_len {
            return Err(Error::config(
                "training.seq_len",
                format!("{} must be between 1 and model.max_seq_len = {}", t.seq_len, self.model.max_seq_len),
            ));
        }
        if t.device == Device::Cpu && t.precision == Some(Precision::Bf16) {
            return Err(Error::config(
                "training.precision",
                "\"bf16\" needs training.device = \"cuda\"; the CPU backend computes in \"fp32\"",
            ));
        }
        if t.device == Device::Cpu && !t.tensor_cores {
            return Err(Error::config(
                "training.tensor_cores",
                "false chooses between CUDA kernels and needs training.device = \"cuda\"",
            ));
        }
        if t.mask_documents {
            self.model.check_mask_documents("training.mask_documents")?;
            if self.data.tokenizer.is_none() {
                return Err(Error::config(
                    "training.mask_documents",
                    "documents start at the tokenizer's end-of-text token: set data.tokenizer (\"bytes\" or the \
                     tokenizer.json the shards were made with)",
                ));
            }
        }
        if t.threads == Some(0) {
            return Err(Error::config("training.threads", "must be at least 1 (or left out to use every core)"));
        }
        let d = &self.data;
        match (d.train.is_empty(), d.sources.is_empty()) {
            (true, true) => {
                return Err(Error::config("data.train", "needs at least one path or glob (or give [[data.sources]])"));
            }
            (false, false) => {
                return Err(Error::config("data.sources", "give either data.train or [[data.sources]], not both"));
            }
            _ => {}
        }
        for (i, src) in d.sources.iter().enumerate() {
            if src.train.is_empty() {
                return Err(Error::config(format!("data.sources[{i}].train"), "needs at least one path or glob"));
            }
            if !(src.weight.is_finite() && src.weight > 0.0) {
                return Err(Error::config(
                    format!("data.sources[{i}].weight"),
                    format!("{} must be a number > 0", src.weight),
                ));
            }
        }
        if !d.sources.iter().map(|s| s.weight).sum::<f64>().is_finite() {
            return Err(Error::config("data.sources", "the weights sum past the largest number: scale them down"));
        }
        if !(0.0..1.0).contains(&d.val_fraction) {
            return Err(Error::config("data.val_fraction", format!("{} must be in [0, 1)", d.val_fraction)));
        }
        if t.eval_batches > 0 && d.val.is_empty() && d.val_fraction == 0.0 && t.eval_every > 0 {
            return Err(Error::config(
                "training.eval_every",
                "evaluation needs data: set data.val or a data.val_fraction > 0 (or eval_every = 0)",
            ));
        }
        match (d.format, d.tokenizer.as_deref()) {
            (DataFormat::Text, Some("bytes")) | (DataFormat::Shards, None | Some("bytes")) => {}
            (DataFormat::Text, other) => {
                return Err(Error::config(
                    "data.tokenizer",
                    format!(
                        "{}: text data is tokenized on the fly only with tokenizer = \"bytes\"",
                        other.map_or("none".to_string(), |t| format!("\"{t}\""))
                    ),
                ));
            }
            // A tokenizer.json: that it exists and fits model.vocab_size is checked when the data
            // is opened (`prepare_cli::prepare_for_run`), after `data.prepare` may have made it.
            (DataFormat::Shards, Some(_)) => {}
        }
        if d.eot_token.is_some() && matches!(d.tokenizer.as_deref(), None | Some("bytes")) {
            return Err(Error::config(
                "data.eot_token",
                "names a token of a tokenizer.json: set data.tokenizer to one (the byte-level tokenizer's \
                 end-of-text is fixed)",
            ));
        }
        if let Some(p) = &d.prepare {
            if d.format != DataFormat::Shards {
                return Err(Error::config("data.prepare", "prepares token shards: it needs data.format = \"shards\""));
            }
            if p.input.is_empty() {
                return Err(Error::config("data.prepare.input", "needs at least one path or glob"));
            }
            if p.vocab_size > self.model.vocab_size {
                return Err(Error::config(
                    "data.prepare.vocab_size",
                    format!("{} is larger than model.vocab_size = {}", p.vocab_size, self.model.vocab_size),
                ));
            }
            if !(0.0..1.0).contains(&p.val_fraction) {
                return Err(Error::config(
                    "data.prepare.val_fraction",
                    format!("{} must be in [0, 1)", p.val_fraction),
                ));
            }
        }
        if d.tokenizer.as_deref() == Some("bytes") && self.model.vocab_size < BYTE_VOCAB {
            return Err(Error::config(
                "model.vocab_size",
                format!(
                    "{} is too small for tokenizer = \"bytes\", which needs at least {BYTE_VOCAB}",
                    self.model.vocab_size
                ),
            ));
        }
        let p = &self.parallelism;
        for (key, v) in [("tp", p.tp), ("pp", p.pp), ("dp", p.dp), ("virtual_stages", p.virtual_stages)] {
            if v == 0 {
                return Err(Error::config(format!("parallelism.{key}"), "must be at least 1"));
            }
        }
        self.layout(ondol_comm::Mesh::new(p.tp, p.pp, p.dp)?).check(&self.model)?;
        if p.zero > 1 {
            return Err(Error::config("parallelism.zero", format!("{} must be 0 (off) or 1 (ZeRO-1)", p.zero)));
        }
        if !(p.bucket_mb.is_finite() && p.bucket_mb > 0.0) {
            return Err(Error::config(
                "parallelism.bucket_mb",
                format!("{}: give a number of megabytes > 0", p.bucket_mb),
            ));
        }
        if p.timeout_s == 0 {
            return Err(Error::config("parallelism.timeout_s", "must be at least 1"));
        }
        if self.checkpoint.max_shard_bytes == 0 {
            return Err(Error::config("checkpoint.max_shard_bytes", "must be at least 1"));
        }
        if self.metrics.log_every == 0 {
            return Err(Error::config("metrics.log_every", "must be at least 1"));
        }
        Ok(())
    }
}

/// Applies one `section.key=value` override. The value is read as a TOML value
/// (`3`, `1e-4`, `true`, `["a", "b"]`), or else taken as a plain string.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), Error> {
    let bad = |why: &str| Error::config(format!("--set {spec}"), why.to_string());
    let (path, raw) = spec.split_once('=').ok_or_else(|| bad("expected section.key=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        return Err(bad("the key must be a dotted path like training.steps"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed table has v"),
        Err(_) if raw.trim().parse::<i128>().is_ok_and(|v| i64::try_from(v).is_err()) => {
            return Err(bad("a whole number past what TOML holds (-2^63 to 2^63 - 1)"));
        }
        Err(_) => toml::Value::String(raw.to_string()),
    };
    // A key may name an element of a list of tables: data.sources[1].weight.
    let element = |node, name, i| list_element(node, name, i).map_err(|why| bad(&why));
    let (last, parents) = keys.split_last().expect("at least two keys");
    let mut node = table;
    for key in parents {
        let entry = match indexed(key).ok_or_else(|| bad(&format!("`{key}`: an index is [N]")))? {
            (name, None) => node.entry(name).or_insert_with(|| toml::Value::Table(toml::Table::new())),
            (name, Some(i)) => element(node, name, i)?,
        };
        node = entry.as_table_mut().ok_or_else(|| bad(&format!("`{key}` is not a section")))?;
    }
    match indexed(last).ok_or_else(|| bad(&format!("`{last}`: an index is [N]")))? {
        (name, None) => {
            node.insert(name.to_string(), value);
        }
        (name, Some(i)) => *element(node, name, i)? = value,
    }
    Ok(())
}

/// Element `i` of the list `name` in `node`, or why there is none.
fn list_element<'a>(node: &'a mut toml::Table, name: &str, i: usize) -> Result<&'a mut toml::Value, String> {
    let Some(list) = node.get_mut(name).and_then(toml::Value::as_array_mut) else {
        return Err(format!("`{name}` is no list here to index: give the whole list, {name}=[...]"));
    };
    let n = list.len();
    list.get_mut(i).ok_or_else(|| format!("`{name}` has {n} entries: indices 0 to {}", n.saturating_sub(1)))
}

/// A key and the list index it may carry: `sources[1]` is ("sources", Some(1)); None for a
/// malformed index.
fn indexed(key: &str) -> Option<(&str, Option<usize>)> {
    match key.split_once('[') {
        None => Some((key, None)),
        Some((name, rest)) => Some((name, Some(rest.strip_suffix(']')?.parse().ok()?))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_toml_values_and_create_sections() {
        let mut t: toml::Table = toml::from_str("[training]\nsteps = 5").unwrap();
        apply_override(&mut t, "training.steps=7").unwrap();
        apply_override(&mut t, "optimizer.lr=3e-4").unwrap();
        apply_override(&mut t, "data.tokenizer=bytes").unwrap();
        apply_override(&mut t, "data.train=[\"a\", \"b\"]").unwrap();
        assert_eq!(t["training"]["steps"].as_integer(), Some(7));
        assert_eq!(t["optimizer"]["lr"].as_float(), Some(3e-4));
        assert_eq!(t["data"]["tokenizer"].as_str(), Some("bytes"));
        assert_eq!(t["data"]["train"].as_array().map(|a| a.len()), Some(2));
        assert!(apply_override(&mut t, "steps").is_err());
        assert!(apply_override(&mut t, "training.steps.x=1").is_err());
        // An element of a list of tables, or the element whole.
        let mut t: toml::Table = toml::from_str(
            "[[data.sources]]\ntrain = [\"a\"]\nweight = 1.0\n[[data.sources]]\ntrain = [\"b\"]\nweight = 2.0",
        )
        .unwrap();
        apply_override(&mut t, "data.sources[1].weight=0.5").unwrap();
        apply_override(&mut t, "data.sources[0]={train=[\"c\"], weight=3.0}").unwrap();
        assert_eq!(t["data"]["sources"][1]["weight"].as_float(), Some(0.5));
        assert_eq!(t["data"]["sources"][0]["train"][0].as_str(), Some("c"));
        let err = apply_override(&mut t, "data.sources[2].weight=1").unwrap_err().to_string();
        assert!(err.contains("has 2 entries") && err.contains("0 to 1"), "{err}");
        let err = apply_override(&mut t, "training.steps[0]=1").unwrap_err().to_string();
        assert!(err.contains("no list here"), "{err}");
        assert!(apply_override(&mut t, "data.sources[x].weight=1").is_err());
    }
}
