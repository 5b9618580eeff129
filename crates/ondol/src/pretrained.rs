//! Models read from a directory (an ondol checkpoint or a Hugging Face model directory),
//! and what is done with them: evaluation, sampling, import.

use crate::config::{BYTE_EOT, BYTE_VOCAB, RunConfig};
use ondol_ckpt::{Snapshot, checkpoint, tensors};
use ondol_core::{Backend, Error, Result, Rng};
use ondol_data::chat::ChatTemplate;
use ondol_data::tokenizer::tokenizer_files;
use ondol_data::{ByteTokenizer, TextTokenizer};
use ondol_model::{InferenceCache, Model, ModelConfig, Workspace};
use std::path::{Path, PathBuf};

/// The model directory `path` names: itself, or where it is a run directory or a
/// checkpoints directory, or `checkpoints/latest`, the checkpoint `latest` names (else the
/// newest). Callers say which, where it is not `path`.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    if path.join("config.json").is_file() || path.join("trainer_state.json").is_file() {
        // A model directory (a damaged checkpoint too), whatever else it holds.
        return Ok(path.to_path_buf());
    }
    // (Absolute, so that `.` and `latest` have parents.)
    let abs = std::path::absolute(path).map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))?;
    let run = if abs.is_file() && abs.file_name().is_some_and(|n| n == "latest") {
        abs.parent().and_then(Path::parent)
    } else if abs.join("checkpoints").is_dir() || abs.join("ondol.toml").is_file() {
        Some(abs.as_path()) // (a run stopped before its first checkpoint has no checkpoints/)
    } else if abs.join("latest").is_file() {
        abs.parent()
    } else {
        None
    };
    let Some(run) = run else { return Ok(path.to_path_buf()) };
    if let Some(latest) = checkpoint::latest(run) {
        return Ok(latest);
    }
    let newest = checkpoint::list(run).into_iter().next();
    if let (Some(newest), Some(name)) = (&newest, checkpoint::dangling_latest(run)) {
        ondol_core::say!(
            "note: {} names {name}, which is gone: taking the newest checkpoint, {}",
            checkpoint::checkpoints_dir(run).join("latest").display(),
            newest.display()
        );
    }
    newest.ok_or_else(|| Error::Input(format!("{}: a run directory without a checkpoint", path.display())))
}

/// A model and its weights from a directory.
pub struct Pretrained {
    pub dir: PathBuf,
    pub model: Model,
    pub params: Vec<f32>,
    /// The run config, when the directory is an ondol checkpoint.
    pub run_config: Option<RunConfig>,
    /// The end-of-text and beginning-of-text ids config.json (or else generation_config.json)
    /// declares, if any.
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

impl Pretrained {
    /// Reads `dir`, verifying checksums first when it is an ondol checkpoint.
    pub fn load(dir: &Path) -> Result<Self> {
        checkpoint::check_model_dir(dir)?;
        if dir.join("trainer_state.json").exists() {
            checkpoint::verify_weights(dir)?;
        }
        let cfg = checkpoint::model_config(dir)?;
        let model = Model::new(cfg)?;
        let params =
            tensors::read_layout(&tensors::files_of(dir, "model")?, &model.layout, tensors::Contents::Weights)?;
        let toml = dir.join("ondol.toml");
        let run_config = match std::fs::read_to_string(&toml) {
            Ok(text) => Some(RunConfig::parse(&text, &toml.display().to_string(), &[])?),
            Err(_) => None,
        };
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).unwrap_or_default();
        let config = ondol_ckpt::hf::parse_config(&text, &config_path.display().to_string())?;
        // One id, or (Llama 3, Gemma 3) a list whose first is the end of text; an image-text
        // Gemma 3 gives it in generation_config.json alone.
        let generation = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        let id = |key: &str| {
            let of = |c: &serde_json::Value| {
                let v = c.get(key)?;
                v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()).map(|v| v as u32)
            };
            of(&config).or_else(|| generation.as_ref().and_then(of))
        };
        let (eos_token_id, bos_token_id) = (id("eos_token_id"), id("bos_token_id"));
        Ok(Self { dir: dir.to_path_buf(), model, params, run_config, eos_token_id, bos_token_id })
    }

    /// The starting point of a run whose `[model]` is `ours` (`init_from`): the directory must
    /// hold the same model.
    pub fn load_for(ours: &ModelConfig, dir: &Path) -> Result<Self> {
        let p = Self::load(dir)?;
        checkpoint::check_compatible(dir, &p.model.cfg, ours)?;
        Ok(p)
    }

    /// The directory's tokenizer.json, or byte-level where it has none and was trained on
    /// bytes: its run config says so, or (a Hugging Face directory) its vocabulary is the 257
    /// byte-level ids. Reading a BPE model's ids as bytes would print noise.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let file = self.dir.join("tokenizer.json");
        if file.exists() {
            let t = TextTokenizer::from_file_with_eot_id(&file, self.eos_token_id)?;
            return Ok(Tokenizer::Text(Box::new(t)));
        }
        let vocab = self.model.cfg.vocab_size;
        // (A starter config of an older `import hf` names no tokenizer: 257 ids are bytes.)
        let trained_with = self.run_config.as_ref().map(|run| run.data.tokenizer.as_deref());
        let bytes = match trained_with {
            Some(Some("bytes")) => vocab >= BYTE_VOCAB,
            Some(Some(_)) => false,
            Some(None) | None => vocab == BYTE_VOCAB,
        };
        if !bytes {
            return Err(Error::Input(format!(
                "{}: no tokenizer.json, and its {vocab} token ids are not bytes ({}): copy the tokenizer.json it \
                 was trained with into it",
                self.dir.display(),
                match trained_with {
                    Some(Some(t)) => format!("its run had data.tokenizer = {t:?}"),
                    Some(None) => "its run had no data.tokenizer".to_string(),
                    None => "a byte-level model has 257".to_string(),
                }
            )));
        }
        Ok(Tokenizer::Bytes(ByteTokenizer::new()))
    }

    /// A user's message `text` as the directory's chat template (chat_template.jinja, else
    /// its tokenizer_config.json's) renders it for a reply, in tokens, and the tokens that end
    /// the reply: `tok`'s end-of-text, the tokenizer's `eos_token`, and the first token the
    /// template closes an assistant's turn with (its end-of-turn, which base models' configs
    /// do not name as their eos).
    pub fn chat_prompt(&self, tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let file = ChatTemplate::file_in(&self.dir);
        let template = ChatTemplate::load(&file, &self.dir)
            .map_err(|e| Error::Input(format!("--chat needs the model's chat template: {e}")))?;
        let Tokenizer::Text(t) = tok else {
            return Err(Error::Input(format!(
                "--chat: {} has a chat template but no tokenizer.json",
                self.dir.display()
            )));
        };
        let message = serde_json::json!({ "role": "user", "content": text });
        let prompt = template.prompt(&[message]).map_err(|e| Error::Input(format!("{}: {e}", file.display())))?;
        let ids = t.encode_markup_with_starts(&prompt)?.into_iter().map(|(id, _)| id).collect();
        let mut stop = vec![t.eot_id()];
        stop.extend(template.special_token("eos_token").and_then(|eos| t.token_id(eos)));
        if let Some(end) = template.turn_end() {
            stop.extend(t.encode_markup_with_starts(&end)?.first().map(|&(id, _)| id));
        }
        Ok((ids, stop))
    }
}

/// The tokenizer of a model directory.
pub enum Tokenizer {
    Bytes(ByteTokenizer),
    Text(Box<TextTokenizer>),
}

impl Tokenizer {
    /// `text` as a document starts (a prompt): with the BOS a tokenizer's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes(t) => Ok(t.encode(text)),
            Tokenizer::Text(t) => Ok(t.encode_document(text)?),
        }
    }
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes(t) => Ok(t.decode(ids)),
            Tokenizer::Text(t) => Ok(t.decode(ids)?),
        }
    }
    pub fn eot_id(&self) -> u32 {
        match self {
            Tokenizer::Bytes(_) => BYTE_EOT,
            Tokenizer::Text(t) => t.eot_id(),
        }
    }
}

/// Sampling settings of `ondol generate`.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

/// Draws a token from one row of logits.
pub fn sample(logits: &[f32], s: Sampling, rng: &mut Rng) -> u32 {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    if s.temperature <= 0.0 {
        return argmax() as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| (((logits[i] - max) / s.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p as f64
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&order) {
        acc += p;
        if u < acc {
            return i as u32;
        }
    }
    order[probs.len() - 1] as u32
}

/// Continues `prompt` by up to `max_new` tokens, stopping at `eos`, with an inference cache
/// (attention's keys and values, Mamba mixers' recurrent states): each new token costs one
/// token's forward. The tokens come one at a time, as they are sampled, so that they can be
/// shown as they come.
pub struct Generation<'a, B: Backend> {
    be: &'a B,
    model: &'a Model,
    params: &'a B::Buf,
    cache: InferenceCache<B>,
    step: Workspace<B>,
    ids: B::Ids,
    rng: Rng,
    sampling: Sampling,
    /// The tokens that end the text (not handed out).
    stop: Vec<u32>,
    /// The token to hand out next, sampled but not yet fed back.
    next: u32,
    /// Tokens still to hand out.
    left: usize,
    /// Whether `next` has been fed back (the prompt's forward gave the first one).
    fed: bool,
}

impl<'a, B: Backend> Generation<'a, B> {
    pub fn new(
        be: &'a B,
        p: &'a Pretrained,
        params: &'a B::Buf,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        sampling: Sampling,
    ) -> Result<Self> {
        let model = &p.model;
        let max_seq = model.cfg.max_seq_len;
        if prompt.is_empty() || prompt.len() >= max_seq {
            return Err(Error::Input(format!("the prompt has {} tokens: it needs 1 to {}", prompt.len(), max_seq - 1)));
        }
        let vocab = model.cfg.vocab_size;
        let mut cache = InferenceCache::new(be, model, 1, max_seq);
        let mut ws = Workspace::new(be, model, 1, prompt.len())?;
        model.forward_cached(be, params, &mut ws, &be.upload_ids(prompt), &mut cache);
        let logits = model.logits(be, params, &mut ws);
        let mut rng = Rng::new(sampling.seed);
        let next = sample(&logits[(prompt.len() - 1) * vocab..], sampling, &mut rng);
        Ok(Self {
            be,
            model,
            params,
            cache,
            step: Workspace::new(be, model, 1, 1)?,
            ids: be.upload_ids(&[0]),
            rng,
            sampling,
            stop: stop.to_vec(),
            next,
            left: max_new.min(max_seq - prompt.len()),
            fed: true,
        })
    }
}

impl<B: Backend> Iterator for Generation<'_, B> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        if !self.fed {
            let (be, model, params) = (self.be, self.model, self.params);
            be.write_ids(&mut self.ids, &[self.next]);
            model.forward_cached(be, params, &mut self.step, &self.ids, &mut self.cache);
            self.next = sample(&model.logits(be, params, &mut self.step), self.sampling, &mut self.rng);
        }
        if self.stop.contains(&self.next) {
            self.left = 0;
            return None;
        }
        // Fed back on the next call only: the last token costs no forward.
        self.fed = false;
        self.left -= 1;
        Some(self.next)
    }
}

/// The text of generated tokens as they come: each token's new text, held back while the
/// text ends inside a character (a byte-level model spells a Korean syllable in three tokens),
/// so that no character is shown as U+FFFD because it was cut in two.
///
/// Each token decodes the ids from the start of the last piece handed out (the prompt, at
/// first), not the whole text: the new text is what follows that piece's own decoding, so a
/// decoder's treatment of a text's first token (Metaspace drops its leading space) falls on
/// both sides alike, and the cost per token does not grow with the text.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// `ids[piece..shown]` is the last piece handed out (the prompt, at first), whose text
    /// decoded alone is `piece_len` bytes long.
    piece: usize,
    shown: usize,
    piece_len: usize,
}

impl<'a> TextStream<'a> {
    /// The stream of what follows `prompt`, whose text is not handed out: decoded with it, so
    /// that a decoder that drops a leading space at the start of a text keeps the first one.
    pub fn after(tok: &'a Tokenizer, prompt: &[u32]) -> Result<Self> {
        let piece_len = tok.decode(prompt)?.len();
        Ok(Self { tok, ids: prompt.to_vec(), piece: 0, shown: prompt.len(), piece_len })
    }

    /// The text `id` adds that can be shown now (often empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids[self.piece..])?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // (Where the piece's text changed with what followed, which byte-level and Metaspace
        // decoders do not do, the change is not shown: what was shown is out.)
        let from = (self.piece_len..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        let new = text[from..].to_string();
        (self.piece, self.shown) = (self.shown, self.ids.len());
        self.piece_len = self.tok.decode(&self.ids[self.piece..])?.len();
        Ok(new)
    }

    /// The tokens held back at the end, which do not make a whole character.
    pub fn unfinished(&self) -> usize {
        self.ids.len() - self.shown
    }
}

/// Writes the Hugging Face model in `src` as an ondol checkpoint directory `out` (step 0, f32
/// weights only), with a starter run config whose `[model]` continues from it.
/// Returns warnings about fields accepted but not applied.
pub fn import_hf(src: &Path, out: &Path) -> Result<Vec<String>> {
    // The checkpoint replaces its directory whole: never one that holds anything.
    let holds_files = std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_some());
    if out.exists() && (!out.is_dir() || holds_files) {
        return Err(Error::Input(format!(
            "{}: exists and is not an empty directory; give --out a new or empty directory (nothing was written)",
            out.display()
        )));
    }
    let path = src.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    let file = path.display().to_string();
    let (mut cfg, warnings) = ondol_ckpt::hf::from_hf_config(&ondol_ckpt::hf::parse_config(&text, &file)?, &file)?;
    let p = Pretrained::load(src)?;
    // Absolute, so the starter config works from any working directory.
    let out_abs = std::path::absolute(out).map_err(|e| Error::io(format!("cannot resolve {}", out.display()), e))?;
    cfg.init_from = Some(out_abs.display().to_string());
    // Serialized under a `model` key, so nested tables come out as [model.ssm].
    #[derive(serde::Serialize)]
    struct Section<'a> {
        model: &'a ModelConfig,
    }
    let model_toml = toml::to_string(&Section { model: &cfg }).expect("model config serializes");
    let model_toml = model_toml.trim_end();
    let seq = cfg.max_seq_len.min(1024);
    // Fine-tuning data is tokenized with the model's own tokenizer, which the checkpoint keeps
    // (shards from `ondol data prepare --tokenizer OUT/tokenizer.json`), or read as bytes.
    let shards = "train = [\"data/train_*.bin\"]\nval = [\"data/val_*.bin\"]\n";
    let tokenizer = p.tokenizer();
    let data = match &tokenizer {
        Ok(Tokenizer::Text(t)) => {
            let file = toml::Value::String(out_abs.join("tokenizer.json").display().to_string());
            let eot = match t.eot_token() {
                eot if eot == ondol_data::tokenizer::EOT_TOKEN => String::new(),
                eot => format!("eot_token = {}\n", toml::Value::String(eot)),
            };
            format!("{shards}tokenizer = {file}\n{eot}")
        }
        // (Some text held out, so that the fine-tune's validation loss shows over-fitting.)
        Ok(Tokenizer::Bytes(_)) => {
            "train = [\"data/*.txt\"]\nval_fraction = 0.05\nformat = \"text\"\ntokenizer = \"bytes\"\n".to_string()
        }
        Err(_) if !src.join("tokenizer.json").is_file() => {
            format!("{shards}# tokenizer = \"...\": {} has no tokenizer.json\n", src.display())
        }
        // It is copied, but does not load as the model says (an end-of-text id it lacks, say).
        Err(e) => {
            let file = toml::Value::String(out_abs.join("tokenizer.json").display().to_string());
            let why = e.to_string().replace('\n', " ");
            format!(
                "{shards}tokenizer = {file}\n# eot_token = \"...\": set it; the tokenizer does not load as it is: {why}\n"
            )
        }
    };
    let run_config = format!(
        "# Fine-tuning starter written by `ondol import hf {src}`: point [data] at your data,\n\
         # adjust [training], then `ondol train` this file. The weights load from init_from.\n\n\
         {model_toml}\n\n[training]\nsteps = 1000\nbatch_size = 8\nseq_len = {seq}\n\n\
         [data]\n{data}\n\
         [optimizer]\nlr = 1e-5\nweight_decay = 0.0\n\n[lr_scheduler]\nwarmup_steps = 50\n",
        src = src.display()
    );
    RunConfig::parse(&run_config, "the generated ondol.toml", &[])?;
    // (With its companions: the special tokens and the chat template, which transformers 5
    // keeps in chat_template.jinja.)
    let extra_files = tokenizer_files(&src.join("tokenizer.json")).into_iter().filter(|(_, f)| f.is_file()).collect();
    let snap = Snapshot {
        model: cfg,
        layout: p.model.layout.clone(),
        params: p.params,
        moments: None, // a run starts from these weights (init_from) with AdamW's state fresh
        step: 0,
        tokens: 0,
        data: serde_json::to_value(ondol_data::Cursor::default()).expect("cursor serializes"),
        data_tokens: None,
        data_files: None,
        parallel: ondol_ckpt::Layout { tp: 1, pp: 1, dp: 1 },
        run_config,
        extra_files,
        eos_token_id: p.eos_token_id,
        bos_token_id: p.bos_token_id,
        eos_token: match tokenizer {
            Ok(Tokenizer::Text(t)) => Some(t.eot_token().to_string()),
            _ => None,
        },
        max_shard_bytes: 5_000_000_000,
    };
    checkpoint::save_to(out, &snap)?;
    Ok(warnings)
}
