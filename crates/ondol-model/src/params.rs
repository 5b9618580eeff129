//! The parameter registry: every parameter of a model lives in ONE flat buffer, and this
//! layout says where each named tensor sits in it.
//!
//! Names are exactly Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), built from
//! path segments in one place ([`Path`]), so checkpoints need no rename tables. Tensors are
//! registered in a deliberate order: q, k and v projections back to back (one fused
//! `[(H + 2 Hkv) D, d]` matrix for one GEMM), likewise gate and up.

use ondol_core::Rng;
use std::ops::Range;

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal {
        std: f32,
    },
    Constant(f32),
    /// Uniform in [-bound, bound] (PyTorch's default for convolutions and Mamba's dt_proj).
    Uniform {
        bound: f32,
    },
    /// Mamba's dt bias: the inverse softplus of a step drawn log-uniformly in [min, max],
    /// floored at `floor`, so that softplus(bias) starts as that step.
    StepBias {
        min: f64,
        max: f64,
        floor: f64,
    },
    /// Element i holds log(1 + i % period): S4D-real's A = -(1..=N) per channel (Mamba-1,
    /// period N) or per head (Mamba-2, period = heads).
    LogIndex {
        period: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub init: Init,
    /// Whether AdamW applies weight decay (matrices yes; norms, biases, embeddings no).
    pub decay: bool,
}

impl ParamInfo {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// A dotted Hugging Face path under construction: `Path::new("model").at("layers").at(3)`.
#[derive(Clone, Debug)]
pub struct Path(String);

impl Path {
    pub fn new(root: &str) -> Self {
        Self(root.to_string())
    }
    pub fn at(&self, segment: impl std::fmt::Display) -> Self {
        if self.0.is_empty() { Self(segment.to_string()) } else { Self(format!("{}.{segment}", self.0)) }
    }
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// The ordered list of parameters and their places in the flat buffer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamLayout {
    params: Vec<ParamInfo>,
    total: usize,
}

impl ParamLayout {
    /// Append a tensor; returns its range in the flat buffer.
    pub fn add(&mut self, path: Path, shape: &[usize], init: Init, decay: bool) -> Range<usize> {
        let info = ParamInfo { name: path.0, shape: shape.to_vec(), offset: self.total, init, decay };
        debug_assert!(self.params.iter().all(|p| p.name != info.name), "duplicate {}", info.name);
        self.total += info.len();
        let range = info.range();
        self.params.push(info);
        range
    }

    pub fn total(&self) -> usize {
        self.total
    }
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }
    pub fn get(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Fill a flat buffer with the initial values. Each tensor draws from its own stream,
    /// derived from the seed and its name, so a tensor's init does not depend on which other
    /// tensors exist or on their order (what sharded and pipelined layouts need).
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let root = Rng::new(seed);
        let mut flat = vec![0.0f32; self.total];
        for p in &self.params {
            let out = &mut flat[p.range()];
            match p.init {
                Init::Constant(c) => out.fill(c),
                Init::LogIndex { period } => {
                    out.iter_mut().enumerate().for_each(|(i, v)| *v = ((1 + i % period) as f32).ln());
                }
                Init::Normal { std } => {
                    let mut rng = root.fork(fnv1a(&p.name));
                    out.iter_mut().for_each(|v| *v = (rng.normal() * std as f64) as f32);
                }
                Init::Uniform { bound } => {
                    let mut rng = root.fork(fnv1a(&p.name));
                    out.iter_mut().for_each(|v| *v = ((2.0 * rng.next_f64() - 1.0) * bound as f64) as f32);
                }
                Init::StepBias { min, max, floor } => {
                    let mut rng = root.fork(fnv1a(&p.name));
                    out.iter_mut().for_each(|v| {
                        let step = (rng.next_f64() * (max.ln() - min.ln()) + min.ln()).exp().max(floor);
                        // softplus^-1(s) = s + log(1 - e^-s)
                        *v = (step + (-(-step).exp_m1()).ln()) as f32;
                    });
                }
            }
        }
        flat
    }

    /// Maximal runs of consecutive tensors that share a decay flag, as flat ranges: the
    /// optimizer makes one call per run instead of one per tensor.
    pub fn decay_runs(&self) -> Vec<(Range<usize>, bool)> {
        let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
        for p in &self.params {
            match runs.last_mut() {
                Some((r, d)) if *d == p.decay && r.end == p.offset => r.end = p.range().end,
                _ => runs.push((p.range(), p.decay)),
            }
        }
        runs
    }
}

/// FNV-1a, a stable string hash (std's hasher may change between Rust releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
