//! The training loop. [`Trainer::step`] is one optimizer update, readable top to bottom:
//! for each micro-batch forward, loss, backward (gradients accumulate in the flat buffer);
//! then the global gradient norm, clipping, the learning rate, and AdamW.

use crate::config::{DataFormat, RunConfig};
use crate::metrics::{Metrics, StepRow};
use ondol_core::{Backend, Error, Result};
use ondol_data::{Loader, Order, SourceKind, TokenStream, expand_globs};
use ondol_model::{Transformer, Workspace};
use ondol_optim::{AdamW, LrSchedule};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Training and validation token streams, opened and split as the config says.
pub struct Data {
    pub train: Arc<TokenStream>,
    pub val: Option<Arc<TokenStream>>,
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
            let files = expand_globs(patterns, base).map_err(data_error)?;
            TokenStream::open(&files, kind).map_err(data_error)
        };
        let train = open(&d.train)?;
        let (train, val) = if !d.val.is_empty() {
            (train, Some(open(&d.val)?))
        } else if d.val_fraction > 0.0 {
            let (t, v) = train.split_tail(d.val_fraction).map_err(data_error)?;
            (t, Some(v))
        } else {
            (train, None)
        };
        Ok(Self { train: Arc::new(train), val: val.map(Arc::new) })
    }
}

fn data_error(e: ondol_data::DataError) -> Error {
    Error::Input(e.to_string())
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
    pub model: Transformer,
    pub params: B::Buf,
    grads: B::Buf,
    pub opt: AdamW<B>,
    sched: LrSchedule,
    ws: Workspace<B>,
    loader: Loader,
    val: Option<Arc<TokenStream>>,
    /// Host staging for one micro-batch of inputs and targets, and their device copies.
    host_inputs: Vec<u32>,
    host_targets: Vec<u32>,
    inputs: B::Ids,
    targets: B::Ids,
    pub step: u64,
}

impl<B: Backend> Trainer<B> {
    pub fn new(be: B, cfg: RunConfig, data: Data) -> Result<Self> {
        let model = Transformer::new(cfg.model.clone())?;
        let t = &cfg.training;
        let params = be.upload(&model.layout.init(t.seed));
        let grads = be.zeros(model.num_params());
        let opt = AdamW::new(&be, cfg.optimizer.clone(), model.num_params(), model.layout.decay_runs());
        let sched = LrSchedule::new(cfg.lr_scheduler.clone(), cfg.optimizer.lr, t.steps);
        let ws = Workspace::new(&be, &model, t.batch_size, t.seq_len)?;
        let order = if t.shuffle { Order::Shuffled { seed: t.seed } } else { Order::Sequential };
        let loader = Loader::new(data.train, t.seq_len, t.batch_size, order, 0, 1).map_err(data_error)?;
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
            host_inputs: vec![0; rows],
            host_targets: vec![0; rows],
            inputs,
            targets,
            step: 0,
            cfg,
        })
    }

    /// Tokens consumed by one optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        let t = &self.cfg.training;
        (t.batch_size * t.seq_len * t.grad_accum) as u64
    }

    /// Bytes held by parameters, gradients, AdamW moments and activations.
    pub fn memory_bytes(&self) -> u64 {
        let t = &self.cfg.training;
        4 * 4 * self.model.num_params() as u64 + self.model.activation_bytes(t.batch_size, t.seq_len)
    }

    /// Copies the next micro-batch to the device, refusing tokens outside the vocabulary.
    fn load_batch(&mut self, from_val: Option<&mut Loader>) -> Result<()> {
        let loader = from_val.unwrap_or(&mut self.loader);
        loader.next_batch(&mut self.host_inputs, &mut self.host_targets);
        let vocab = self.cfg.model.vocab_size as u32;
        if let Some(bad) = self.host_targets.iter().chain(&self.host_inputs).find(|&&t| t >= vocab) {
            return Err(Error::config(
                "model.vocab_size",
                format!(
                    "the data holds token id {bad}, outside the vocabulary of {vocab}: raise vocab_size or check data.train"
                ),
            ));
        }
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
            self.load_batch(None)?;
            let be = &self.be;
            self.model.forward(be, &self.params, &mut self.ws, &self.inputs);
            loss_sum += self.model.loss(be, &mut self.ws, &self.targets, Some(grad_scale));
            self.model.backward(be, &self.params, &mut self.grads, &mut self.ws, &self.inputs);
        }
        let loss = loss_sum / tokens;
        if !loss.is_finite() {
            return Err(Error::Training(format!(
                "the loss became {loss} at step {}: lower optimizer.lr or raise lr_scheduler.warmup_steps",
                self.step + 1
            )));
        }
        let grad_norm = AdamW::<B>::grad_norm(&self.be, &self.grads);
        let clip = self.opt.clip_factor(grad_norm);
        let lr = self.sched.lr(self.step);
        self.opt.update(&self.be, &mut self.params, &self.grads, lr, clip);
        self.step += 1;
        Ok(StepStats { loss, grad_norm, lr })
    }

    /// Mean loss per token over the first `eval_batches` validation batches (the same
    /// batches at every evaluation, so values are comparable along the run).
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let Some(val) = self.val.clone() else { return Ok(None) };
        let t = &self.cfg.training;
        let (seq, batch, batches) = (t.seq_len, t.batch_size, t.eval_batches);
        let mut loader = Loader::new(val, seq, batch, Order::Sequential, 0, 1)
            .map_err(|e| Error::config("data.val", format!("too little validation data for one batch: {e}")))?;
        let batches = batches.min(loader.batches_per_epoch() as usize).max(1);
        let mut sum = 0.0;
        for _ in 0..batches {
            self.load_batch(Some(&mut loader))?;
            self.model.forward(&self.be, &self.params, &mut self.ws, &self.inputs);
            sum += self.model.loss(&self.be, &mut self.ws, &self.targets, None);
        }
        Ok(Some(sum / (batches * batch * seq) as f64))
    }
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

/// Runs `cfg.training.steps` updates, evaluating and reporting along the way.
pub fn run<B: Backend>(trainer: &mut Trainer<B>, metrics: &mut Metrics) -> Result<Summary> {
    let total = trainer.cfg.training.steps;
    let (eval_every, log_every) = (trainer.cfg.training.eval_every, trainer.cfg.metrics.log_every);
    let flops_per_token = trainer.model.flops_per_token(trainer.cfg.training.seq_len) as f64;
    let mem = trainer.memory_bytes();
    let first_val_loss = trainer.evaluate()?;
    if let Some(v) = first_val_loss {
        metrics.eval(0, v)?;
    }
    let (start, mut window_start, mut window_tokens) = (Instant::now(), Instant::now(), 0u64);
    let (mut first_loss, mut last) = (f64::NAN, StepStats { loss: f64::NAN, grad_norm: 0.0, lr: 0.0 });
    let mut final_val_loss = first_val_loss;
    while trainer.step < total {
        last = trainer.step()?;
        if trainer.step == 1 {
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
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Summary {
        steps: trainer.step,
        first_loss,
        final_loss: last.loss,
        first_val_loss,
        final_val_loss,
        tokens_per_s: (trainer.step * trainer.tokens_per_step()) as f64 / seconds,
        seconds,
    })
}
