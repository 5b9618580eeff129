//! The training loop. [`Trainer::step`] is one optimizer update, readable top to bottom:
//! for each micro-batch forward, loss, backward (gradients accumulate in the flat buffer);
//! then the global gradient norm, clipping, the learning rate, and AdamW.

use crate::config::{BYTE_EOT, DataFormat, RunConfig};
use crate::metrics::{Metrics, StepRow};
use crate::pretrained::Pretrained;
use ondol_ckpt::{Loaded, Snapshot, Writer};
use ondol_comm::Communicator;
use ondol_core::{Backend, Error, Result};
use ondol_data::tokenizer::EOT_TOKEN;
use ondol_data::{Cursor, Loader, Mixture, MixtureCursor, Order, SourceKind, TextTokenizer, TokenStream, expand_globs};
use ondol_model::{Model, Workspace};
use ondol_optim::{AdamW, LrSchedule};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
        let open = |patterns: &[String]| -> Result<TokenStream> {
            let files = expand_globs(patterns, base)?;
            Ok(TokenStream::open(&files, kind)?)
        };
        let patterns: Vec<&[String]> =
            if d.sources.is_empty() { vec![&d.train] } else { d.sources.iter().map(|s| s.train.as_slice()).collect() };
        let mut train = patterns.iter().map(|p| open(p)).collect::<Result<Vec<_>>>()?;
        let val = if !d.val.is_empty() {
            Some(open(&d.val)?)
        } else if d.val_fraction > 0.0 {
            // The tail of every file of every source, as one validation stream.
            let all: Vec<String> = patterns.iter().flat_map(|p| p.iter().cloned()).collect();
            train = train.into_iter().map(|t| Ok(t.split_tail(d.val_fraction)?.0)).collect::<Result<_>>()?;
            Some(open(&all)?.split_tail(d.val_fraction)?.1)
        } else {
            None
        };
        let tokenizer = d.tokenizer.as_deref().filter(|t| *t != "bytes").map(|t| base.join(t));
        Ok(Self { train: train.into_iter().map(Arc::new).collect(), val: val.map(Arc::new), tokenizer })
    }
}

/// What one optimizer step produced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f32,
}

/// Everything a single-rank training run holds: model, state, optimizer, data position.
pub struct Trainer<B: Backend> {
    pub be: B,
    pub cfg: RunConfig,
    pub model: Model,
    pub params: B::Buf,
    grads: B::Buf,
    pub opt: AdamW<B>,
    sched: LrSchedule,
    ws: Workspace<B>,
    loader: Batches,
    val: Option<Arc<TokenStream>>,
    /// The run's tokenizer.json (copied into checkpoints) and end-of-text id, if known.
    tokenizer: Option<PathBuf>,
    eos_token_id: Option<u32>,
    /// The data-parallel group, when this trainer is one of several ranks.
    dp: Option<Box<dyn Communicator>>,
    /// ZeRO-1: the range of the flat buffer whose optimizer state this rank holds.
    zero: Option<ZeroShard>,
    /// Host staging for one micro-batch of inputs and targets, and their device copies.
    host_inputs: Vec<u32>,
    host_targets: Vec<u32>,
    inputs: B::Ids,
    targets: B::Ids,
    pub step: u64,
}

impl<B: Backend> Trainer<B> {
    /// A single-rank trainer.
    pub fn new(be: B, cfg: RunConfig, data: Data) -> Result<Self> {
        Self::build(be, cfg, data, None)
    }

    /// One data-parallel rank: it reads its share of every global batch, and its gradients
    /// are summed with the other ranks' through `dp` before each update.
    pub fn data_parallel_rank(be: B, cfg: RunConfig, data: Data, dp: Box<dyn Communicator>) -> Result<Self> {
        Self::build(be, cfg, data, Some(dp))
    }

    fn build(be: B, cfg: RunConfig, data: Data, dp: Option<Box<dyn Communicator>>) -> Result<Self> {
        let (rank, world) = dp.as_ref().map_or((0, 1), |c| (c.rank(), c.size()));
        let model = Model::new(cfg.model.clone())?;
        let t = &cfg.training;
        let initial = match &cfg.model.init_from {
            Some(dir) => Pretrained::weights_for(&cfg.model, Path::new(dir))?,
            None => model.layout.init(t.seed),
        };
        let params = be.upload(&initial);
        let grads = be.zeros(model.num_params());
        let n = model.num_params();
        let zero = (cfg.parallelism.zero == 1).then(|| ZeroShard::new(n, rank, world));
        let opt = match &zero {
            None => AdamW::new(&be, cfg.optimizer.clone(), n, model.layout.decay_runs()),
            Some(z) => AdamW::new(&be, cfg.optimizer.clone(), z.len, z.decay_runs(&model.layout.decay_runs())),
        };
        let sched = LrSchedule::new(cfg.lr_scheduler.clone(), cfg.optimizer.lr, t.steps);
        let ws = Workspace::with_recompute(&be, &model, t.batch_size, t.seq_len, t.activation_checkpointing)?;
        let order = if t.shuffle { Order::Shuffled { seed: t.seed } } else { Order::Sequential };
        let loader = if cfg.data.sources.is_empty() {
            let stream = data.train.into_iter().next().expect("one training source");
            Batches::One(Loader::new(stream, t.seq_len, t.batch_size, order, rank, world)?)
        } else {
            let weights: Vec<f64> = cfg.data.sources.iter().map(|s| s.weight).collect();
            let mix = Mixture::new(data.train, &weights, t.seq_len, t.batch_size, order, t.seed, rank, world);
            Batches::Mix(mix?)
        };
        let eos_token_id = match (&data.tokenizer, cfg.data.tokenizer.as_deref()) {
            (Some(file), _) => Some(TextTokenizer::from_file(file, EOT_TOKEN)?.eot_id()),
            (None, Some("bytes")) => Some(BYTE_EOT),
            (None, _) => None,
        };
        let rows = t.batch_size * t.seq_len;
        let (inputs, targets) = (be.upload_ids(&vec![0; rows]), be.upload_ids(&vec![0; rows]));
        Ok(Self {
            be,
            model,
            params,
            grads,
            opt,
            sched,
            ws,
            loader,
            val: data.val,
            tokenizer: data.tokenizer,
            eos_token_id,
            dp,
            zero,
            host_inputs: vec![0; rows],
            host_targets: vec![0; rows],
            inputs,
            targets,
            step: 0,
            cfg,
        })
    }

    /// Tokens consumed by one optimizer step.
    /// Tokens one optimizer step consumes across all data-parallel ranks.
    pub fn tokens_per_step(&self) -> u64 {
        let t = &self.cfg.training;
        (t.batch_size * t.seq_len * t.grad_accum * self.dp_size()) as u64
    }

    fn dp_size(&self) -> usize {
        self.dp.as_ref().map_or(1, |c| c.size())
    }

    /// Rank 0 of the data-parallel group (or the only rank): the one that evaluates,
    /// reports and writes checkpoints.
    pub fn is_leader(&self) -> bool {
        self.dp.as_ref().is_none_or(|c| c.rank() == 0)
    }

    /// Bytes held by parameters, gradients, AdamW moments and activations.
    pub fn memory_bytes(&self) -> u64 {
        let t = &self.cfg.training;
        let n = self.model.num_params() as u64;
        let opt = self.be.len(&self.opt.m) as u64;
        4 * (2 * n + 2 * opt) + self.model.activation_bytes(t.batch_size, t.seq_len, t.activation_checkpointing)
    }

    /// Copies the next micro-batch to the device, refusing tokens outside the vocabulary.
    fn load_batch(&mut self) -> Result<()> {
        self.loader.next_batch(&mut self.host_inputs, &mut self.host_targets);
        check_vocab(&self.host_inputs, &self.host_targets, self.cfg.model.vocab_size)?;
        self.be.write_ids(&mut self.inputs, &self.host_inputs);
        self.be.write_ids(&mut self.targets, &self.host_targets);
        Ok(())
    }

    /// One optimizer update over `grad_accum` micro-batches; returns the mean loss per token.
    pub fn step(&mut self) -> Result<StepStats> {
        let accum = self.cfg.training.grad_accum;
        let tokens = self.tokens_per_step() as f64;
        // Each token's loss enters the mean with weight 1 / (tokens in the whole step).
        let grad_scale = (1.0 / tokens) as f32;
        let be = &self.be;
        be.fill(be.all_mut(&mut self.grads), 0.0);
        let mut loss_sum = 0.0;
        for _ in 0..accum {
            self.load_batch()?;
            let be = &self.be;
            self.model.forward(be, &self.params, &mut self.ws, &self.inputs);
            loss_sum += self.model.loss(be, &mut self.ws, &self.targets, Some(grad_scale));
            self.model.backward(be, &self.params, &mut self.grads, &mut self.ws, &self.inputs);
        }
        if let Some(dp) = &self.dp {
            loss_sum = all_reduce_f64(dp.as_ref(), loss_sum)?;
        }
        let loss = loss_sum / tokens;
        if !loss.is_finite() {
            return Err(Error::Training(format!(
                "the loss became {loss} at step {}: lower optimizer.lr or raise lr_scheduler.warmup_steps",
                self.step + 1
            )));
        }
        let lr = self.sched.lr(self.step);
        let grad_norm = match (&self.dp, &self.zero) {
            (None, _) => {
                let norm = AdamW::<B>::grad_norm(&self.be, &self.grads);
                self.opt.update(&self.be, &mut self.params, &self.grads, lr, self.opt.clip_factor(norm));
                norm
            }
            (Some(dp), None) => {
                // Sum the ranks' gradients (each already scaled by 1 / global tokens) in rank
                // order, so every rank applies the same update and the weights stay identical
                // bit for bit. Host copies for now; device buffers go to NCCL with CUDA.
                let mut host = self.be.download(&self.grads);
                dp.all_reduce_sum(&mut host)?;
                self.grads = self.be.upload(&host);
                let norm = AdamW::<B>::grad_norm(&self.be, &self.grads);
                self.opt.update(&self.be, &mut self.params, &self.grads, lr, self.opt.clip_factor(norm));
                norm
            }
            (Some(dp), Some(z)) => {
                // ZeRO-1: each rank receives the summed gradients of its own range only,
                // updates that range with its share of the AdamW state, and the updated
                // ranges are gathered back into everyone's full parameters.
                let mut host = self.be.download(&self.grads);
                host.resize(z.padded, 0.0);
                let mut grad_shard = vec![0.0f32; z.len];
                dp.reduce_scatter_sum(&host, &mut grad_shard)?;
                let squares: f64 = grad_shard.iter().map(|g| (*g as f64) * (*g as f64)).sum();
                let norm = all_reduce_f64(dp.as_ref(), squares)?.sqrt();
                let mut params = self.be.download(&self.params);
                params.resize(z.padded, 0.0);
                let mut shard = self.be.upload(&params[z.start..z.start + z.len]);
                let clip = self.opt.clip_factor(norm);
                self.opt.update(&self.be, &mut shard, &self.be.upload(&grad_shard), lr, clip);
                dp.all_gather(&self.be.download(&shard), &mut params)?;
                params.truncate(self.model.num_params());
                self.params = self.be.upload(&params);
                norm
            }
        };
        self.step += 1;
        Ok(StepStats { loss, grad_norm, lr })
    }

    /// A copy of everything a checkpoint holds, for a background writer: on the leader
    /// rank; the others return None. Under ZeRO-1 every rank must call it (the AdamW state
    /// is gathered from all ranks, so checkpoints hold it whole, by global name).
    pub fn snapshot(&self) -> Result<Option<Snapshot>> {
        if self.zero.is_none() && !self.is_leader() {
            return Ok(None);
        }
        let (exp_avg, exp_avg_sq) = self.full_moments()?;
        if !self.is_leader() {
            return Ok(None);
        }
        let be = &self.be;
        Ok(Some(Snapshot {
            model: self.cfg.model.clone(),
            layout: self.model.layout.clone(),
            params: be.download(&self.params),
            exp_avg,
            exp_avg_sq,
            step: self.step,
            tokens: self.step * self.tokens_per_step(),
            data: self.loader.position(),
            parallel: ondol_ckpt::Layout { tp: 1, pp: 1, dp: self.dp_size() },
            run_config: toml::to_string(&self.cfg).expect("config serializes"),
            extra_files: self.tokenizer.iter().cloned().collect(),
            eos_token_id: self.eos_token_id,
            max_shard_bytes: self.cfg.checkpoint.max_shard_bytes,
        }))
    }

    /// The AdamW moments of the whole flat buffer (gathered from the ranks under ZeRO-1).
    fn full_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let (m, v) = (self.be.download(&self.opt.m), self.be.download(&self.opt.v));
        match (&self.dp, &self.zero) {
            (Some(dp), Some(z)) => {
                let gather = |shard: Vec<f32>| -> Result<Vec<f32>> {
                    let mut full = vec![0.0f32; z.padded];
                    dp.all_gather(&shard, &mut full)?;
                    full.truncate(self.model.num_params());
                    Ok(full)
                };
                Ok((gather(m)?, gather(v)?))
            }
            _ => Ok((m, v)),
        }
    }

    /// Continues from a checkpoint: parameters, AdamW state, step and data position. The
    /// checkpoint must come from the same model and the same data geometry (else the data
    /// order could not continue exactly); anything else (steps, learning rate) may change.
    pub fn restore(&mut self, ckpt: Loaded) -> Result<()> {
        let origin = ckpt.dir.join("ondol.toml").display().to_string();
        let saved = RunConfig::parse(&ckpt.run_config, &origin, &[])?;
        let t = &self.cfg.training;
        let pairs = [
            ("model", to_json(&saved.model), to_json(&self.cfg.model)),
            ("data", to_json(&saved.data), to_json(&self.cfg.data)),
            (
                "training",
                // The data position counts global batches, and tensors are stored whole, so any
                // data-parallel size that keeps the global batch resumes exactly.
                to_json(&(
                    saved.training.batch_size * saved.parallelism.dp,
                    saved.training.seq_len,
                    saved.training.grad_accum,
                    saved.training.seed,
                    saved.training.shuffle,
                )),
                to_json(&(t.batch_size * self.cfg.parallelism.dp, t.seq_len, t.grad_accum, t.seed, t.shuffle)),
            ),
        ];
        for (section, theirs, ours) in pairs {
            if theirs != ours {
                let key = if section == "training" {
                    "training.{batch_size x parallelism.dp (the global batch), seq_len, grad_accum, seed, shuffle}"
                        .to_string()
                } else {
                    first_difference(section, &theirs, &ours)
                };
                return Err(Error::config(
                    key,
                    format!(
                        "differs from the checkpoint {} (it has {}); resume with the same value",
                        ckpt.dir.display(),
                        theirs
                    ),
                ));
            }
        }
        self.loader.set_position(&ckpt.state.data).map_err(|e| {
            Error::Input(format!("{}: bad data position: {e}", ckpt.dir.join("trainer_state.json").display()))
        })?;
        self.params = self.be.upload(&ckpt.params);
        let (m, v) = match &self.zero {
            None => (ckpt.exp_avg, ckpt.exp_avg_sq),
            Some(z) => (z.slice(&ckpt.exp_avg), z.slice(&ckpt.exp_avg_sq)),
        };
        self.opt.m = self.be.upload(&m);
        self.opt.v = self.be.upload(&v);
        self.opt.step = ckpt.state.step;
        self.step = ckpt.state.step;
        Ok(())
    }

    /// Mean loss per token over the first `eval_batches` validation batches (the same
    /// batches at every evaluation, so values are comparable along the run).
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let Some(val) = self.val.clone().filter(|_| self.is_leader()) else { return Ok(None) };
        let t = &self.cfg.training;
        let mut loader = Loader::new(val, t.seq_len, t.batch_size, Order::Sequential, 0, 1)
            .map_err(|e| Error::config("data.val", format!("too little validation data for one batch: {e}")))?;
        let batches = t.eval_batches;
        Ok(Some(evaluate(&self.be, &self.model, &self.params, &mut self.ws, &mut loader, batches)?.0))
    }
}

/// ZeRO-1's partition of the flat parameter buffer: padded to `padded = len * world`
/// elements, rank r holds the AdamW state of `[start, start + len)` with `start = r * len`.
#[derive(Clone, Copy, Debug)]
struct ZeroShard {
    start: usize,
    len: usize,
    padded: usize,
}

impl ZeroShard {
    fn new(n: usize, rank: usize, world: usize) -> Self {
        let len = n.div_ceil(world);
        Self { start: rank * len, len, padded: len * world }
    }

    /// The buffer's decay runs clipped to this shard, shifted to start at 0; the padding
    /// past the last parameter gets no decay.
    fn decay_runs(&self, runs: &[(std::ops::Range<usize>, bool)]) -> Vec<(std::ops::Range<usize>, bool)> {
        let end = self.start + self.len;
        let mut out: Vec<_> = runs
            .iter()
            .filter_map(|(r, decay)| {
                let (a, b) = (r.start.max(self.start), r.end.min(end));
                (a < b).then(|| (a - self.start..b - self.start, *decay))
            })
            .collect();
        let covered = out.last().map_or(0, |(r, _)| r.end);
        if covered < self.len {
            out.push((covered..self.len, false));
        }
        out
    }

    /// This shard of a whole-buffer tensor, zero-padded.
    fn slice(&self, full: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; self.len];
        let end = (self.start + self.len).min(full.len());
        if self.start < end {
            out[..end - self.start].copy_from_slice(&full[self.start..end]);
        }
        out
    }
}

/// Sums an f64 over the group without losing digits to the f32 collectives: each rank's value
/// travels as a high and a low f32 part in slots of its own, so the transport is exact, and the
/// parts are added in f64 in rank order.
fn all_reduce_f64(dp: &dyn Communicator, x: f64) -> Result<f64> {
    let mut parts = vec![0.0f32; 2 * dp.size()];
    let hi = x as f32;
    parts[2 * dp.rank()] = hi;
    parts[2 * dp.rank() + 1] = (x - hi as f64) as f32;
    dp.all_reduce_sum(&mut parts)?;
    Ok(parts.chunks(2).map(|p| p[0] as f64 + p[1] as f64).sum())
}

/// Where training batches come from: one source, or a weighted mixture of several.
enum Batches {
    One(Loader),
    Mix(Mixture),
}

impl Batches {
    fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) {
        match self {
            Batches::One(l) => l.next_batch(inputs, targets),
            Batches::Mix(m) => m.next_batch(inputs, targets),
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

    fn set_position(&mut self, value: &serde_json::Value) -> std::result::Result<(), String> {
        match self {
            Batches::One(l) => {
                let c: Cursor = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
                l.set_cursor(c).map_err(|e| e.to_string())
            }
            Batches::Mix(m) => {
                let c: MixtureCursor = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
                m.set_cursor(&c).map_err(|e| e.to_string())
            }
        }
    }
}

/// Refuses token ids the model has no embedding for (a mismatched tokenizer or config).
fn check_vocab(inputs: &[u32], targets: &[u32], vocab: usize) -> Result<()> {
    match inputs.iter().chain(targets).find(|&&t| t as usize >= vocab) {
        None => Ok(()),
        Some(bad) => Err(Error::config(
            "model.vocab_size",
            format!("the data holds token id {bad}, outside the vocabulary of {vocab}: check the data and the model"),
        )),
    }
}

/// Mean loss per token of `model` over the next `batches` batches of `loader` (at most one
/// epoch), and the number of tokens it covered.
pub fn evaluate<B: Backend>(
    be: &B,
    model: &Model,
    params: &B::Buf,
    ws: &mut Workspace<B>,
    loader: &mut Loader,
    batches: usize,
) -> Result<(f64, u64)> {
    let rows = ws.batch * ws.seq;
    let (mut inputs, mut targets) = (vec![0u32; rows], vec![0u32; rows]);
    let (mut ids, mut tgt) = (be.upload_ids(&inputs), be.upload_ids(&targets));
    let batches = batches.min(loader.batches_per_epoch() as usize).max(1);
    let mut sum = 0.0;
    for _ in 0..batches {
        loader.next_batch(&mut inputs, &mut targets);
        check_vocab(&inputs, &targets, model.cfg.vocab_size)?;
        be.write_ids(&mut ids, &inputs);
        be.write_ids(&mut tgt, &targets);
        model.forward(be, params, ws, &ids);
        sum += model.loss(be, ws, &tgt, None);
    }
    let tokens = (batches * rows) as u64;
    Ok((sum / tokens as f64, tokens))
}

/// The result of a whole run.
#[derive(Clone, Debug)]
pub struct Summary {
    pub steps: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub first_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub seconds: f64,
}

/// Runs the remaining updates up to `cfg.training.steps`, evaluating, reporting and
/// checkpointing (every `checkpoint.every` steps and at the end) along the way.
/// Ranks other than the leader pass no writer and a silent [`Metrics`].
pub fn run<B: Backend>(
    trainer: &mut Trainer<B>,
    metrics: &mut Metrics,
    mut ckpt: Option<&mut Writer>,
) -> Result<Summary> {
    let total = trainer.cfg.training.steps;
    let every = trainer.cfg.checkpoint.every;
    let (eval_every, log_every) = (trainer.cfg.training.eval_every, trainer.cfg.metrics.log_every);
    let flops_per_token = trainer.model.flops_per_token(trainer.cfg.training.seq_len) as f64;
    let mem = trainer.memory_bytes();
    let first_val_loss = trainer.evaluate()?;
    if let Some(v) = first_val_loss {
        metrics.eval(trainer.step, v)?;
    }
    let start_step = trainer.step;
    let (start, mut window_start, mut window_tokens) = (Instant::now(), Instant::now(), 0u64);
    let (mut first_loss, mut last) = (f64::NAN, StepStats { loss: f64::NAN, grad_norm: 0.0, lr: 0.0 });
    let mut final_val_loss = first_val_loss;
    while trainer.step < total {
        last = trainer.step()?;
        if trainer.step == start_step + 1 {
            first_loss = last.loss;
        }
        window_tokens += trainer.tokens_per_step();
        let step = trainer.step;
        if step.is_multiple_of(log_every) || step == total {
            let secs = window_start.elapsed().as_secs_f64();
            let tokens_per_s = window_tokens as f64 / secs;
            metrics.step(StepRow {
                step,
                loss: last.loss,
                lr: last.lr,
                grad_norm: last.grad_norm,
                tokens: step * trainer.tokens_per_step(),
                tokens_per_s,
                mfu: tokens_per_s * flops_per_token / metrics.peak_flops,
                mem_bytes: mem,
            })?;
            (window_start, window_tokens) = (Instant::now(), 0);
        } else {
            metrics.tick(step, last.loss);
        }
        if (eval_every > 0 && step.is_multiple_of(eval_every)) || step == total {
            final_val_loss = trainer.evaluate()?;
            if let Some(v) = final_val_loss {
                metrics.eval(step, v)?;
            }
            // Evaluation time is not training throughput.
            window_start = Instant::now();
        }
        if (every > 0 && step.is_multiple_of(every) || step == total)
            && let Some(snap) = trainer.snapshot()?
            && let Some(writer) = ckpt.as_deref_mut()
        {
            writer.submit(snap)?;
        }
    }
    if let Some(dir) = ckpt.map(|w| w.wait()).transpose()?.flatten() {
        metrics.note(format!("checkpoint {}", dir.display()));
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Summary {
        steps: trainer.step,
        first_loss,
        final_loss: last.loss,
        first_val_loss,
        final_val_loss,
        tokens_per_s: ((trainer.step - start_step) * trainer.tokens_per_step()) as f64 / seconds,
        seconds,
    })
}

fn to_json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("configs serialize")
}

/// The dotted key of the first field where two serialized config sections differ.
fn first_difference(section: &str, a: &serde_json::Value, b: &serde_json::Value) -> String {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .keys()
            .chain(b.keys())
            .find(|k| a.get(*k) != b.get(*k))
            .map_or(section.to_string(), |k| format!("{section}.{k}")),
        _ => section.to_string(),
    }
}
