//! `[optimizer]`: AdamW with decoupled weight decay over one flat buffer. Moments live in
//! two more flat buffers of the same layout; the update runs once per maximal run of
//! tensors that share a decay flag (matrices decay; norms, biases and embeddings do not).

use ondol_core::{AdamWParams, Backend, Error, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate (the schedule scales it).
    pub lr: f32,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f32,
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    #[serde(default = "default_eps")]
    pub eps: f32,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f32,
}

fn default_weight_decay() -> f32 {
    0.1
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.95
}
fn default_eps() -> f32 {
    1e-8
}
fn default_grad_clip() -> f32 {
    1.0
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |key: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(format!("optimizer.{key}"), "must be a finite number >= 0"))
            }
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config("optimizer.lr", format!("{} must be a finite number > 0", self.lr)));
        }
        finite_nonneg("weight_decay", self.weight_decay)?;
        finite_nonneg("grad_clip", self.grad_clip)?;
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(format!("optimizer.{key}"), format!("{v} must be in [0, 1)")));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config("optimizer.eps", "must be a finite number > 0"));
        }
        Ok(())
    }
}

/// AdamW state: the two moment buffers, the step count and, on a mixed-precision backend,
/// the fp32 master weights (the model's own parameters are then their compute-type copy).
pub struct AdamW<B: Backend> {
    pub cfg: OptimizerConfig,
    pub m: B::Buf,
    pub v: B::Buf,
    pub master: Option<B::Buf>,
    /// Updates applied so far.
    pub step: u64,
    runs: Vec<(Range<usize>, bool)>,
}

impl<B: Backend> AdamW<B> {
    /// State for the parameters `params` (as f32) whose decay flags come in `runs` (see
    /// `ParamLayout::decay_runs`).
    pub fn new(be: &B, cfg: OptimizerConfig, params: &[f32], runs: Vec<(Range<usize>, bool)>) -> Self {
        let n = params.len();
        assert_eq!(runs.last().map_or(0, |(r, _)| r.end), n, "decay runs must cover the buffer");
        let master = be.mixed_precision().then(|| be.upload_f32(params));
        Self { cfg, m: be.zeros_f32(n), v: be.zeros_f32(n), master, step: 0, runs }
    }

    /// The parameters as the optimizer holds them: the fp32 master weights if it keeps them,
    /// else the model's `params` themselves.
    pub fn master_params(&self, be: &B, params: &B::Buf) -> Vec<f32> {
        be.download(self.master.as_ref().unwrap_or(params))
    }

    /// The global L2 norm of `grads`.
    pub fn grad_norm(be: &B, grads: &B::Buf) -> f64 {
        be.sum_squares(be.all(grads)).sqrt()
    }

    /// The factor that brings the gradient norm down to `grad_clip` (1 when within it).
    pub fn clip_factor(&self, norm: f64) -> f32 {
        let max = self.cfg.grad_clip as f64;
        if max > 0.0 && norm > max { (max / (norm + 1e-6)) as f32 } else { 1.0 }
    }

    /// One update at learning rate `lr` with gradients multiplied by `grad_scale`.
    pub fn update(&mut self, be: &B, params: &mut B::Buf, grads: &B::Buf, lr: f32, grad_scale: f32) {
        self.update_window(be, params, grads, 0, lr, grad_scale);
    }

    /// [`AdamW::update`] of the parameters and gradients from `offset` on, where this state
    /// covers a window of larger buffers (ZeRO-1's shard of the flat buffer).
    pub fn update_window(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        offset: usize,
        lr: f32,
        grad_scale: f32,
    ) {
        self.step += 1;
        for (range, decay) in &self.runs {
            let hp = AdamWParams {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if *decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            let there = range.start + offset..range.end + offset;
            let g = be.view(grads, there.clone());
            let m = be.view_mut(&mut self.m, range.clone());
            let v = be.view_mut(&mut self.v, range.clone());
            match &mut self.master {
                None => be.adamw(be.view_mut(params, there), g, m, v, hp, None),
                Some(master) => {
                    let copy = be.view_mut(params, there);
                    be.adamw(be.view_mut(master, range.clone()), g, m, v, hp, Some(copy))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ondol_cpu::CpuBackend;

    fn cfg() -> OptimizerConfig {
        OptimizerConfig { lr: 0.1, weight_decay: 0.5, beta1: 0.9, beta2: 0.95, eps: 1e-8, grad_clip: 1.0 }
    }

    #[test]
    fn decay_applies_only_to_decayed_runs() {
        let be = CpuBackend;
        let mut opt = AdamW::new(&be, cfg(), &[1.0; 4], vec![(0..2, true), (2..4, false)]);
        let mut p = vec![1.0f32; 4];
        opt.update(&be, &mut p, &vec![0.0; 4], 0.1, 1.0);
        // Zero gradient: only weight decay moves the parameters.
        assert_eq!(p, [0.95, 0.95, 1.0, 1.0]);
    }

    #[test]
    fn clipping_scales_to_the_limit() {
        let be = CpuBackend;
        let opt = AdamW::new(&be, cfg(), &[0.0; 2], vec![(0..2, true)]);
        let norm = AdamW::<CpuBackend>::grad_norm(&be, &vec![3.0, 4.0]);
        assert_eq!(norm, 5.0);
        assert!((opt.clip_factor(norm) as f64 * 5.0 - 1.0).abs() < 1e-6);
        assert_eq!(opt.clip_factor(0.5), 1.0);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let mut c = cfg();
        c.beta2 = 1.0;
        assert!(c.validate().unwrap_err().to_string().contains("optimizer.beta2"));
        let mut c = cfg();
        c.lr = -1.0;
        assert!(c.validate().unwrap_err().to_string().contains("optimizer.lr"));
    }
}
