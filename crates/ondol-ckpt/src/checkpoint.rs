//! Checkpoint directories: `<run>/checkpoints/step-XXXXXXXX/` is a Hugging Face model
//! directory (config.json, generation_config.json, model.safetensors or shards,
//! tokenizer.json) plus what resuming needs: `ondol.toml` (the run config),
//! `optimizer/exp_avg.safetensors` and `optimizer/exp_avg_sq.safetensors` (AdamW moments by
//! global name; a Gemma 3's also `optimizer/norm_scales.safetensors`, see
//! [`scales_stored_minus_one`]), and `trainer_state.json` (step, tokens, data position,
//! layout, and the SHA-256 of every other file). A checkpoint of weights only (`ondol import hf`'s, or one
//! whose `optimizer/` was deleted to save space) serves evaluation, generation and
//! `init_from`; resuming needs the moments.
//!
//! The parameters are f32 on every backend (the master weights), and `model.safetensors`
//! holds them as transformers reads them.
//!
//! Crash safety: a checkpoint is written into `.step-XXXXXXXX.tmp`, every file and the
//! directory are fsynced, and only then is it renamed into place; `checkpoints/latest` (a
//! one-line file naming the newest complete checkpoint) is replaced by rename as well. A
//! process killed at any moment leaves the previous checkpoint intact; its leftover temporary
//! directory is removed on the next start. On load every checksum is verified.

use crate::hf;
use crate::tensors::{Contents, files_of, read_layout, write_json, write_layout};
use ondol_core::{Error, Result};
use ondol_model::{ModelConfig, ParamLayout, RopeScaling};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "ondol-checkpoint-1";

/// The parallel layout that wrote a checkpoint (tensors are stored whole regardless).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    /// Optimizer updates completed.
    pub step: u64,
    pub tokens: u64,
    /// The data loader's position, opaque here (owned by the trainer).
    pub data: serde_json::Value,
    /// Tokens in each training source as the run read them (after any validation split),
    /// so that a resume sees files changed under the same names; none in checkpoints of
    /// earlier ondol versions and of imported weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_tokens: Option<Vec<u64>>,
    /// The files of each training source (canonical paths, in reading order), so that a
    /// resume whose patterns are written otherwise but match the same files goes on; none
    /// where `data_tokens` is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_files: Option<Vec<Vec<String>>>,
    pub layout: Layout,
    /// SHA-256 (hex) of every file of the checkpoint but this one, by relative path.
    pub files: BTreeMap<String, String>,
}

impl TrainerState {
    /// 64 bits that tell checkpoints apart, for ranks that each load their own to check they
    /// loaded the same one: from a SHA-256 over the step, the token count and every file's
    /// checksum (so over the weights, the optimizer state and the data position).
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = Sha256::new();
        hasher.update(self.step.to_le_bytes());
        hasher.update(self.tokens.to_le_bytes());
        for (file, sum) in &self.files {
            hasher.update(file.as_bytes());
            hasher.update(sum.as_bytes());
        }
        u64::from_le_bytes(hasher.finalize()[..8].try_into().expect("a SHA-256 has 8 bytes"))
    }
}

/// Everything a checkpoint stores, in host memory: what a background writer owns.
pub struct Snapshot {
    pub model: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    /// AdamW's state; none for a checkpoint of weights only.
    pub moments: Option<Moments>,
    pub step: u64,
    pub tokens: u64,
    pub data: serde_json::Value,
    /// See [`TrainerState::data_tokens`].
    pub data_tokens: Option<Vec<u64>>,
    /// See [`TrainerState::data_files`].
    pub data_files: Option<Vec<Vec<String>>>,
    pub parallel: Layout,
    /// The resolved run config (TOML) written as `ondol.toml`.
    pub run_config: String,
    /// Files copied in, as (name in the checkpoint, source): tokenizer.json and its companions,
    /// under the names transformers looks for whatever the sources are called.
    pub extra_files: Vec<(String, PathBuf)>,
    pub eos_token_id: Option<u32>,
    /// The token every text starts with (Gemma's and Llama 3's BOS); none: the end-of-text,
    /// as in GPT-2.
    pub bos_token_id: Option<u32>,
    /// The end-of-text token's text: with a tokenizer.json among the files and no
    /// tokenizer_config.json, one is written naming it.
    pub eos_token: Option<String>,
    /// Shard the model file above this size (bytes).
    pub max_shard_bytes: u64,
}

/// AdamW's first and second moments, as the flat parameter buffer lays them out.
pub struct Moments {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("cannot sync {}", dir.display())))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io(format!("cannot read {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the checkpoint of `snap` into `<run_dir>/checkpoints/step-XXXXXXXX` atomically and
/// points `latest` at it. Returns its path.
pub fn save(run_dir: &Path, snap: &Snapshot) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let name = step_name(snap.step);
    let dst = root.join(&name);
    save_to(&dst, snap)?;
    let latest_tmp = root.join(temp_name("latest"));
    fs::write(&latest_tmp, format!("{name}\n"))
        .and_then(|_| File::open(&latest_tmp)?.sync_all())
        .and_then(|_| fs::rename(&latest_tmp, root.join("latest")))
        .map_err(io(format!("cannot update {}", root.join("latest").display())))?;
    sync_dir(&root)?;
    Ok(dst)
}

/// Writes the checkpoint of `snap` as the directory `dst`, atomically: into a temporary
/// sibling first, renamed into place once every byte is on disk.
pub fn save_to(dst: &Path, snap: &Snapshot) -> Result<()> {
    let root = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(root).map_err(io(format!("cannot create {}", root.display())))?;
    let name = dst.file_name().map_or("checkpoint".into(), |n| n.to_string_lossy().into_owned());
    let tmp = root.join(temp_name(&name));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(format!("cannot remove {}", tmp.display())))?;
    }
    fs::create_dir_all(&tmp).map_err(io(format!("cannot create {}", tmp.display())))?;

    let mut files = vec!["config.json".to_string(), "generation_config.json".to_string()];
    let (mut config, mut generation) =
        (hf::to_hf_config(&snap.model, snap.eos_token_id), hf::generation_config(snap.eos_token_id));
    if let Some(bos) = snap.bos_token_id {
        (config["bos_token_id"], generation["bos_token_id"]) = (bos.into(), bos.into());
    }
    write_json(&tmp.join("config.json"), &config)?;
    write_json(&tmp.join("generation_config.json"), &generation)?;
    files.extend(write_layout(&tmp, "model", &snap.layout, &snap.params, Contents::Weights, snap.max_shard_bytes)?);
    if let Some(m) = &snap.moments {
        let opt = tmp.join("optimizer");
        fs::create_dir_all(&opt).map_err(io(format!("cannot create {}", opt.display())))?;
        for (stem, data) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
            let written = write_layout(&opt, stem, &snap.layout, data, Contents::AsIs, snap.max_shard_bytes)?;
            files.extend(written.into_iter().map(|f| format!("optimizer/{f}")));
        }
        if let Some((scales, ranges)) = scales_stored_minus_one(&snap.layout) {
            let exact: Vec<f32> = ranges.iter().flat_map(|r| snap.params[r.clone()].iter().copied()).collect();
            let written = write_layout(&opt, NORM_SCALES, &scales, &exact, Contents::AsIs, snap.max_shard_bytes)?;
            files.extend(written.into_iter().map(|f| format!("optimizer/{f}")));
        }
        sync_dir(&opt)?;
    }
    let toml_path = tmp.join("ondol.toml");
    fs::write(&toml_path, &snap.run_config)
        .and_then(|_| File::open(&toml_path)?.sync_all())
        .map_err(io(format!("cannot write {}", toml_path.display())))?;
    files.push("ondol.toml".into());
    for (name, source) in &snap.extra_files {
        let copy = tmp.join(name);
        fs::copy(source, &copy)
            .and_then(|_| File::open(&copy)?.sync_all())
            .map_err(io(format!("cannot copy {} into the checkpoint", source.display())))?;
        files.push(name.clone());
    }
    let has = |name: &str| snap.extra_files.iter().any(|(n, _)| n == name);
    if let Some(eos) = snap.eos_token.as_deref().filter(|_| has("tokenizer.json") && !has("tokenizer_config.json")) {
        write_json(&tmp.join("tokenizer_config.json"), &hf::tokenizer_config(eos, snap.model.max_seq_len))?;
        files.push("tokenizer_config.json".into());
    }

    let mut checksums = BTreeMap::new();
    for f in &files {
        checksums.insert(f.clone(), sha256_file(&tmp.join(f))?);
    }
    let state = TrainerState {
        format: FORMAT.into(),
        step: snap.step,
        tokens: snap.tokens,
        data: snap.data.clone(),
        data_tokens: snap.data_tokens.clone(),
        data_files: snap.data_files.clone(),
        layout: snap.parallel,
        files: checksums,
    };
    write_json(&tmp.join("trainer_state.json"), &serde_json::to_value(&state).expect("state serializes"))?;
    sync_dir(&tmp)?;

    if dst.exists() {
        fs::remove_dir_all(dst).map_err(io(format!("cannot replace {}", dst.display())))?;
    }
    fs::rename(&tmp, dst).map_err(io(format!("cannot move {} into place", tmp.display())))?;
    sync_dir(root)
}

/// Complete checkpoints of a run, newest first.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    list_steps(run_dir).into_iter().map(|(_, p)| p).collect()
}

/// Complete checkpoints of a run with their steps, newest first.
pub fn list_steps(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let root = checkpoints_dir(run_dir);
    let mut steps: Vec<(u64, PathBuf)> = fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    steps
}

/// The checkpoint `latest` names, if any.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let name = fs::read_to_string(root.join("latest")).ok()?;
    let dir = root.join(name.trim());
    dir.is_dir().then_some(dir)
}

/// What `checkpoints/latest` names where that is no checkpoint of the run (gone since, say),
/// for callers that take another and say so.
pub fn dangling_latest(run_dir: &Path) -> Option<String> {
    let name = fs::read_to_string(checkpoints_dir(run_dir).join("latest")).ok()?;
    latest(run_dir).is_none().then(|| name.trim().to_string())
}

/// Removes temporary directories left by a writer that was killed.
pub fn remove_stale(run_dir: &Path) -> Result<()> {
    let root = checkpoints_dir(run_dir);
    for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temp_name(&name) {
            let path = entry.path();
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.map_err(io(format!("cannot remove stale {}", path.display())))?;
        }
    }
    Ok(())
}

/// After writing the checkpoint of step `written`: deletes the `abandoned` ones it has passed
/// (of a continuation the run left by resuming from an earlier checkpoint; one at `written`
/// itself was just replaced), then all but the newest `keep_last` of the rest up to `written`
/// (0 keeps all). Abandoned checkpoints of later steps stay until the run passes them: they
/// are not the newest of this run, and counting them would delete what it just wrote.
fn prune(run_dir: &Path, keep_last: usize, written: u64, abandoned: &[u64]) -> Result<()> {
    let (passed, ours): (Vec<_>, Vec<_>) = list_steps(run_dir)
        .into_iter()
        .filter(|(step, _)| *step <= written)
        .partition(|(step, _)| *step != written && abandoned.contains(step));
    let surplus = if keep_last == 0 { Vec::new() } else { ours.into_iter().skip(keep_last).collect() };
    for (_, old) in passed.into_iter().chain(surplus) {
        fs::remove_dir_all(&old).map_err(io(format!("cannot remove {}", old.display())))?;
    }
    Ok(())
}

/// A verified checkpoint read back into memory.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    /// The run config the checkpoint was written with.
    pub run_config: String,
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// The temporary sibling that the directory or file `name` is written as, then renamed.
fn temp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Whether `name` is such a temporary: being written, or left by a writer that was killed.
fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Refuses what cannot be a model directory (a checkpoint, or a Hugging Face one): a file, a
/// missing path, or a checkpoint's temporary, half-written or still being written.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    let what = if dir.is_file() {
        "a file"
    } else if !dir.is_dir() {
        "no such directory"
    } else if dir.file_name().is_some_and(|n| is_temp_name(&n.to_string_lossy())) {
        "a checkpoint being written, or left half-written by an interrupted save (ondol writes into \
         .NAME.tmp and renames it when complete)"
    } else {
        return Ok(());
    };
    Err(Error::Input(format!(
        "{}: {what}; a model is a checkpoint (checkpoints/step-XXXXXXXX) or Hugging Face directory",
        dir.display()
    )))
}

/// Reads `trainer_state.json` and checks the whole checkpoint, AdamW's state included, as a
/// resume reads it: every file that loading reads must be listed, every listed file's SHA-256
/// must match, its step must be its directory's.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    check_model_dir(dir)?;
    if !dir.join("config.json").is_file() && !dir.join("trainer_state.json").is_file() {
        return Err(Error::Input(format!(
            "{}: not a checkpoint (no config.json, no trainer_state.json); a checkpoint is a run's \
             checkpoints/step-XXXXXXXX directory",
            dir.display()
        )));
    }
    let opt = dir.join("optimizer");
    if !opt.is_dir() {
        return Err(Error::Input(format!(
            "{}: weights only (no {}: AdamW's state, which a resume goes on with); start a run from its weights \
             with model.init_from",
            dir.display(),
            opt.display()
        )));
    }
    verify_files(dir, true)
}

/// Checks what evaluation, generation and `init_from` read of a checkpoint (its config, weights
/// and tokenizer), as [`verify`] does, whether or not it holds AdamW's state.
pub fn verify_weights(dir: &Path) -> Result<TrainerState> {
    verify_files(dir, false)
}

/// Reads `trainer_state.json` alone, checking no other file (what `inspect` shows without
/// reading a large checkpoint's every byte).
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    check_model_dir(dir)?;
    let state_path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&state_path).map_err(|_| {
        Error::Input(format!("{}: not a complete ondol checkpoint (no trainer_state.json)", dir.display()))
    })?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: damaged: {e}", state_path.display())))?;
    if state.format != FORMAT {
        return Err(Error::Input(format!(
            "{}: format {:?}, this ondol reads {FORMAT:?}",
            state_path.display(),
            state.format
        )));
    }
    Ok(state)
}

fn verify_files(dir: &Path, with_moments: bool) -> Result<TrainerState> {
    let state = read_state(dir)?;
    let state_path = dir.join("trainer_state.json");
    // Every file that loading reads must be checksummed (the state itself is checked by
    // what it must agree with: its directory's step and a valid layout).
    let mut read = vec![PathBuf::from("config.json"), PathBuf::from("ondol.toml")];
    read.extend(dir.join("tokenizer.json").is_file().then(|| PathBuf::from("tokenizer.json")));
    let mut moments = if with_moments { vec![("optimizer", "exp_avg"), ("optimizer", "exp_avg_sq")] } else { vec![] };
    if with_moments && has_files(&dir.join("optimizer"), NORM_SCALES) {
        moments.push(("optimizer", NORM_SCALES));
    }
    for &(sub, stem) in [("", "model")].iter().chain(&moments) {
        let index = dir.join(sub).join(format!("{stem}.safetensors.index.json"));
        read.extend(
            index
                .is_file()
                .then_some(index)
                .into_iter()
                .chain(files_of(&dir.join(sub), stem)?)
                .filter_map(|f| f.strip_prefix(dir).ok().map(Path::to_path_buf)),
        );
    }
    for file in read {
        if !state.files.contains_key(&file.to_string_lossy().replace('\\', "/")) {
            return Err(Error::Input(format!(
                "{}: not among the checksums of {} (the checkpoint is damaged or was edited)",
                dir.join(&file).display(),
                state_path.display()
            )));
        }
    }
    let named_step = dir.file_name().and_then(|n| n.to_str()?.strip_prefix("step-")?.parse::<u64>().ok());
    if named_step.is_some_and(|n| n != state.step) {
        return Err(Error::Input(format!(
            "{}: step {} in the directory of step {} (the checkpoint is damaged or was edited)",
            state_path.display(),
            state.step,
            named_step.unwrap_or_default()
        )));
    }
    let l = state.layout;
    if l.tp == 0 || l.pp == 0 || l.dp == 0 {
        return Err(Error::Input(format!(
            "{}: layout tp = {}, pp = {}, dp = {} has a zero size (damaged or edited)",
            state_path.display(),
            l.tp,
            l.pp,
            l.dp
        )));
    }
    for (file, want) in state.files.iter().filter(|(f, _)| with_moments || !f.starts_with("optimizer/")) {
        let path = dir.join(file);
        if !path.is_file() {
            return Err(Error::Input(format!("{}: missing (the checkpoint is damaged)", path.display())));
        }
        if &sha256_file(&path)? != want {
            return Err(Error::Input(format!("{}: checksum mismatch (the file is damaged)", path.display())));
        }
    }
    Ok(state)
}

/// The stem of the exact norm scales of a checkpoint that resumes (see
/// [`scales_stored_minus_one`]), under `optimizer/`.
const NORM_SCALES: &str = "norm_scales";

/// Whether `dir` holds `<stem>.safetensors` or its index.
fn has_files(dir: &Path, stem: &str) -> bool {
    ["safetensors", "safetensors.index.json"].iter().any(|ext| dir.join(format!("{stem}.{ext}")).is_file())
}

/// The tensors that model files store minus one (Gemma 3's norm scales), as a layout of their
/// own, and their ranges in `layout`'s flat buffer; none in other models. Below 0.5, `x - 1`
/// in f32 drops bits of `x`, so a checkpoint that resumes keeps their exact values too.
fn scales_stored_minus_one(layout: &ParamLayout) -> Option<(ParamLayout, Vec<Range<usize>>)> {
    let shifted: Vec<_> = layout.params().iter().filter(|p| p.stored_minus_one).collect();
    if shifted.is_empty() {
        return None;
    }
    let mut scales = ParamLayout::default();
    for p in &shifted {
        scales.add(ondol_model::Path::new(&p.name), &p.shape, p.init, p.decay);
    }
    Some((scales, shifted.iter().map(|p| p.range()).collect()))
}

/// The model config a checkpoint (or any Hugging Face directory) declares in config.json.
pub fn model_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = fs::read_to_string(&path).map_err(io(format!("cannot read {}", path.display())))?;
    let file = path.display().to_string();
    Ok(hf::from_hf_config(&hf::parse_config(&text, &file)?, &file)?.0)
}

/// Errors unless the model in `dir` (declared as `theirs`) is the model a run configures
/// (`ours`): same architecture, sizes and numerics, each difference named by its key.
pub fn check_compatible(dir: &Path, theirs: &ModelConfig, ours: &ModelConfig) -> Result<()> {
    let describe = |c: &ModelConfig| -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("arch", format!("{:?}", c.arch).to_lowercase()),
            ("vocab_size", c.vocab_size.to_string()),
            ("d_model", c.d_model.to_string()),
            ("n_layers", c.n_layers.to_string()),
            ("n_heads", c.n_heads.to_string()),
            ("n_kv_heads", c.kv_heads().to_string()),
            ("ffn_hidden", c.ffn().to_string()),
            ("tie_embeddings", c.tied().to_string()),
            ("norm_eps", c.norm_eps.to_string()),
            ("pattern", c.pattern.clone().unwrap_or_default()),
        ];
        if c.has_attention() {
            v.push(("head_dim", c.head_dim().to_string()));
        }
        // Only GPT-2's learned positions store max_seq_len in the weights: rotary positions
        // (Llama), none (Nemotron-H's attention) and the Mamba mixers take any length.
        if c.arch == ondol_model::Arch::Gpt2 {
            v.push(("max_seq_len", c.max_seq_len.to_string()));
        }
        if c.llama_family() {
            v.push(("rope_theta", c.rope_theta.to_string()));
            v.push(("rope_theta_local", c.rope_theta_local.map_or("none".to_string(), |t| t.to_string())));
            v.push(("rope_scaling", c.rope_scaling.as_ref().map_or("none".to_string(), RopeScaling::describe)));
            v.push(("qkv_bias", c.qkv_bias.to_string()));
            v.push(("qk_norm", c.qk_norm.to_string()));
            v.push(("block_norms", format!("{:?}", c.block_norms).to_lowercase()));
            v.push(("sliding_window", c.sliding_window.map_or("none".to_string(), |w| w.to_string())));
            v.push(("attention_pattern", c.attention_layers()));
            // (The attention multiplier as applied: one given as 1 / sqrt(head_dim) is the default,
            // which config.json may spell either way.)
            let m = &c.mup;
            let attention = c.attention_scale();
            v.push((
                "mup",
                format!(
                    "embedding {}, residual {}, logits {}, attention {attention:.9e}",
                    m.embedding_multiplier, m.residual_multiplier, m.logits_multiplier,
                ),
            ));
        }
        if c.layer_kinds().contains(&ondol_model::LayerKind::Mamba) {
            let s = &c.ssm;
            v.extend([
                ("ssm.state_size", c.ssm_state().to_string()),
                ("ssm.conv_kernel", s.conv_kernel.to_string()),
                ("ssm.expand", s.expand.to_string()),
            ]);
            if c.arch == ondol_model::Arch::Mamba {
                v.push(("ssm.time_step_rank", c.ssm_rank().to_string()));
            } else {
                v.extend([("ssm.head_dim", s.head_dim.to_string()), ("ssm.n_groups", s.n_groups.to_string())]);
            }
        }
        v
    };
    for ((key, have), (_, want)) in describe(theirs).into_iter().zip(describe(ours)) {
        if have != want {
            return Err(Error::config(
                format!("model.{key}"),
                format!("the run has {want}, but {} holds a model with {have}", dir.display()),
            ));
        }
    }
    Ok(())
}

/// Loads a checkpoint for a model configured as `model` (laid out as `layout`), verifying
/// every file first and refusing one written for another architecture or size.
pub fn load(dir: &Path, model: &ModelConfig, layout: &ParamLayout) -> Result<Loaded> {
    let state = verify(dir)?;
    check_compatible(dir, &model_config(dir)?, model)?;
    let run_config = fs::read_to_string(dir.join("ondol.toml"))
        .map_err(io(format!("cannot read {}", dir.join("ondol.toml").display())))?;
    let mut params = read_layout(&files_of(dir, "model")?, layout, Contents::Weights)?;
    let opt = dir.join("optimizer");
    if let Some((scales, ranges)) = scales_stored_minus_one(layout)
        && has_files(&opt, NORM_SCALES)
    {
        let exact = read_layout(&files_of(&opt, NORM_SCALES)?, &scales, Contents::AsIs)?;
        let mut from = 0;
        for r in ranges {
            params[r.clone()].copy_from_slice(&exact[from..from + r.len()]);
            from += r.len();
        }
    }
    let exp_avg = read_layout(&files_of(&opt, "exp_avg")?, layout, Contents::AsIs)?;
    let exp_avg_sq = read_layout(&files_of(&opt, "exp_avg_sq")?, layout, Contents::AsIs)?;
    Ok(Loaded { dir: dir.to_path_buf(), state, run_config, params, exp_avg, exp_avg_sq })
}

/// Writes checkpoints on a background thread, so training goes on while the bytes go to
/// disk; the step only pays for copying the state into the [`Snapshot`]. One write is in
/// flight at a time: the next submission waits for it.
pub struct Writer {
    run_dir: PathBuf,
    keep_last: usize,
    /// Steps of the run directory's checkpoints past the step the run started at: a
    /// continuation abandoned by resuming from an earlier checkpoint, removed as the run
    /// passes them (see [`Writer::abandoned`]).
    abandoned: Vec<u64>,
    pending: Option<std::thread::JoinHandle<Result<PathBuf>>>,
}

impl Writer {
    /// A writer for `run_dir`, whose run starts at step `start`; removes temporary
    /// directories a killed writer left behind.
    pub fn new(run_dir: &Path, keep_last: usize, start: u64) -> Result<Self> {
        remove_stale(run_dir)?;
        let abandoned = list_steps(run_dir).into_iter().map(|(step, _)| step).filter(|&s| s > start).collect();
        Ok(Self { run_dir: run_dir.to_path_buf(), keep_last, abandoned, pending: None })
    }

    /// Steps of the checkpoints after the one the run resumed from, newest first: each is
    /// replaced or removed when the run writes a checkpoint at or past its step.
    pub fn abandoned(&self) -> &[u64] {
        &self.abandoned
    }

    pub fn submit(&mut self, snap: Snapshot) -> Result<()> {
        self.wait()?;
        let (dir, keep, step) = (self.run_dir.clone(), self.keep_last, snap.step);
        let abandoned = self.abandoned.clone();
        self.abandoned.retain(|&s| s > step);
        self.pending = Some(std::thread::spawn(move || {
            let path = save(&dir, &snap)?;
            prune(&dir, keep, step, &abandoned)?;
            Ok(path)
        }));
        Ok(())
    }

    /// Waits for the write in flight, if any; returns the checkpoint it completed.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        match self.pending.take() {
            None => Ok(None),
            Some(handle) => {
                handle.join().map_err(|_| Error::Training("the checkpoint writer panicked".into()))?.map(Some)
            }
        }
    }
}
