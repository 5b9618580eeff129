//! `[lr_scheduler]`: linear warmup, then cosine decay, warmup-stable-decay (WSD), or a
//! constant rate; cosine and WSD end at `min_lr_ratio` times the peak.

use ondol_core::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    /// Warmup-stable-decay: the peak rate until the last `wsd_decay_fraction` of the steps
    /// after warmup (at least one where the fraction is not 0), then a linear ramp down to
    /// the minimum.
    Wsd,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_decay")]
    pub decay: Decay,
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f32,
    #[serde(default = "default_wsd_fraction")]
    pub wsd_decay_fraction: f32,
}

fn default_decay() -> Decay {
    Decay::Cosine
}
fn default_min_lr_ratio() -> f32 {
    0.1
}
fn default_wsd_fraction() -> f32 {
    0.2
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            warmup_steps: 0,
            decay: default_decay(),
            min_lr_ratio: default_min_lr_ratio(),
            wsd_decay_fraction: default_wsd_fraction(),
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self, total_steps: u64) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::config("lr_scheduler.min_lr_ratio", format!("{} must be in [0, 1]", self.min_lr_ratio)));
        }
        if !(0.0..=1.0).contains(&self.wsd_decay_fraction) {
            return Err(Error::config(
                "lr_scheduler.wsd_decay_fraction",
                format!("{} must be in [0, 1]", self.wsd_decay_fraction),
            ));
        }
        if self.warmup_steps > total_steps {
            return Err(Error::config(
                "lr_scheduler.warmup_steps",
                format!("{} exceeds training.steps = {total_steps}", self.warmup_steps),
            ));
        }
        Ok(())
    }
}

impl SchedulerConfig {
    /// Refuses a value that would change the schedule if it were read, where it is not, so
    /// that none looks applied when it is not (defaults pass: configs written out hold them).
    pub fn refuse_unread(&self) -> Result<()> {
        if self.decay != Decay::Wsd && self.wsd_decay_fraction != default_wsd_fraction() {
            return Err(Error::config(
                "lr_scheduler.wsd_decay_fraction",
                format!("{} is read only with decay = \"wsd\"; leave it out", self.wsd_decay_fraction),
            ));
        }
        if self.decay == Decay::Constant && self.min_lr_ratio != default_min_lr_ratio() {
            return Err(Error::config(
                "lr_scheduler.min_lr_ratio",
                format!("{} is where a decay ends; decay = \"constant\" has none: leave it out", self.min_lr_ratio),
            ));
        }
        Ok(())
    }
}

/// The learning rate at each step of a run of `total_steps`.
#[derive(Clone, Debug)]
pub struct LrSchedule {
    cfg: SchedulerConfig,
    peak: f32,
    total_steps: u64,
}

impl LrSchedule {
    pub fn new(cfg: SchedulerConfig, peak: f32, total_steps: u64) -> Self {
        Self { cfg, peak, total_steps }
    }

    /// The rate for the update of 0-based `step`.
    pub fn lr(&self, step: u64) -> f32 {
        let (warmup, total) = (self.cfg.warmup_steps, self.total_steps.max(1));
        if step < warmup {
            return self.peak * (step + 1) as f32 / warmup as f32;
        }
        let min = self.peak * self.cfg.min_lr_ratio;
        let after = (step - warmup) as f64;
        let span = total.saturating_sub(warmup).max(1) as f64;
        match self.cfg.decay {
            Decay::Constant => self.peak,
            Decay::Cosine => {
                // From the peak at the first update after warmup to the minimum at the last;
                // a single one after warmup is the last (alone in its run, it keeps the peak).
                let progress = match span > 1.0 {
                    true => (after / (span - 1.0)).min(1.0),
                    false => (warmup > 0) as u8 as f64,
                };
                min + (self.peak - min) * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
            }
            Decay::Wsd => {
                let fraction = self.cfg.wsd_decay_fraction as f64;
                let decay_steps = (span * fraction).round().max(if fraction > 0.0 { 1.0 } else { 0.0 });
                let decay_start = span - decay_steps;
                if after < decay_start || decay_steps == 0.0 {
                    self.peak
                } else {
                    let progress = ((after - decay_start + 1.0) / decay_steps).min(1.0);
                    self.peak + (min - self.peak) * progress as f32
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> LrSchedule {
        LrSchedule::new(
            SchedulerConfig { warmup_steps: 10, decay, min_lr_ratio: 0.1, wsd_decay_fraction: 0.2 },
            1.0,
            110,
        )
    }

    #[test]
    fn warmup_is_linear_up_to_the_peak() {
        let s = sched(Decay::Cosine);
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn cosine_falls_from_peak_to_min_monotonically() {
        let s = sched(Decay::Cosine);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(109) - 0.1).abs() < 1e-6);
        assert!((s.lr(59) - 0.55).abs() < 0.01);
        assert!((10..109).all(|i| s.lr(i + 1) <= s.lr(i)));
    }

    #[test]
    fn wsd_is_stable_then_decays_linearly_to_min() {
        let s = sched(Decay::Wsd);
        assert!((10..90).all(|i| s.lr(i) == 1.0));
        assert!(s.lr(90) < 1.0);
        assert!((s.lr(109) - 0.1).abs() < 1e-6);
        assert!((90..109).all(|i| s.lr(i + 1) < s.lr(i)));
    }

    /// Short runs still end at the minimum: one step after warmup, or a WSD fraction that
    /// rounds to no step.
    #[test]
    fn short_runs_end_at_the_minimum() {
        let run = |decay, warmup, fraction, steps| {
            let cfg = SchedulerConfig { warmup_steps: warmup, decay, min_lr_ratio: 0.1, wsd_decay_fraction: fraction };
            LrSchedule::new(cfg, 1.0, steps)
        };
        let s = run(Decay::Cosine, 5, 0.2, 6);
        assert!((s.lr(4) - 1.0).abs() < 1e-6 && (s.lr(5) - 0.1).abs() < 1e-6, "{} {}", s.lr(4), s.lr(5));
        assert_eq!(run(Decay::Cosine, 0, 0.2, 1).lr(0), 1.0, "a one-step run keeps the peak");
        let s = run(Decay::Wsd, 0, 0.05, 6);
        assert!((0..5).all(|i| s.lr(i) == 1.0) && (s.lr(5) - 0.1).abs() < 1e-6, "{}", s.lr(5));
    }

    #[test]
    fn constant_stays_at_peak() {
        let s = sched(Decay::Constant);
        assert!((10..110).all(|i| s.lr(i) == 1.0));
    }
}
