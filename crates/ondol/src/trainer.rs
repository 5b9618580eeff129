//! The training loop. [`Trainer::step`] is one optimizer update: this replica's micro-batches,
//! the learning rate, and the rank's [`Engine`] (pipeline schedule, gradient sync, AdamW).

use crate::config::{BYTE_EOT, DataFormat, OnDataChange, RunConfig, plain_path};
use crate::metrics::{Metrics, StepRow};
use crate::pretrained::Pretrained;
use ondol_ckpt::{Loaded, Moments, Snapshot, Writer};
use ondol_comm::{Communicator, Mesh, RankComms};
use ondol_core::backend::document_starts;
use ondol_core::{Backend, Error, IGNORED_TARGET, Result};
use ondol_data::tokenizer::tokenizer_files;
use ondol_data::{
    Cursor, Loader, Mixture, MixtureCursor, Order, SourceKind, TextTokenizer, TokenStream, expand_globs, file_identity,
};
use ondol_model::{Arch, Model, ModelConfig, Workspace};
use ondol_optim::LrSchedule;
use ondol_parallel::Engine;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Training and validation token streams, opened and split as the config says, and the
/// tokenizer.json they were made with, if any.
#[derive(Clone)]
pub struct Data {
    /// One stream per source (`data.train` is one source; `[[data.sources]]` several).
    pub train: Vec<Arc<TokenStream>>,
    pub val: Option<Arc<TokenStream>>,
    pub tokenizer: Option<PathBuf>,
}

impl Data {
    pub fn open(cfg: &RunConfig, base: &Path) -> Result<Self> {
        crate::prepare_cli::prepare_for_run(cfg, base)?;
        let d = &cfg.data;
        let kind = match d.format {
            DataFormat::Shards => SourceKind::Shards,
            DataFormat::Text => SourceKind::ByteText,
        };
        let mut fields: Vec<(String, &[String])> = if d.sources.is_empty() {
            vec![("data.train".into(), &d.train)]
        } else {
            d.sources
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("data.sources[{i}].train"), s.train.as_slice()))
                .collect()
        };
        if !d.val.is_empty() {
            fields.push(("data.val".into(), &d.val));
        }
        let files = fields
            .iter()
            .map(|(field, patterns)| Ok((field.as_str(), expand_globs(patterns, base)?)))
            .collect::<Result<Vec<_>>>()?;
        check_disjoint(&files)?;
        let mut train = files.iter().map(|(_, f)| TokenStream::open(f, kind)).collect::<Result<Vec<_>, _>>()?;
        let val = if !d.val.is_empty() {
            train.pop() // data.val's, the last field
        } else if d.val_fraction > 0.0 {
            // The tail of every file of every source, as one validation stream.
            let (heads, tails): (Vec<_>, Vec<_>) = train
                .into_iter()
                .map(|t| t.split_tail(d.val_fraction))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            train = heads;
            Some(TokenStream::concat(tails))
        } else {
            None
        };
        let tokenizer = d.tokenizer.as_deref().filter(|t| *t != "bytes").map(|t| base.join(t));
        Ok(Self { train: train.into_iter().map(Arc::new).collect(), val: val.map(Arc::new), tokenizer })
    }
}

/// Refuses a file that two of the data fields match (each field with its files): a file in two
/// sources is read under both weights, and a validation file that is also trained on measures
/// memorisation. Paths are compared canonicalized, so `data/x.bin` and `./data/x.bin` are one file.
fn check_disjoint(files: &[(&str, Vec<PathBuf>)]) -> Result<()> {
    let mut owner: HashMap<PathBuf, &str> = HashMap::new();
    for (field, paths) in files {
        for path in paths {
            if let Some(first) = owner.insert(file_identity(path), field) {
                let why = if *field == "data.val" {
                    "validation on data that is trained on measures memorisation, not generalisation"
                } else {
                    "a file belongs to one source, whose weight says how often it is read"
                };
                return Err(Error::config(
                    *field,
                    format!("matches {}, which {first} matches too: {why}; narrow one of the patterns", path.display()),
                ));
            }
        }
    }
    Ok(())
}

/// FNV-1a over `values`: the same on every rank and build, for ranks comparing what they read.
fn fnv1a(values: impl IntoIterator<Item = u64>) -> u64 {
    values.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, v| (h ^ v).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The first rank whose value is not rank 0's, and every rank's value.
type Disagreement = (usize, Vec<(u64, u64)>);

/// What one optimizer step produced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f32,
    /// Seconds this rank waited for its pipeline neighbours.
    pub pipeline_wait_s: f64,
    /// The signal that asked some rank to stop (see [`crate::stop_signal`]): the run stops here.
    pub stop: Option<i32>,
    /// The step's training FLOPs, as [`Model::flops_per_token`] counts them; where documents
    /// attend only within their own, with the keys this replica's tokens attended.
    pub flops: f64,
}

/// Everything one rank of a training run holds: its [`Engine`] (model chunks, state,
/// optimizer, communicators), the schedule, and its data position.
pub struct Trainer<B: Backend> {
    pub cfg: RunConfig,
    pub engine: Engine<B>,
    sched: LrSchedule,
    loader: Batches,
    /// Tokens in each training source, and its files (canonical paths, in reading order):
    /// checkpoints record both (see [`Self::restore`]).
    data_tokens: Vec<u64>,
    data_files: Vec<Vec<String>>,
    val: Option<Arc<TokenStream>>,
    /// Whether loss masks lie beside training shards (fine-tuning data): then the loss counts
    /// only the targets they learn.
    pub loss_masks: bool,
    /// Whether the first evaluation has said what it reads where that is less than asked.
    eval_noted: bool,
    /// The run's tokenizer.json (copied into checkpoints), its end-of-text id and the BOS its
    /// documents start with, if known.
    tokenizer: Option<PathBuf>,
    eos_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    pub step: u64,
    /// Tokens trained on since the run began (over every stage, whose global batches may differ).
    pub tokens: u64,
}

impl<B: Backend> Trainer<B> {
    /// A single-rank trainer.
    pub fn new(be: B, cfg: RunConfig, data: Data) -> Result<Self> {
        let mesh = Mesh::new(1, 1, 1)?;
        let comms = RankComms::threads(mesh, Duration::from_secs(cfg.parallelism.timeout_s))?;
        let comms = comms.into_iter().next().expect("one rank").boxed();
        Self::rank(be, cfg, data, comms)
    }

    /// One rank of a parallel run: `comms` places it in the mesh. It reads its data-parallel
    /// replica's share of every global batch.
    pub fn rank(be: B, cfg: RunConfig, data: Data, comms: RankComms<Box<dyn Communicator>>) -> Result<Self> {
        let t = &cfg.training;
        let (eos_token_id, bos_token_id) = match (&data.tokenizer, cfg.data.tokenizer.as_deref()) {
            (Some(file), _) => {
                let t = TextTokenizer::from_file(file, cfg.data.eot_token())
                    .map_err(|e| Error::config("data.eot_token", e.to_string()))?;
                let bos = match t.document_start() {
                    [bos] => Some(*bos),
                    _ => None,
                };
                (Some(t.eot_id()), bos)
            }
            (None, Some("bytes")) => (Some(BYTE_EOT), None),
            (None, _) => (None, None),
        };
        let mut layout = cfg.layout(comms.mesh);
        if t.mask_documents {
            // The config's validation made sure of a tokenizer.
            layout.document_mask = Some(eos_token_id.expect("training.mask_documents with a tokenizer"));
        }
        let (replica, replicas) = (comms.coords.dp, comms.mesh.dp);
        let engine = Engine::new(be, cfg.model.clone(), layout, cfg.optimizer.clone(), comms, t.seed)?;
        let sched = LrSchedule::new(cfg.lr_scheduler.clone(), cfg.optimizer.lr, t.steps);
        let order = if t.shuffle { Order::Shuffled { seed: t.seed } } else { Order::Sequential };
        let data_tokens = data.train.iter().map(|s| s.len() as u64).collect();
        let loss_masks = data.train.iter().any(|s| s.has_masks());
        let data_files = data
            .train
            .iter()
            .map(|s| s.files().into_iter().map(|f| file_identity(f).display().to_string()).collect())
            .collect();
        let loader = if cfg.data.sources.is_empty() {
            let stream = data.train.into_iter().next().expect("one training source");
            Batches::One(Loader::new(stream, t.seq_len, t.batch_size, t.grad_accum, order, replica, replicas)?)
        } else {
            let weights: Vec<f64> = cfg.data.sources.iter().map(|s| s.weight).collect();
            let mix = Mixture::new(data.train, &weights, t.seq_len, t.batch_size, order, t.seed, replica, replicas);
            Batches::Mix(mix.map_err(|e| Error::config("data.sources", e.to_string()))?)
        };
        Ok(Self {
            loss_masks,
            engine,
            sched,
            loader,
            data_tokens,
            data_files,
            val: data.val,
            tokenizer: data.tokenizer,
            eos_token_id,
            bos_token_id,
            eval_noted: false,
            step: 0,
            tokens: 0,
            cfg,
        })
    }

    /// Loads the weights `model.init_from` names (a checkpoint or Hugging Face model directory,
    /// or a run directory or its `checkpoints/latest` for its latest checkpoint), if it names
    /// any, with fresh AdamW state; returns the directory loaded. For a run that starts: one
    /// that resumes takes its weights from its checkpoint, whatever the run began from, so the
    /// directory `init_from` names may be gone by then.
    pub fn load_init_from(&mut self) -> Result<Option<PathBuf>> {
        let Some(named) = &self.cfg.model.init_from else { return Ok(None) };
        let blamed = |e: Error| match e {
            Error::Input(m) => Error::config("model.init_from", m),
            Error::Io { context, source } => Error::config("model.init_from", format!("{context}: {source}")),
            other => other,
        };
        let dir = crate::pretrained::model_dir(Path::new(named)).map_err(blamed)?;
        let init = Pretrained::load_for(&self.cfg.model, &dir).map_err(blamed)?;
        check_tokenizer(&init.dir, init.run_config.as_ref(), &self.cfg, self.tokenizer.as_deref())?;
        // Every rank reads the directory itself: a run directory still training (its latest
        // moving) or a node that sees another copy would give ranks other weights, unnoticed.
        let weights = fnv1a(init.params.iter().map(|x| u64::from(x.to_bits())));
        if let Some((rank, _)) = self.first_rank_unlike_rank_0((init.params.len() as u64, weights))? {
            return Err(Error::config(
                "model.init_from",
                format!(
                    "world rank {rank} read other weights from {named} than world rank 0 (this rank: {}); every rank \
                     must start from the same: name a checkpoint directory (not a run still writing them) on a \
                     filesystem every node shares",
                    dir.display()
                ),
            ));
        }
        self.engine.load_whole(&init.params, None);
        Ok(Some(dir))
    }

    /// The whole model (names, sizes, FLOPs); the rank's pieces live in the engine.
    pub fn model(&self) -> &Model {
        &self.engine.whole
    }

    /// Tokens one optimizer step consumes across all data-parallel replicas.
    pub fn tokens_per_step(&self) -> u64 {
        (self.cfg.global_batch() * self.cfg.training.seq_len) as u64
    }

    /// World rank 0 (or the only rank): the one that reports and writes checkpoints.
    pub fn is_leader(&self) -> bool {
        self.engine.comms.rank() == 0
    }

    /// Bytes this rank holds: parameters, gradients, AdamW moments and activations.
    pub fn memory_bytes(&self) -> u64 {
        self.engine.memory_bytes()
    }

    /// The whole model's parameters, gathered from every rank (all must call it; world rank 0
    /// gets them, the others None).
    pub fn whole_params(&self) -> Result<Option<Vec<f32>>> {
        Ok(self.engine.whole_state()?.map(|[p, _, _]| p))
    }

    /// The next micro-batches of this replica, refusing tokens outside the vocabulary, and
    /// the targets of the whole step (every replica's) that are learned.
    fn next_batches(&mut self) -> Result<(Vec<TokenBatch>, u64)> {
        let t = &self.cfg.training;
        let rows = t.batch_size * t.seq_len;
        let mut learned = 0;
        let batches = (0..t.grad_accum)
            .map(|_| {
                let (mut inputs, mut targets) = (vec![0u32; rows], vec![0u32; rows]);
                learned += self.loader.next_batch(&mut inputs, &mut targets);
                check_vocab(&inputs, &targets, t.seq_len, self.cfg.model.vocab_size, |r, p| self.loader.origin(r, p))?;
                Ok((inputs, targets))
            })
            .collect::<Result<_>>()?;
        Ok((batches, learned))
    }

    /// One optimizer update over `grad_accum` micro-batches per replica; returns the mean
    /// loss per learned target of the global batch (every target, unless loss masks leave
    /// prompts out).
    pub fn step(&mut self) -> Result<StepStats> {
        let tokens = self.tokens_per_step() as f64;
        let (batches, learned) = self.next_batches()?;
        let mut lr = self.sched.lr(self.step);
        if learned == 0 {
            // (Its gradient is zero; at learning rate 0 neither the moments nor weight decay
            // move a weight either.)
            if self.is_leader() {
                ondol_core::say!(
                    "note: step {}: the loss masks learn no target of the global batch; the step changes no weight \
                     (longer sequences, or a larger batch, hold more of each completion)",
                    self.step + 1
                );
            }
            lr = 0.0;
        }
        // Each learned target's loss enters the mean with weight 1 / (learned targets in the
        // whole step).
        let learned = learned.max(1) as f64;
        let out = self.engine.step(&batches, (1.0 / learned) as f32, lr, stop_request)?;
        let flops = tokens * self.flops_per_token();
        let loss = out.loss_sum / learned;
        if !loss.is_finite() {
            return Err(Error::Training(format!(
                "the loss became {loss} at step {}: lower optimizer.lr or raise lr_scheduler.warmup_steps",
                self.step + 1
            )));
        }
        self.step += 1;
        self.tokens += self.tokens_per_step();
        let stop = (out.stop > 0).then_some(i32::from(out.stop));
        Ok(StepStats { loss, grad_norm: out.grad_norm, lr, pipeline_wait_s: out.pipeline_wait_s, stop, flops })
    }

    /// Training FLOPs per token of the last step: [`Model::flops_per_token`] at the sequence
    /// length, or, where documents attend only within their own, with each token's attention
    /// counted for 2 k - 1 keys where it attends k (see [`ondol_model::counted_keys`]), from the
    /// first keys the engine set.
    fn flops_per_token(&self) -> f64 {
        let (model, seq) = (self.model(), self.cfg.training.seq_len);
        let documents = self.engine.document_first_keys();
        if documents.is_empty() {
            return model.flops_per_token(seq) as f64;
        }
        // Counted once for the global layers and once for the windowed ones.
        let global = keys_counted_per_token(documents, seq, None);
        let local = model.cfg.sliding_window.map_or(global, |w| keys_counted_per_token(documents, seq, Some(w)));
        model.flops_per_token_attending(seq, (global, local))
    }

    /// A copy of everything a checkpoint holds, for a background writer, with every tensor
    /// whole: on the leader; the others return None. Every rank must call it (the pieces are
    /// gathered from all of them).
    pub fn snapshot(&self) -> Result<Option<Snapshot>> {
        let Some([params, exp_avg, exp_avg_sq]) = self.engine.whole_state()? else { return Ok(None) };
        let mesh = self.engine.layout.mesh;
        Ok(Some(Snapshot {
            model: self.cfg.model.clone(),
            layout: self.model().layout.clone(),
            params,
            moments: Some(Moments { exp_avg, exp_avg_sq }),
            step: self.step,
            tokens: self.tokens,
            data: self.loader.position(),
            data_tokens: Some(self.data_tokens.clone()),
            data_files: Some(self.data_files.clone()),
            parallel: ondol_ckpt::Layout { tp: mesh.tp, pp: mesh.pp, dp: mesh.dp },
            run_config: toml::to_string(&self.cfg).expect("config serializes"),
            extra_files: self.tokenizer.as_deref().map(tokenizer_files).unwrap_or_default(),
            eos_token_id: self.eos_token_id,
            bos_token_id: self.bos_token_id,
            eos_token: self.tokenizer.as_ref().map(|_| self.cfg.data.eot_token().to_string()),
            max_shard_bytes: self.cfg.checkpoint.max_shard_bytes,
        }))
    }

    /// Continues from a checkpoint: parameters, AdamW state, step, tokens and data position,
    /// cut into this rank's pieces whatever layout wrote them. The model and the tokenizer
    /// must be the same. The data position continues where the data is the same: the `[data]`
    /// section and the geometry of a step (global batch, seq_len, seed, shuffle; how the global
    /// batch is split into micro-batches, replicas and accumulation may change, as may the
    /// steps, learning rate and layout). Where the data differs, or its saved position does
    /// not fit it, `checkpoint.on_data_change` says whether to refuse or to read the data
    /// from its start.
    pub fn restore(&mut self, ckpt: Loaded) -> Result<DataPosition> {
        self.check_every_rank_loaded(Some(&ckpt))?;
        let origin = ckpt.dir.join("ondol.toml").display().to_string();
        let saved = RunConfig::parse(&ckpt.run_config, &origin, &[])?;
        let differs = |d: Difference, what_to_do: &str| {
            let dir = ckpt.dir.display();
            let (theirs, ours) = (d.theirs, d.ours);
            Error::config(d.key, format!("{ours} differs from the checkpoint {dir} (it has {theirs}); {what_to_do}"))
        };
        if let Some(difference) =
            first_difference("model", &model_identity(&saved.model), &model_identity(&self.cfg.model))
        {
            return Err(differs(difference, "resume with the same value"));
        }
        check_tokenizer(&ckpt.dir, Some(&saved), &self.cfg, self.tokenizer.as_deref())?;
        // (Like the learning rate, it may change on a resume; unlike it, it changes what the
        // model learns from every sequence, so the run says so.)
        let masked = self.cfg.training.mask_documents;
        if saved.training.mask_documents != masked && self.is_leader() {
            ondol_core::say!(
                "note: training.mask_documents = {masked} here, {} in {}: from here on, documents {}",
                !masked,
                ckpt.dir.display(),
                if masked { "attend only within their own" } else { "attend across their boundaries" }
            );
        }
        let restart = self.cfg.checkpoint.on_data_change == OnDataChange::Restart;
        let (mut theirs, mut ours) = (data_identity(&saved), data_identity(&self.cfg));
        // Patterns written otherwise (an absolute path, a glob split in two) that match the
        // same files, in the same order, read the same tokens. Every rank must see it so, or
        // replicas would go on from different positions (nodes that mount the data elsewhere
        // name its files otherwise).
        let same_files = theirs != ours && ckpt.state.data_files.as_ref() == Some(&self.data_files);
        if let Some((rank, _)) = self.first_rank_unlike_rank_0((same_files as u64, 0))? {
            return Err(Error::Input(format!(
                "world rank {rank} and world rank 0 disagree on whether the training data's files are those of {} \
                 (the nodes name them otherwise: other mounts?): resume with the checkpoint's data patterns",
                ckpt.dir.display()
            )));
        }
        if same_files {
            let (a, b) = (without_patterns(&theirs), without_patterns(&ours));
            if a == b && self.is_leader() {
                ondol_core::say!(
                    "note: the training data's patterns are written otherwise than in {}, but match the same files \
                     in the same order: its data position carries over",
                    ckpt.dir.display()
                );
            }
            (theirs, ours) = (a, b);
        }
        // New weights over the same sources (an annealing mixture): each source goes on from
        // where it was, and the draws from here on follow the new shares.
        let reweighted = theirs != ours && without_weights(&theirs) == without_weights(&ours);
        let difference = if reweighted { None } else { first_difference("", &theirs, &ours) };
        let difference = difference.or_else(|| self.files_changed(&ckpt));
        let position = match difference {
            None => {
                let t = &self.cfg.training;
                let reads = (saved.training.batch_size * saved.parallelism.dp, t.batch_size * self.cfg.parallelism.dp);
                match self.loader.set_position(&ckpt.state.data, reads) {
                    Ok(()) => DataPosition::Continued,
                    Err(_) if restart => DataPosition::Restarted,
                    Err(e) => {
                        return Err(Error::Input(format!(
                            "{}: bad data position: {e}; checkpoint.on_data_change = \"restart\" reads the data \
                             from its start instead",
                            ckpt.dir.join("trainer_state.json").display()
                        )));
                    }
                }
            }
            Some(_) if restart => DataPosition::Restarted,
            Some(difference) => {
                // What keeps the value, where it is not simply written again: patterns that
                // match the same files (checkpoints of earlier versions record none), or the
                // global batch cut otherwise.
                let patterns = difference.key.starts_with("data.train") || difference.key.ends_with("].train");
                let same_files_will_do = match (patterns, &ckpt.state.data_files) {
                    (true, Some(_)) => " (or patterns that match the same files in the same order)".to_string(),
                    _ if difference.key.contains("global batch") => format!(
                        " (batch_size x parallelism.dp x grad_accum = {}: at fewer replicas, more training.grad_accum)",
                        difference.theirs
                    ),
                    _ => String::new(),
                };
                return Err(differs(
                    difference,
                    &format!(
                        "resume with the same value{same_files_will_do}, or set checkpoint.on_data_change = \
                         \"restart\" to go on training on this run's data from its start (reading again what the \
                         run has trained on, where the data is the same)"
                    ),
                ));
            }
        };
        if reweighted && position == DataPosition::Continued && self.is_leader() {
            let shares: Vec<String> = self.cfg.data.sources.iter().map(|s| format!("{}", s.weight)).collect();
            ondol_core::say!(
                "note: data.sources has new weights ({}): each source goes on from where the checkpoint left it",
                shares.join(", ")
            );
        }
        let step = ckpt.state.step;
        self.engine.load_whole(&ckpt.params, Some((&ckpt.exp_avg, &ckpt.exp_avg_sq, step)));
        (self.step, self.tokens) = (step, ckpt.state.tokens);
        // A schedule reshaped by other steps or settings makes the rate jump: allowed, said.
        let theirs = LrSchedule::new(saved.lr_scheduler.clone(), saved.optimizer.lr, saved.training.steps).lr(step);
        let ours = self.sched.lr(step);
        // (Said only where there is a step to train.)
        let trains = step < self.cfg.training.steps;
        if trains && self.is_leader() && (ours - theirs).abs() > 1e-6 * theirs.abs().max(ours.abs()) {
            ondol_core::say!(
                "note: the learning rate of step {} is {ours:.3e}; the checkpoint's schedule (training.steps {}, \
                 optimizer.lr {:e}, [lr_scheduler]) would give {theirs:.3e}",
                step + 1,
                saved.training.steps,
                saved.optimizer.lr
            );
        }
        Ok(position)
    }

    /// The first training source whose files hold another number of tokens than when `ckpt`
    /// was written (the same patterns over data prepared again, say), as a difference of its
    /// `data` field. Checkpoints of earlier versions record no counts: nothing to compare.
    /// (The sources are the checkpoint's: the config's data identity was compared first.)
    fn files_changed(&self, ckpt: &Loaded) -> Option<Difference> {
        let saved = ckpt.state.data_tokens.as_ref()?;
        let i = saved.iter().zip(&self.data_tokens).position(|(theirs, ours)| theirs != ours)?;
        Some(Difference {
            key: match self.cfg.data.sources.is_empty() {
                true => "data.train".to_string(),
                false => format!("data.sources[{i}].train"),
            },
            theirs: format!("{} tokens", saved[i]),
            ours: format!("the {} tokens its files hold now (changed since: prepared again?)", self.data_tokens[i]),
        })
    }

    /// Every rank finds and loads its checkpoint itself (`loaded`, None where it found none):
    /// refuses to go on, on every rank, unless they all loaded the same one. A node that sees
    /// another filesystem (or an older copy of the run directory) would otherwise train other
    /// weights from another step, unnoticed. [`Trainer::restore`] checks; a rank that starts
    /// from scratch where others might resume (`--resume auto`) must call it with None.
    pub fn check_every_rank_loaded(&self, loaded: Option<&Loaded>) -> Result<()> {
        // (step + 1, fingerprint), (0, 0) for none.
        let mine = loaded.map_or((0, 0), |l| (l.state.step + 1, l.state.fingerprint()));
        let Some((rank, found)) = self.first_rank_unlike_rank_0(mine)? else { return Ok(()) };
        let what = |(step, _): (u64, u64)| match step {
            0 => "found no checkpoint".to_string(),
            s => format!("loaded one of step {}", s - 1),
        };
        let same_step = if found[0].0 == found[rank].0 { " with other contents" } else { "" };
        let found = |r: usize| found[r];
        let mine = loaded.map_or("none".to_string(), |l| l.dir.display().to_string());
        Err(Error::Input(format!(
            "ranks resume differently: world rank 0 {}, world rank {rank} {}{same_step} (this rank: {mine}); every \
             rank must read the same checkpoint: keep the run directory on a filesystem that every node shares, or \
             give every rank the same --resume DIR",
            what(found(0)),
            what(found(rank)),
        )))
    }

    /// Refuses to go on where some rank's training or validation data holds other token counts
    /// than rank 0's (a node with another copy of the data): its replica would train on other
    /// batches, and a resume's data check would go one way on some ranks and another on
    /// others. Every rank must call it.
    pub fn check_every_rank_has_the_data(&self) -> Result<()> {
        let val = self.val.as_ref().map_or(0, |v| v.len() as u64);
        let train = fnv1a(self.data_tokens.iter().copied());
        let Some((rank, _)) = self.first_rank_unlike_rank_0((train, val))? else { return Ok(()) };
        Err(Error::Input(format!(
            "world rank {rank} reads other data than world rank 0 (its files hold other token counts): every rank \
             must read the same files; keep them on a filesystem every node shares, or identical copies"
        )))
    }

    /// All-gathers every rank's `mine` and returns the first rank whose pair is not rank 0's,
    /// with every rank's pair; None where all agree (and on one rank).
    fn first_rank_unlike_rank_0(&self, mine: (u64, u64)) -> Result<Option<Disagreement>> {
        let world = self.engine.comms.world.as_ref();
        if world.size() == 1 {
            return Ok(None);
        }
        // In 16-bit pieces, which f32 carries exactly.
        let words = |v: u64| (0..4).map(move |k| ((v >> (16 * k)) & 0xffff) as f32);
        let mine: Vec<f32> = words(mine.0).chain(words(mine.1)).collect();
        let mut all = vec![0.0f32; mine.len() * world.size()];
        world.all_gather(&mine, &mut all)?;
        let value = |w: &[f32]| w.iter().rev().fold(0u64, |v, &x| (v << 16) | x as u64);
        let found: Vec<(u64, u64)> = all.chunks(8).map(|w| (value(&w[..4]), value(&w[4..]))).collect();
        Ok(found.iter().position(|f| *f != found[0]).map(|rank| (rank, found)))
    }

    /// Mean loss per learned target over the first `eval_batches` global validation batches, each of
    /// a step's `batch_size x dp x grad_accum` sequences: the same sequences at every
    /// evaluation, so values are comparable along the run, and in every layout and
    /// accumulation that keep the global batch (each replica takes every dp-th micro-batch),
    /// as many as the validation data holds. Data shorter than one global batch is read in
    /// micro-batches of every replica (at least one, repeating data if it must), which depends
    /// on the layout, as does `eval_batches = 0` (one micro-batch of every replica). Every rank
    /// takes part; the leader gets the value.
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        Ok(self.evaluate_heeding_stops()?.0)
    }

    /// [`Trainer::evaluate`], and the signal that asked the run to stop meanwhile, on whichever
    /// rank it arrived (every rank gets the same answer).
    pub fn evaluate_heeding_stops(&mut self) -> Result<(Option<f64>, Option<i32>)> {
        let Some(val) = self.val.clone() else { return Ok((None, None)) };
        let t = &self.cfg.training;
        let (replica, replicas) = (self.engine.comms.coords.dp, self.engine.layout.mesh.dp);
        let mut loader = Loader::new(val, t.seq_len, t.batch_size, 1, Order::Sequential, 0, 1)
            .map_err(|e| Error::config("data.val", format!("too little validation data for one batch: {e}")))?;
        let rows = t.batch_size * t.seq_len;
        let whole = loader.windows_per_epoch() as usize / self.cfg.global_batch();
        if t.eval_batches > whole && whole > 0 && !self.eval_noted && self.engine.comms.rank() == 0 {
            ondol_core::say!(
                "note: the validation data holds {whole} global batches, fewer than training.eval_batches = {}: \
                 each evaluation reads those",
                t.eval_batches
            );
        }
        self.eval_noted = true;
        let per_replica = match whole {
            0 => (loader.batches_per_epoch() as usize / replicas).max(1),
            _ => (t.eval_batches.min(whole) * t.grad_accum).max(1),
        };
        let mut batches = Vec::with_capacity(per_replica);
        let mut learned = 0;
        for i in 0..per_replica * replicas {
            let (mut inputs, mut targets) = (vec![0u32; rows], vec![0u32; rows]);
            learned += loader.next_batch(&mut inputs, &mut targets);
            check_vocab(&inputs, &targets, t.seq_len, self.cfg.model.vocab_size, |r, p| loader.origin(r, p))?;
            if i % replicas == replica {
                batches.push((inputs, targets));
            }
        }
        let done = self.engine.evaluate(&batches, stop_request)?;
        let stop = (done.stop > 0).then_some(i32::from(done.stop));
        if learned == 0 {
            if self.is_leader() {
                ondol_core::say!("note: the loss masks learn no target of the validation batches: no validation loss");
            }
            return Ok((None, stop));
        }
        Ok((self.is_leader().then_some(done.loss_sum / learned as f64), stop))
    }
}

/// The stop code a rank gives its collectives: the signal that asked the run to stop, if one
/// did (SIGTERM's, 15, wins over SIGUSR1's, 10), else 0.
fn stop_request() -> u8 {
    crate::stop_signal::received().map_or(0, |sig| sig as u8)
}

/// What [`Trainer::restore`] did with the checkpoint's data position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPosition {
    /// The data goes on where the checkpoint left it.
    Continued,
    /// The data differs from the checkpoint's, or its saved position does not fit it, and is
    /// read from its start (`checkpoint.on_data_change = "restart"`).
    Restarted,
}

/// One micro-batch: inputs and targets, `batch_size * seq_len` each.
type TokenBatch = (Vec<u32>, Vec<u32>);

/// Where training batches come from: one source, or a weighted mixture of several.
enum Batches {
    One(Loader),
    Mix(Mixture),
}

impl Batches {
    fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) -> u64 {
        match self {
            Batches::One(l) => l.next_batch(inputs, targets),
            Batches::Mix(m) => m.next_batch(inputs, targets),
        }
    }

    /// Where a token of the last batch came from (see [`Loader::origin`]).
    fn origin(&self, row: usize, pos: usize) -> (&Path, usize) {
        match self {
            Batches::One(l) => l.origin(row, pos),
            Batches::Mix(m) => m.origin(row, pos),
        }
    }

    /// The position, as stored in trainer_state.json.
    fn position(&self) -> serde_json::Value {
        match self {
            Batches::One(l) => serde_json::to_value(l.cursor()),
            Batches::Mix(m) => serde_json::to_value(m.cursor()),
        }
        .expect("cursors serialize")
    }

    /// Moves to a position stored in trainer_state.json by a run whose reads (micro-batches of
    /// every replica) held `from` sequences, this run's holding `to`.
    fn set_position(
        &mut self,
        value: &serde_json::Value,
        (from, to): (usize, usize),
    ) -> std::result::Result<(), String> {
        let inside = || format!("the position falls inside a read of {to} sequences (the saved run read {from})");
        match self {
            Batches::One(l) => {
                let c: Cursor = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
                l.set_cursor(c.in_reads_of(from, to).ok_or_else(inside)?).map_err(|e| e.to_string())
            }
            Batches::Mix(m) => {
                let c: MixtureCursor = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
                m.set_cursor(&c.in_reads_of(from, to).ok_or_else(inside)?).map_err(|e| e.to_string())
            }
        }
    }
}

/// Refuses weights (in `dir`) trained with another tokenizer than the run `ours`, whose
/// tokenizer.json is `ours_file` if it has one: by content where `dir` keeps a tokenizer.json,
/// else by the `data.tokenizer` of the run that wrote it (`saved`: byte-level runs, older
/// checkpoints). A directory with neither (a Hugging Face model without tokenizer.json)
/// cannot tell.
fn check_tokenizer(dir: &Path, saved: Option<&RunConfig>, ours: &RunConfig, ours_file: Option<&Path>) -> Result<()> {
    let named = |t: Option<&str>| t.map_or("no data.tokenizer".to_string(), |t| format!("data.tokenizer = {t:?}"));
    let theirs_file = dir.join("tokenizer.json");
    let (same, theirs, valid) = match (std::fs::read(&theirs_file), saved) {
        (Ok(theirs), _) => {
            let same = ours_file.and_then(|t| std::fs::read(t).ok()).as_ref() == Some(&theirs);
            let valid = format!("data.tokenizer = {:?} (or a copy of it)", theirs_file.display().to_string());
            (same, "its tokenizer.json".to_string(), valid)
        }
        (Err(_), Some(saved)) => {
            let (a, b) = (saved.data.tokenizer.as_deref(), ours.data.tokenizer.as_deref());
            let same = a.map(plain_path) == b.map(plain_path);
            let valid = a.map_or("no data.tokenizer (leave it out)".to_string(), |t| format!("data.tokenizer = {t:?}"));
            (same, named(a), valid)
        }
        (Err(_), None) => return Ok(()),
    };
    match same {
        true => Ok(()),
        false => Err(Error::config(
            "data.tokenizer",
            format!(
                "the run has {}, but the weights of {} know the token ids of {theirs}: set {valid}, or start from \
                 weights trained with this run's tokenizer",
                named(ours.data.tokenizer.as_deref()),
                dir.display()
            ),
        )),
    }
}

/// Refuses token ids the model has no embedding for (a mismatched tokenizer or config), naming
/// the file and the token's place in it (`origin` maps a row of the batch and a place in its
/// window of `seq_len + 1` tokens to those).
fn check_vocab<'a>(
    inputs: &[u32],
    targets: &[u32],
    seq_len: usize,
    vocab: usize,
    origin: impl FnOnce(usize, usize) -> (&'a Path, usize),
) -> Result<()> {
    let outside =
        |tokens: &[u32], ignored: Option<u32>| tokens.iter().position(|&t| t as usize >= vocab && Some(t) != ignored);
    // Input column c is window place c, target column c is place c + 1. (Only a target can be
    // one a loss mask leaves out; an input of that id is a token outside the vocabulary.)
    let (i, pos, id) = match (outside(inputs, None), outside(targets, Some(IGNORED_TARGET))) {
        (None, None) => return Ok(()),
        (Some(i), _) => (i, i % seq_len, inputs[i]),
        (None, Some(i)) => (i, i % seq_len + 1, targets[i]),
    };
    let (file, index) = origin(i / seq_len, pos);
    Err(Error::config(
        "model.vocab_size",
        format!(
            "{}: token {index} (counted from 0) is id {id}, outside the vocabulary of {vocab}: the data was \
             tokenized for another model, or model.vocab_size is too small",
            file.display()
        ),
    ))
}

/// Mean loss per learned target of `model` over the next `batches` batches of `loader` (at
/// most one epoch), and the number of targets it covered; with `documents`, the end-of-text token that
/// starts each document, documents attend only within their own.
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Model,
    params: &B::Buf,
    ws: &mut Workspace<B>,
    documents: Option<u32>,
    loader: &mut Loader,
    batches: usize,
) -> Result<(f64, u64)> {
    let rows = ws.batch * ws.seq;
    let (mut inputs, mut targets) = (vec![0u32; rows], vec![0u32; rows]);
    let (mut ids, mut tgt) = (be.upload_ids(&inputs), be.upload_ids(&targets));
    let batches = batches.min(loader.batches_per_epoch() as usize).max(1);
    let (mut sum, mut learned) = (0.0, 0);
    for _ in 0..batches {
        learned += loader.next_batch(&mut inputs, &mut targets);
        check_vocab(&inputs, &targets, loader.seq_len(), model.cfg.vocab_size, |r, p| loader.origin(r, p))?;
        be.write_ids(&mut ids, &inputs);
        be.write_ids(&mut tgt, &targets);
        if let Some(eot) = documents {
            ws.set_first_keys(be, Some(&document_starts(&inputs, ws.seq, eot)));
        }
        model.forward(be, params, ws, &ids);
        sum += model.loss(be, params, ws, &tgt, None);
    }
    if learned == 0 {
        return Err(Error::Input(format!(
            "the loss masks beside the data learn no target of the {batches} batch(es) read: there is no loss to \
             report (read more batches, or longer sequences)"
        )));
    }
    Ok((sum / learned as f64, learned))
}

/// The keys a token's attention counts for in the FLOPs where documents attend only within
/// their own (`first_keys`, per micro-batch, from `document_starts`), in a layer whose queries
/// attend at most `window` keys: 2 k - 1 for its k keys, averaged over the tokens (sequences of
/// `seq`); `seq` for whole sequences without a window, as PaLM's count has it.
fn keys_counted_per_token(first_keys: &[Vec<u32>], seq: usize, window: Option<usize>) -> f64 {
    let (mut keys, mut tokens) = (0u64, 0u64);
    for micro in first_keys {
        for (r, &first) in micro.iter().enumerate() {
            let k = (r % seq + 1 - first as usize).min(window.unwrap_or(usize::MAX));
            keys += 2 * k as u64 - 1;
        }
        tokens += micro.len() as u64;
    }
    keys as f64 / tokens.max(1) as f64
}

/// The result of a whole run.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The step the run started at (a resume's) and the one it ended at.
    pub first_step: u64,
    pub steps: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub first_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// The step `final_val_loss` was measured at.
    pub final_val_step: u64,
    /// Over the steps' own time (not evaluations or checkpoint snapshots).
    pub tokens_per_s: f64,
    /// Training FLOPs per second over the same time (see [`StepStats::flops`]).
    pub flops_per_s: f64,
    /// The whole run's time.
    pub seconds: f64,
    /// The signal that stopped the run before `training.steps`, with a checkpoint.
    pub stopped_by: Option<i32>,
}

/// Runs the remaining updates up to `cfg.training.steps`, evaluating, reporting and
/// checkpointing (every `checkpoint.every` steps, and at the end unless `checkpoint.at_end`
/// is off) along the way. A stop requested by a signal ends it after the step, with a
/// checkpoint whatever `[checkpoint]` says.
/// Ranks other than the leader pass no writer and a silent [`Metrics`].
pub fn run<B: Backend>(
    trainer: &mut Trainer<B>,
    metrics: &mut Metrics,
    mut ckpt: Option<&mut Writer>,
) -> Result<Summary> {
    let total = trainer.cfg.training.steps;
    let (every, at_end) = (trainer.cfg.checkpoint.every, trainer.cfg.checkpoint.at_end);
    let (eval_every, log_every) = (trainer.cfg.training.eval_every, trainer.cfg.metrics.log_every);
    let mem = trainer.memory_bytes();
    let first_val_loss = trainer.evaluate()?;
    if let Some(v) = first_val_loss {
        metrics.eval(trainer.step, v)?;
    }
    let start_step = trainer.step;
    // Throughput counts the steps' own time: not evaluations, checkpoint snapshots or logging.
    let (start, mut training_s) = (Instant::now(), 0.0);
    // A logged row covers the steps since the previous one: their mean loss, as Megatron logs
    // it (one step's loss is noisy at the default log_every = 10), and their tokens per second.
    let (mut window_s, mut window_tokens, mut window_loss, mut window_steps) = (0.0, 0u64, 0.0, 0u64);
    let (mut window_flops, mut flops) = (0.0, 0.0);
    let mut last = StepStats { loss: f64::NAN, grad_norm: 0.0, lr: 0.0, pipeline_wait_s: 0.0, stop: None, flops: 0.0 };
    let mut first_loss = f64::NAN;
    let (mut final_val_loss, mut final_val_step) = (first_val_loss, trainer.step);
    while trainer.step < total {
        let step_start = Instant::now();
        last = trainer.step()?;
        let step_s = step_start.elapsed().as_secs_f64();
        (training_s, window_s) = (training_s + step_s, window_s + step_s);
        if trainer.step == start_step + 1 {
            first_loss = last.loss;
        }
        window_tokens += trainer.tokens_per_step();
        (window_flops, flops) = (window_flops + last.flops, flops + last.flops);
        (window_loss, window_steps) = (window_loss + last.loss, window_steps + 1);
        let step = trainer.step;
        if step.is_multiple_of(log_every) || step == total || last.stop.is_some() {
            let tokens_per_s = window_tokens as f64 / window_s;
            metrics.step(StepRow {
                step,
                loss: window_loss / window_steps as f64,
                lr: last.lr,
                grad_norm: last.grad_norm,
                tokens: trainer.tokens,
                tokens_per_s,
                mfu: window_flops / window_s / metrics.peak_flops,
                mem_bytes: mem,
            })?;
            (window_s, window_tokens, window_loss, window_steps, window_flops) = (0.0, 0, 0.0, 0, 0.0);
        } else {
            metrics.tick(step, last.loss);
        }
        if let Some(sig) = last.stop.filter(|_| step < total) {
            metrics.note(format!("stopping at step {step} on request (signal {sig}): writing a checkpoint"));
        } else if (eval_every > 0 && step.is_multiple_of(eval_every)) || step == total {
            let (val, stop) = trainer.evaluate_heeding_stops()?;
            (final_val_loss, final_val_step) = (val, step);
            if let Some(v) = val {
                metrics.eval(step, v)?;
            }
            // A signal during the evaluation (which may take long) stops the run here, not
            // after another step.
            if let Some(sig) = stop.filter(|_| step < total) {
                metrics.note(format!(
                    "stopping at step {step} on request (signal {sig}, during the evaluation): writing a checkpoint"
                ));
                last.stop = Some(sig);
            }
        }
        if (every > 0 && step.is_multiple_of(every) || at_end && step == total || last.stop.is_some())
            && let Some(snap) = trainer.snapshot()?
            && let Some(writer) = ckpt.as_deref_mut()
        {
            writer.submit(snap)?;
            metrics.note(format!("step {step}: writing a checkpoint in the background"));
        }
        if last.stop.is_some() {
            break;
        }
    }
    if let Some(dir) = ckpt.map(|w| w.wait()).transpose()?.flatten() {
        metrics.note(format!("checkpoint {}", dir.display()));
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Summary {
        first_step: start_step,
        steps: trainer.step,
        first_loss,
        final_loss: last.loss,
        first_val_loss,
        final_val_loss,
        final_val_step,
        tokens_per_s: ((trainer.step - start_step) * trainer.tokens_per_step()) as f64 / training_s,
        flops_per_s: flops / training_s,
        seconds,
        stopped_by: last.stop.filter(|_| trainer.step < total),
    })
}

/// What a checkpoint's weights must agree with: the `[model]` section, less where the run
/// began (`init_from`: a resume's weights are its checkpoint's) and, but for GPT-2's learned
/// positions, `max_seq_len`, which no weight depends on (a context extension raises it).
fn model_identity(m: &ModelConfig) -> serde_json::Value {
    // (A checkpoint of an earlier version may hold settings its architecture did not read.)
    let mut m = m.unread_as_defaults();
    m.init_from = None;
    if m.arch != Arch::Gpt2 {
        m.max_seq_len = 0;
    }
    // ("LLLN" and "LLLNLLLN" over 8 layers are one model.)
    if m.llama_family() {
        m.attention_pattern = Some(m.attention_layers());
    }
    to_json(&m)
}

fn to_json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("configs serialize")
}

/// Where two serialized configs first differ: the dotted key and each one's value there.
pub(crate) struct Difference {
    pub key: String,
    pub theirs: String,
    pub ours: String,
}

/// The first field (below `prefix`) where `theirs` and `ours` differ.
pub(crate) fn first_difference(
    prefix: &str,
    theirs: &serde_json::Value,
    ours: &serde_json::Value,
) -> Option<Difference> {
    if theirs == ours {
        return None;
    }
    let (Some(a), Some(b)) = (theirs.as_object(), ours.as_object()) else {
        let shown = |v: &serde_json::Value| if v.is_null() { "no value".to_string() } else { v.to_string() };
        return Some(Difference { key: prefix.to_string(), theirs: shown(theirs), ours: shown(ours) });
    };
    let null = serde_json::Value::Null;
    a.keys().chain(b.keys()).find_map(|k| {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        first_difference(&key, a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null))
    })
}

/// A data identity without the training files' patterns (of `data.train` or of each source).
fn without_patterns(identity: &serde_json::Value) -> serde_json::Value {
    let mut identity = identity.clone();
    identity["data"]["train"] = serde_json::Value::Null;
    if let Some(sources) = identity["data"]["sources"].as_array_mut() {
        sources.iter_mut().for_each(|s| s["train"] = serde_json::Value::Null);
    }
    identity
}

/// A data identity with the mixture's weights left out.
fn without_weights(identity: &serde_json::Value) -> serde_json::Value {
    let mut identity = identity.clone();
    if let Some(sources) = identity["data"]["sources"].as_array_mut() {
        sources.iter_mut().for_each(|s| s["weight"] = serde_json::Value::Null);
    }
    identity
}

/// What a data position depends on: the `[data]` section and the geometry of a step. Not the
/// tokenizer (compared by content), nor validation files of their own (only a fraction held
/// out of the training files changes what training reads); file patterns as paths, so that
/// `./shards/*.bin` and `shards/*.bin` are the same. A step reads the same sequences whatever
/// the factors of its global batch (the loader's docs), so only their product counts.
fn data_identity(c: &RunConfig) -> serde_json::Value {
    let mut data = c.data.clone();
    data.tokenizer = None;
    data.eot_token = Some(c.data.eot_token().to_string()); // left out is the default, written out
    if !data.val.is_empty() {
        (data.val, data.val_fraction) = (vec!["(files of its own, not read for training)".to_string()], 0.0);
    }
    let as_paths = |patterns: &mut Vec<String>| patterns.iter_mut().for_each(|p| *p = plain_path(p));
    as_paths(&mut data.train);
    data.sources.iter_mut().for_each(|s| as_paths(&mut s.train));
    // Mixture weights are shares: 7 and 3 are 0.7 and 0.3 (to 12 digits, past rounding).
    let total: f64 = data.sources.iter().map(|s| s.weight).sum();
    data.sources.iter_mut().for_each(|s| s.weight = (s.weight / total * 1e12).round() / 1e12);
    let t = &c.training;
    serde_json::json!({
        "data": to_json(&data),
        "training": {
            "batch_size x parallelism.dp x grad_accum (the global batch)": c.global_batch(),
            "seq_len": t.seq_len,
            "seed": t.seed,
            "shuffle": t.shuffle,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume compares the layers' attention, however the pattern spells it.
    #[test]
    fn a_pattern_spelt_out_is_the_same_model() {
        let base: ModelConfig = toml::from_str(
            "arch = \"llama\"\nvocab_size = 10\nd_model = 8\nn_layers = 4\nn_heads = 2\nmax_seq_len = 8\n\
             sliding_window = 3\nattention_pattern = \"LN\"",
        )
        .unwrap();
        let spelt = ModelConfig { attention_pattern: Some("LNLN".into()), ..base.clone() };
        assert_eq!(model_identity(&base), model_identity(&spelt));
        let other = ModelConfig { attention_pattern: Some("LNLL".into()), ..base.clone() };
        assert_ne!(model_identity(&base), model_identity(&other));
    }

    #[test]
    fn attention_flops_count_the_keys_of_each_document() {
        let batch = |ids: Vec<u32>, seq| vec![document_starts(&ids, seq, 0)];
        // No document boundary: T keys a token, PaLM's count, the model's own.
        assert_eq!(keys_counted_per_token(&batch(vec![5; 24], 8), 8, None), 8.0);
        assert_eq!(ondol_model::counted_keys(8, None), 8.0);
        // A document per token: one key each.
        assert_eq!(keys_counted_per_token(&batch(vec![0; 24], 8), 8, None), 1.0);
        // Sequences of 4 split 2 + 2, then whole: (1 + 3 + 1 + 3 + 1 + 3 + 5 + 7) / 8.
        assert_eq!(keys_counted_per_token(&batch(vec![0, 1, 0, 1, 1, 1, 1, 1], 4), 4, None), 3.0);
        // Windows of 3: (1 + 3 + 5 + 5 + 5 + 5 + 5 + 5) / 8, the model's count without documents.
        assert_eq!(keys_counted_per_token(&batch(vec![5; 8], 8), 8, Some(3)), 4.25);
        assert_eq!(ondol_model::counted_keys(8, Some(3)), 4.25);
        // Windows of 2 over the documents above: (1 + 3 + 1 + 3 + 1 + 3 + 3 + 3) / 8.
        assert_eq!(keys_counted_per_token(&batch(vec![0, 1, 0, 1, 1, 1, 1, 1], 4), 4, Some(2)), 2.25);
    }

    /// The first id outside the vocabulary is traced to its row and its place in the row's
    /// window: input column c is place c, target column c place c + 1 (a bad id in the last
    /// target column only is place seq_len).
    #[test]
    fn check_vocab_names_the_place_of_the_first_bad_id() {
        let (seq, vocab) = (4, 10);
        let place = |inputs: &[u32], targets: &[u32]| {
            let asked = std::cell::Cell::new(None);
            let err = check_vocab(inputs, targets, seq, vocab, |row, pos| {
                asked.set(Some((row, pos)));
                (Path::new("shard.bin"), 1000 + row * seq + pos)
            });
            (asked.get(), err.err().map(|e| e.to_string()))
        };
        assert_eq!(place(&[1; 8], &[2; 8]), (None, None));
        let mut targets = [2; 8];
        targets[7] = 12;
        let (asked, err) = place(&[1; 8], &targets);
        assert_eq!(asked, Some((1, 4)));
        let err = err.unwrap();
        assert!(err.contains("shard.bin: token 1008") && err.contains("id 12"), "{err}");
        let mut inputs = [1; 8];
        inputs[5] = 11;
        assert_eq!(place(&inputs, &targets).0, Some((1, 1)), "inputs come first");
        // A target a loss mask leaves out passes; the same id as an input does not.
        assert_eq!(place(&[1; 8], &[IGNORED_TARGET; 8]), (None, None));
        let mut inputs = [1; 8];
        inputs[2] = IGNORED_TARGET;
        assert_eq!(place(&inputs, &[2; 8]).0, Some((0, 2)));
    }
}
