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
    /// The shape of this rank's tensor (the global shape unless it is a shard or padded).
    pub shape: Vec<usize>,
    pub offset: usize,
    pub init: Init,
    /// Whether AdamW applies weight decay (matrices yes; norms, biases, embeddings no).
    pub decay: bool,
    /// Where the tensor sits in the global tensor of the same name.
    pub place: Placement,
    /// Model files store the value minus one (Gemma 3's norm weights: it scales by 1 + w).
    pub stored_minus_one: bool,
}

/// How a rank's tensor relates to the global tensor of the same name (the one a checkpoint
/// stores): it is the concatenation, along `axis`, of `pieces` of the global tensor along that
/// axis, followed by `pad` rows of zeros. A whole tensor is one piece covering the axis; a
/// tensor-parallel shard is one piece; GPT-2's fused q|k|v shard is three.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub global_shape: Vec<usize>,
    pub axis: usize,
    pub pieces: Vec<Range<usize>>,
    /// Whether this copy is the one that counts: in the gradient norm and in what a checkpoint
    /// saves. False for every tensor-parallel replica but the first and for the copy of a tied
    /// embedding that the last pipeline stage keeps for its head.
    pub primary: bool,
    /// The copies of this piece on several tensor-parallel ranks each hold part of its
    /// gradient, which must be summed over them (key/value heads shared by several ranks).
    pub partial_grad: bool,
    /// Rows of zeros after the pieces along `axis` that belong to no global tensor: an output
    /// head padded to aligned rows (see [`crate::Part::vocab_align`]). Never saved, never
    /// loaded; they stay zero because nothing ever gives them a gradient.
    pub pad: usize,
}

impl Placement {
    /// The whole tensor of `shape`.
    #[allow(clippy::single_range_in_vec_init)] // one piece: the whole axis
    pub fn whole(shape: &[usize]) -> Self {
        Self {
            global_shape: shape.to_vec(),
            axis: 0,
            pieces: vec![0..shape[0]],
            primary: true,
            partial_grad: false,
            pad: 0,
        }
    }

    /// The local shape: the global one with `axis` set to the pieces' total and the padding.
    pub fn local_shape(&self) -> Vec<usize> {
        let mut shape = self.global_shape.clone();
        shape[self.axis] = self.pieces.iter().map(|p| p.len()).sum::<usize>() + self.pad;
        shape
    }

    pub fn is_whole(&self) -> bool {
        self.pieces.len() == 1 && self.pieces[0] == (0..self.global_shape[self.axis]) && self.pad == 0
    }

    /// Calls `f(global_range, local_range)` for every contiguous run the pieces copy.
    fn runs(&self, mut f: impl FnMut(Range<usize>, Range<usize>)) {
        let g = &self.global_shape;
        let outer: usize = g[..self.axis].iter().product();
        let inner: usize = g[self.axis + 1..].iter().product();
        let mut local = 0;
        for o in 0..outer {
            for p in &self.pieces {
                let start = (o * g[self.axis] + p.start) * inner;
                let len = p.len() * inner;
                f(start..start + len, local..local + len);
                local += len;
            }
            local += self.pad * inner;
        }
    }

    /// This rank's tensor, cut from the global one (its padding zero).
    pub fn extract(&self, global: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; self.local_shape().iter().product()];
        self.runs(|g, l| out[l].copy_from_slice(&global[g]));
        out
    }

    /// Writes this rank's tensor into its place in the global one (its padding nowhere).
    pub fn insert(&self, local: &[f32], global: &mut [f32]) {
        self.runs(|g, l| global[g].copy_from_slice(&local[l]));
    }
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
    /// Append a whole tensor; returns its range in the flat buffer.
    pub fn add(&mut self, path: Path, shape: &[usize], init: Init, decay: bool) -> Range<usize> {
        self.add_placed(path, Placement::whole(shape), init, decay)
    }

    /// Append a tensor placed in a global one (a shard or a replica); returns its range.
    pub fn add_placed(&mut self, path: Path, place: Placement, init: Init, decay: bool) -> Range<usize> {
        let shape = place.local_shape();
        let info = ParamInfo { name: path.0, shape, offset: self.total, init, decay, place, stored_minus_one: false };
        debug_assert!(self.params.iter().all(|p| p.name != info.name), "duplicate {}", info.name);
        self.total += info.len();
        let range = info.range();
        self.params.push(info);
        range
    }

    /// Has model files store the tensor at `range` (as `add` returned it) as its value minus
    /// one (see [`ParamInfo::stored_minus_one`]).
    pub fn store_minus_one(&mut self, range: &Range<usize>) {
        let p = self.params.iter_mut().rev().find(|p| p.range() == *range).expect("a tensor of this layout");
        p.stored_minus_one = true;
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
    /// tensors exist or on their order; a shard is cut from its global tensor's values, so
    /// every parallel layout starts from the same model.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let root = Rng::new(seed);
        let mut flat = vec![0.0f32; self.total];
        for p in &self.params {
            if p.place.is_whole() {
                init_tensor(&root, p, &mut flat[p.range()]);
            } else {
                let mut global = vec![0.0f32; p.place.global_shape.iter().product()];
                init_tensor(&root, p, &mut global);
                flat[p.range()].copy_from_slice(&p.place.extract(&global));
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

/// Draws the initial values of the whole tensor `p` into `out`.
fn init_tensor(root: &Rng, p: &ParamInfo, out: &mut [f32]) {
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

/// FNV-1a, a stable string hash (std's hasher may change between Rust releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
