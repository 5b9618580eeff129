//! `[model]`: the architecture of a run, validated before anything is allocated.

use ondol_core::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// RMSNorm, rotary positions, grouped-query attention, SwiGLU, no biases.
    Llama,
    /// LayerNorm with bias, learned positions, GELU MLP, biases everywhere, tied head.
    Gpt2,
    /// Mamba-1: every layer an RMSNorm and a selective-scan mixer; tied head.
    Mamba,
    /// Mamba-2: every layer an RMSNorm and an SSD mixer; tied head.
    Mamba2,
    /// Nemotron-H style: `pattern` gives each layer's mixer (Mamba-2, attention or MLP).
    Hybrid,
    /// Gemma 3: Llama with RMSNorms before and after each mixer, an RMSNorm on each q and k
    /// head, GeGLU (GELU, tanh approximation), the embedding scaled by sqrt(d_model), and its
    /// own rotary theta for sliding-window layers (`rope_theta_local`); tied head by default.
    /// The rest is as a config gives it, with Llama's defaults: Gemma 3's own are a window on
    /// five layers of six (`attention_pattern = "LLLLLG"`), rope_theta 1e6 and
    /// rope_theta_local 1e4, norm_eps 1e-6.
    Gemma3,
}

/// The mixer of one layer of a hybrid model, from one character of `model.pattern`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `M`: a Mamba-2 mixer.
    Mamba,
    /// `*`: causal self-attention (grouped-query, no positional encoding, as Nemotron-H).
    Attention,
    /// `-`: an MLP with squared-ReLU activation.
    Mlp,
}

/// What one layer's attention attends, from `model.sliding_window` and
/// `model.attention_pattern`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerAttention {
    /// Keys per query (itself included) where the layer's window is local.
    pub window: Option<usize>,
    /// Whether q and k take rotary positions (false: NoPE).
    pub rope: bool,
}

/// `[model.mup]`: the scalar multipliers of a muP-parametrised Llama (HyperCLOVA X, Granite),
/// all 1 by default (plain Llama).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MupConfig {
    /// The token embedding's output is multiplied by it.
    pub embedding_multiplier: f64,
    /// Each block's output is multiplied by it before the residual add.
    pub residual_multiplier: f64,
    /// The logits are multiplied by it (HyperCLOVA X's logits_scaling; Granite's divides).
    pub logits_multiplier: f64,
    /// The attention scores' scale; unset: 1 / sqrt(head_dim).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_multiplier: Option<f64>,
}

impl Default for MupConfig {
    fn default() -> Self {
        Self { embedding_multiplier: 1.0, residual_multiplier: 1.0, logits_multiplier: 1.0, attention_multiplier: None }
    }
}

impl MupConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn validate(&self) -> Result<()> {
        let attention = self.attention_multiplier.unwrap_or(1.0);
        for (key, value) in [
            ("embedding_multiplier", self.embedding_multiplier),
            ("residual_multiplier", self.residual_multiplier),
            ("logits_multiplier", self.logits_multiplier),
            ("attention_multiplier", attention),
        ] {
            // (Applied in f32.)
            if !(value > 0.0 && (value as f32).is_normal()) {
                return Err(Error::config(format!("model.mup.{key}"), "must be a positive number within f32's range"));
            }
        }
        Ok(())
    }
}

/// `[model.ssm]`: the state-space mixers' sizes; defaults are Hugging Face's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsmConfig {
    /// States per channel (N); defaults to 16 (Mamba-1) or 128 (Mamba-2, hybrid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_size: Option<usize>,
    /// Width of the causal depthwise convolution.
    pub conv_kernel: usize,
    /// Mixer channels E = expand * d_model.
    pub expand: usize,
    /// Mamba-1's dt projection rank; defaults to ceil(d_model / 16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_step_rank: Option<usize>,
    /// Mamba-2: channels per head (E / head_dim heads).
    pub head_dim: usize,
    /// Mamba-2: groups of B and C (heads per group share them); the gated norm's groups too.
    pub n_groups: usize,
    /// Tokens per chunk: the SSD's chunk, and how often a scan saves its state for backward.
    pub chunk_size: usize,
    /// Initial step sizes are drawn log-uniformly in [time_step_min, time_step_max], at
    /// least time_step_floor.
    pub time_step_min: f64,
    pub time_step_max: f64,
    pub time_step_floor: f64,
}

impl SsmConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for SsmConfig {
    fn default() -> Self {
        Self {
            state_size: None,
            conv_kernel: 4,
            expand: 2,
            time_step_rank: None,
            head_dim: 64,
            n_groups: 1,
            chunk_size: 256,
            time_step_min: 0.001,
            time_step_max: 0.1,
            time_step_floor: 1e-4,
        }
    }
}

/// Rotary frequencies stretched for a context longer than the one a model was first trained
/// at, `[model.rope_scaling]`: `type = "linear"` divides every frequency by `factor` (Gemma 3
/// 4B and larger, on their global layers); `type = "llama3"` (Llama 3.1's) divides those whose
/// wavelength is longer than `original_max_seq_len / low_freq_factor` by it, keeps those
/// shorter than `original_max_seq_len / high_freq_factor`, and blends those between.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    #[serde(rename = "type")]
    pub kind: RopeScalingKind,
    pub factor: f64,
    /// llama3's alone (0: unset).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub low_freq_factor: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub high_freq_factor: f64,
    #[serde(default, skip_serializing_if = "is_zero_len")]
    pub original_max_seq_len: usize,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}
fn is_zero_len(n: &usize) -> bool {
    *n == 0
}

/// Where a block's RMSNorms sit around its mixer f (attention or MLP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockNorms {
    /// `x + f(norm(x))`: Llama, GPT-2, and every Mamba model.
    #[default]
    Pre,
    /// `x + norm(f(x))`: EXAONE 4's QK-Reorder-Norm.
    Post,
    /// `x + norm(f(norm(x)))`: Peri-LN, as HyperCLOVA X has it.
    Both,
}

impl BlockNorms {
    pub fn pre(self) -> bool {
        self != Self::Post
    }
    pub fn post(self) -> bool {
        self != Self::Pre
    }
}

/// The kinds of [`RopeScaling`] ondol implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingKind {
    Llama3,
    Linear,
}

impl RopeScaling {
    /// The scaling in words, as `inspect` and a mismatch name it.
    pub fn describe(&self) -> String {
        match self.kind {
            RopeScalingKind::Linear => format!("linear (factor {})", self.factor),
            RopeScalingKind::Llama3 => format!(
                "llama3 (factor {}, low_freq_factor {}, high_freq_factor {}, original_max_seq_len {})",
                self.factor, self.low_freq_factor, self.high_freq_factor, self.original_max_seq_len
            ),
        }
    }

    /// `inv_freq` rescaled, in f32 as transformers computes it (`_compute_llama3_parameters`,
    /// `_compute_linear_scaling_rope_parameters`).
    fn apply(&self, inv_freq: &[f32]) -> Vec<f32> {
        if self.kind == RopeScalingKind::Linear {
            return inv_freq.iter().map(|f| f / self.factor as f32).collect();
        }
        let (factor, low, high) = (self.factor as f32, self.low_freq_factor as f32, self.high_freq_factor as f32);
        let old_len = self.original_max_seq_len as f32;
        let (low_freq_wavelen, high_freq_wavelen) = (old_len / low, old_len / high);
        inv_freq
            .iter()
            .map(|&f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_freq_wavelen {
                    f
                } else if wavelen > low_freq_wavelen {
                    f / factor
                } else {
                    let smooth = (old_len / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("model.rope_scaling.{k}");
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(Error::config(key("factor"), format!("{} must be a number >= 1", self.factor)));
        }
        if self.kind == RopeScalingKind::Linear {
            let llama3 = [
                ("low_freq_factor", self.low_freq_factor != 0.0),
                ("high_freq_factor", self.high_freq_factor != 0.0),
                ("original_max_seq_len", self.original_max_seq_len != 0),
            ];
            return match llama3.iter().find(|(_, given)| *given) {
                Some((k, _)) => Err(Error::config(key(k), "is llama3's: linear scaling takes factor alone")),
                None => Ok(()),
            };
        }
        for (k, missing) in [
            ("low_freq_factor", self.low_freq_factor == 0.0),
            ("high_freq_factor", self.high_freq_factor == 0.0),
            ("original_max_seq_len", self.original_max_seq_len == 0),
        ] {
            if missing {
                return Err(Error::config(key(k), "llama3 scaling needs it (a positive number)"));
            }
        }
        if !(self.low_freq_factor > 0.0
            && self.high_freq_factor > self.low_freq_factor
            && self.high_freq_factor.is_finite())
        {
            return Err(Error::config(
                key("high_freq_factor"),
                format!(
                    "{} must be finite and above low_freq_factor = {}, which must be > 0",
                    self.high_freq_factor, self.low_freq_factor
                ),
            ));
        }
        if self.original_max_seq_len == 0 {
            return Err(Error::config(key("original_max_seq_len"), "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    /// Attention heads; unset for pure Mamba models.
    #[serde(default)]
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `n_heads` (plain multi-head).
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Width of an attention head; defaults to d_model / n_heads. Llama and hybrid attention
    /// may set another (Qwen3, Mistral Nemo, Nemotron-H 4B): q is then n_heads x head_dim wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// MLP width; defaults to 4 d_model (GPT-2) or 8/3 d_model rounded up to 64 (Llama).
    #[serde(default)]
    pub ffn_hidden: Option<usize>,
    pub max_seq_len: usize,
    /// Share the input embedding with the output head; GPT-2 always does.
    #[serde(default)]
    pub tie_embeddings: Option<bool>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// The rotary theta of sliding-window layers, where it is not `rope_theta` (Gemma 3's
    /// rope_local_base_freq; gemma3 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta_local: Option<f64>,
    /// Rotary frequencies stretched for a longer context (Llama 3.1 and later); none: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Biases on the query, key and value projections (Qwen2's attention; llama only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
    /// RMSNorm of every query and key head over its head_dim values before the rotation, one
    /// weight for q's heads and one for k's (Qwen3's q_norm and k_norm; llama only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub qk_norm: bool,
    /// Where each block's norms sit: before the mixer (default), after it, or both (llama only).
    #[serde(default, skip_serializing_if = "is_pre")]
    pub block_norms: BlockNorms,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    /// Standard deviation of the normal initialisation of weight matrices and embeddings.
    #[serde(default = "default_init_std")]
    pub init_std: f32,
    /// Scale the init of the projections into the residual stream by 1/sqrt(2 n_layers).
    #[serde(default = "default_true")]
    pub init_residual_scaling: bool,
    /// Hybrid layers, one character each: `M` Mamba-2, `*` attention, `-` MLP (Nemotron-H's
    /// `hybrid_override_pattern`), e.g. "M-M-M*-M-M-M*-".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "SsmConfig::is_default")]
    pub ssm: SsmConfig,
    #[serde(default, skip_serializing_if = "MupConfig::is_default")]
    pub mup: MupConfig,
    /// The keys a query of a sliding-window layer attends: itself and the `sliding_window - 1`
    /// before it (Mistral's, Qwen2's and EXAONE 4's `sliding_window`; llama only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Each layer's attention, one character per layer, repeated over the layers where
    /// shorter: `L` a sliding window (local) with rotary positions, `G` the whole context
    /// (global) with them, `N` the whole context without positions (NoPE). EXAONE 4 32B is
    /// "LLLN", SmolLM3 "GGGN"; unset: "L" with a sliding_window (Mistral), "G" without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_pattern: Option<String>,
    /// Start from the weights of this checkpoint or Hugging Face directory (fine-tuning);
    /// its config.json must describe the same model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f32 {
    1e-5
}
fn default_init_std() -> f32 {
    0.02
}
fn default_true() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !b
}
fn is_pre(n: &BlockNorms) -> bool {
    *n == BlockNorms::Pre
}

impl ModelConfig {
    /// A model of `arch` with these sizes and every other setting at its default, as a config
    /// file giving only these keys reads.
    pub fn new(
        arch: Arch,
        vocab_size: usize,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        max_seq_len: usize,
    ) -> Self {
        Self {
            arch,
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            n_kv_heads: None,
            head_dim: None,
            ffn_hidden: None,
            max_seq_len,
            tie_embeddings: None,
            rope_theta: default_rope_theta(),
            rope_theta_local: None,
            rope_scaling: None,
            qkv_bias: false,
            qk_norm: false,
            block_norms: BlockNorms::Pre,
            norm_eps: default_norm_eps(),
            init_std: default_init_std(),
            init_residual_scaling: true,
            pattern: None,
            ssm: SsmConfig::default(),
            mup: MupConfig::default(),
            sliding_window: None,
            attention_pattern: None,
            init_from: None,
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }
    /// What q is multiplied by (with the rotation) so that attention's 1 / sqrt(head_dim)
    /// scales the scores by muP's attention multiplier; 1 without one.
    pub fn q_scale(&self) -> f32 {
        self.mup.attention_multiplier.map_or(1.0, |m| (m * (self.head_dim() as f64).sqrt()) as f32)
    }
    /// Whether the model is laid out as Llama is (q, k, v and o projections, a gated MLP,
    /// RMSNorms, rotary positions): Llama and its relatives, and Gemma 3.
    pub fn llama_family(&self) -> bool {
        matches!(self.arch, Arch::Llama | Arch::Gemma3)
    }
    /// Where each block's norms sit (Gemma 3: before and after the mixers).
    pub fn norms(&self) -> BlockNorms {
        if self.arch == Arch::Gemma3 { BlockNorms::Both } else { self.block_norms }
    }
    /// Whether each q and k head is RMS-normed (Qwen3's, EXAONE 4's and Gemma 3's attention).
    pub fn has_qk_norm(&self) -> bool {
        self.qk_norm || self.arch == Arch::Gemma3
    }
    /// What the token embedding's output is multiplied by: muP's multiplier, or Gemma 3's
    /// sqrt(d_model).
    pub fn embedding_scale(&self) -> f64 {
        if self.arch == Arch::Gemma3 { (self.d_model as f64).sqrt() } else { self.mup.embedding_multiplier }
    }
    /// The attention scores' scale: muP's attention multiplier (Gemma 3's
    /// query_pre_attn_scalar^-1/2), or the usual 1 / sqrt(head_dim).
    pub fn attention_scale(&self) -> f64 {
        self.mup.attention_multiplier.unwrap_or(1.0 / (self.head_dim() as f64).sqrt())
    }
    /// Gemma 3's query_pre_attn_scalar, whose inverse square root scales the scores (an
    /// integer in transformers: the validation of gemma3 requires one).
    pub fn query_pre_attn_scalar(&self) -> usize {
        (self.attention_scale().powi(-2)).round() as usize
    }
    /// Whether the model is HyperCLOVA X's, the Hugging Face Llama relative with norms on both
    /// sides of the mixers or muP's multipliers, whose limits the validation keeps.
    fn is_hyperclovax(&self) -> bool {
        self.arch == Arch::Llama && (self.block_norms == BlockNorms::Both || !self.mup.is_default())
    }
    /// Whether checkpoints store each RMSNorm's weight w as w - 1 (Gemma 3 scales by 1 + w:
    /// its weights start at 0; ondol's flat buffer holds the scale itself).
    pub fn stores_norms_minus_one(&self) -> bool {
        self.arch == Arch::Gemma3
    }
    /// Whether sliding-window layers rotate by frequencies of their own: at
    /// `rope_theta_local`, and in Gemma 3 unscaled (its rope scaling is its global layers').
    pub fn has_local_rope(&self) -> bool {
        let own = self.rope_theta_local.is_some() || (self.arch == Arch::Gemma3 && self.rope_scaling.is_some());
        own && self.sliding_window.is_some()
    }
    /// The rotary inverse frequencies of the sliding-window layers, where they are their own
    /// (see [`Self::has_local_rope`]).
    pub fn rope_inv_freq_local(&self) -> Option<Vec<f32>> {
        let theta = self.rope_theta_local.unwrap_or(self.rope_theta);
        self.has_local_rope().then(|| ondol_core::backend::rope_inv_freq(self.head_dim(), theta))
    }
    /// The rotary inverse frequencies of a head, `head_dim / 2` of them, scaled if asked.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let plain = ondol_core::backend::rope_inv_freq(self.head_dim(), self.rope_theta);
        match &self.rope_scaling {
            Some(scaling) => scaling.apply(&plain),
            None => plain,
        }
    }
    pub fn ffn(&self) -> usize {
        self.ffn_hidden.unwrap_or(match self.arch {
            Arch::Gpt2 | Arch::Hybrid => 4 * self.d_model,
            Arch::Llama | Arch::Gemma3 | Arch::Mamba | Arch::Mamba2 => (8 * self.d_model / 3).div_ceil(64) * 64,
        })
    }
    /// GPT-2, Gemma 3 and the Mamba models tie their head to the embedding by default, as
    /// Hugging Face's configs do; a hybrid never does (transformers' Nemotron-H always has its
    /// own head).
    pub fn tied(&self) -> bool {
        self.tie_embeddings.unwrap_or(matches!(self.arch, Arch::Gpt2 | Arch::Gemma3 | Arch::Mamba | Arch::Mamba2))
    }
    /// The mixer of every layer: attention and MLP alternate in a transformer (two blocks per
    /// layer); a Mamba model has one mixer per layer; a hybrid follows its pattern.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        match self.arch {
            Arch::Llama | Arch::Gemma3 | Arch::Gpt2 => [LayerKind::Attention, LayerKind::Mlp].repeat(self.n_layers),
            Arch::Mamba | Arch::Mamba2 => vec![LayerKind::Mamba; self.n_layers],
            Arch::Hybrid => self
                .pattern
                .as_deref()
                .unwrap_or_default()
                .chars()
                .map(|c| match c {
                    'M' => LayerKind::Mamba,
                    '*' => LayerKind::Attention,
                    _ => LayerKind::Mlp,
                })
                .collect(),
        }
    }
    pub fn has_attention(&self) -> bool {
        self.layer_kinds().contains(&LayerKind::Attention)
    }
    /// `attention_pattern`'s value where it is unset: every layer local with a window, global
    /// without.
    pub fn default_attention_pattern(window: Option<usize>) -> &'static str {
        if window.is_some() { "L" } else { "G" }
    }
    /// The attention of transformer layer `layer` (see `attention_pattern`).
    pub fn layer_attention(&self, layer: usize) -> LayerAttention {
        let default = Self::default_attention_pattern(self.sliding_window);
        let pattern = self.attention_pattern.as_deref().unwrap_or(default);
        let c = pattern.as_bytes()[layer % pattern.len().max(1)];
        LayerAttention { window: self.sliding_window.filter(|_| c == b'L'), rope: c != b'N' }
    }
    /// Every transformer layer's attention spelt out, one character of `attention_pattern`
    /// per layer: what two spellings of one model agree on.
    pub fn attention_layers(&self) -> String {
        (0..self.n_layers)
            .map(|l| match self.layer_attention(l) {
                LayerAttention { window: Some(_), .. } => 'L',
                LayerAttention { rope: true, .. } => 'G',
                LayerAttention { rope: false, .. } => 'N',
            })
            .collect()
    }
    /// Whether documents packed into a sequence can attend only within their own: not through
    /// Mamba layers, whose scans carry their state from one document into the next (`key`
    /// names the setting that asks for it).
    pub fn check_mask_documents(&self, key: &str) -> Result<()> {
        match self.layer_kinds().contains(&LayerKind::Mamba) {
            true => Err(Error::config(
                key,
                "the model has Mamba mixers, whose scans carry their state from one document into the next: \
                 documents are masked in models without them",
            )),
            false => Ok(()),
        }
    }
    /// Mamba channels E.
    pub fn ssm_inner(&self) -> usize {
        self.ssm.expand * self.d_model
    }
    pub fn ssm_state(&self) -> usize {
        self.ssm.state_size.unwrap_or(if self.arch == Arch::Mamba { 16 } else { 128 })
    }
    pub fn ssm_rank(&self) -> usize {
        self.ssm.time_step_rank.unwrap_or(self.d_model.div_ceil(16))
    }
    pub fn ssm_heads(&self) -> usize {
        self.ssm_inner() / self.ssm.head_dim
    }

    /// Every constraint the model needs, each failure naming its key and what would be valid.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("max_seq_len", self.max_seq_len),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(format!("model.{key}"), "must be at least 1"));
            }
        }
        self.validate_pattern()?;
        if self.arch == Arch::Hybrid && self.tie_embeddings == Some(true) {
            return Err(Error::config(
                "model.tie_embeddings",
                "a hybrid has its own head (Nemotron-H never ties it): leave it unset or false",
            ));
        }
        if matches!(self.arch, Arch::Mamba | Arch::Mamba2) && self.n_heads != 0 {
            return Err(Error::config("model.n_heads", "a pure Mamba model has no attention: leave it unset"));
        }
        if !self.llama_family() && self.rope_scaling.is_some() {
            return Err(Error::config("model.rope_scaling", "only llama and gemma3 take it: leave it unset"));
        }
        if self.arch != Arch::Gemma3 && self.rope_theta_local.is_some() {
            return Err(Error::config("model.rope_theta_local", "only gemma3 takes it: leave it unset"));
        }
        if self.arch != Arch::Llama && self.qkv_bias {
            return Err(Error::config(
                "model.qkv_bias",
                "only llama takes it (gpt2 always has biases; hybrid attention has none): leave it unset",
            ));
        }
        if self.arch != Arch::Llama && self.qk_norm {
            return Err(Error::config(
                "model.qk_norm",
                "only llama takes it (Qwen3's attention; gemma3 always has q and k norms): leave it unset",
            ));
        }
        let unread_mup = match self.arch {
            Arch::Llama => false,
            // (Gemma 3's query_pre_attn_scalar: the scores' scale is its inverse square root.)
            Arch::Gemma3 => MupConfig { attention_multiplier: None, ..self.mup.clone() } != MupConfig::default(),
            _ => !self.mup.is_default(),
        };
        if unread_mup {
            return Err(Error::config(
                "model.mup",
                "only llama takes muP multipliers (gemma3 only attention_multiplier, its \
                 query_pre_attn_scalar^-1/2): leave them unset",
            ));
        }
        self.mup.validate()?;
        if self.arch == Arch::Gemma3 && self.has_attention() {
            let scalar = self.attention_scale().powi(-2);
            if !(scalar >= 0.5 && (scalar - scalar.round()).abs() <= 1e-6 * scalar) {
                return Err(Error::config(
                    "model.mup.attention_multiplier",
                    format!(
                        "{} is 1 / sqrt({scalar}): gemma3's is 1 / sqrt(query_pre_attn_scalar), an integer in \
                         transformers",
                        self.attention_scale()
                    ),
                ));
            }
        }
        if !self.q_scale().is_normal() {
            return Err(Error::config(
                "model.mup.attention_multiplier",
                "times sqrt(head_dim) must be within f32's range",
            ));
        }
        // (Every checkpoint must load in transformers: HyperCLOVA X is the model with muP's
        // multipliers, and it has neither biases on q, k and v alone, nor q and k norms, nor
        // norms after the mixers alone.)
        if !self.mup.is_default() && (self.qkv_bias || self.qk_norm || self.block_norms == BlockNorms::Post) {
            return Err(Error::config(
                "model.mup",
                "takes neither qkv_bias, qk_norm nor block_norms = \"post\": HyperCLOVA X, the Hugging Face model \
                 with muP's multipliers, has none of them",
            ));
        }
        self.validate_attention_pattern()?;
        if self.arch != Arch::Llama && self.block_norms != BlockNorms::Pre {
            return Err(Error::config(
                "model.block_norms",
                "only llama takes another than \"pre\" (gemma3 always has norms before and after its mixers): \
                 leave it unset",
            ));
        }
        // Every checkpoint must load in transformers: a model with post-norms is EXAONE 4's
        // (with q and k norms) or HyperCLOVA X's (without).
        match (self.block_norms, self.qk_norm) {
            (BlockNorms::Post, false) => {
                return Err(Error::config(
                    "model.block_norms",
                    "\"post\" needs model.qk_norm = true: that is EXAONE 4's attention, the Hugging Face model \
                     with norms after the mixers alone",
                ));
            }
            (BlockNorms::Both, true) => {
                return Err(Error::config(
                    "model.block_norms",
                    "\"both\" takes no model.qk_norm: HyperCLOVA X, the Hugging Face model with norms before and \
                     after the mixers, has none",
                ));
            }
            _ => {}
        }
        if self.block_norms != BlockNorms::Pre && self.qkv_bias {
            return Err(Error::config(
                "model.qkv_bias",
                "takes block_norms = \"pre\": the Hugging Face models with post-norms bias o_proj too, or nothing",
            ));
        }
        if self.qk_norm && self.qkv_bias {
            return Err(Error::config(
                "model.qk_norm",
                "takes no qkv_bias: Qwen3's attention_bias would bias o_proj too, which ondol does not implement",
            ));
        }
        if let Some(hd) = self.head_dim {
            if !matches!(self.arch, Arch::Llama | Arch::Gemma3 | Arch::Hybrid) {
                return Err(Error::config(
                    "model.head_dim",
                    "only llama, gemma3 and hybrid attention take it (gpt2's heads are d_model / n_heads wide; Mamba-2's \
                     are model.ssm.head_dim): leave it unset",
                ));
            }
            if hd == 0 {
                return Err(Error::config("model.head_dim", "must be at least 1"));
            }
        }
        if self.has_attention() && self.n_heads == 0 {
            return Err(Error::config("model.n_heads", "must be at least 1 for a model with attention"));
        }
        if self.layer_kinds().contains(&LayerKind::Mamba) {
            self.validate_ssm()?;
        } else if !self.ssm.is_default() {
            return Err(Error::config("model.ssm", "only models with Mamba layers (mamba, mamba2, hybrid) take it"));
        }
        if !self.has_attention() {
            return self.validate_common();
        }
        let heads = self.kv_heads().checked_mul(2).and_then(|kv| kv.checked_add(self.n_heads));
        if heads.and_then(|h| h.checked_mul(self.head_dim())).is_none_or(|width| width > u32::MAX as usize) {
            return Err(Error::config("model.head_dim", "too large: q, k and v would not fit in 32-bit indices"));
        }
        // Heads as wide as model.head_dim need not divide d_model, but in transformers'
        // HyperCLOVA X (norms on both sides, or muP's multipliers) and Gemma 3 they must.
        let hyperclovax = self.is_hyperclovax();
        let must_divide = hyperclovax || self.arch == Arch::Gemma3;
        if (self.head_dim.is_none() || must_divide) && !self.d_model.is_multiple_of(self.n_heads) {
            let fix = match self.head_dim {
                None => "set model.head_dim where heads are not d_model / n_heads wide",
                Some(_) if hyperclovax => {
                    "HyperCLOVA X, the model with norms on both sides or muP's multipliers, needs it"
                }
                Some(_) => "transformers' Gemma 3 needs it",
            };
            return Err(Error::config(
                "model.n_heads",
                format!("{} does not divide d_model = {}: {fix}", self.n_heads, self.d_model),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return Err(Error::config(
                "model.n_kv_heads",
                format!("{kv} must be at least 1 and divide n_heads = {}", self.n_heads),
            ));
        }
        self.validate_common()?;
        match self.arch {
            Arch::Llama | Arch::Gemma3 => {
                if !self.head_dim().is_multiple_of(2) {
                    let (key, what) = match self.head_dim {
                        Some(_) => ("model.head_dim", "head_dim"),
                        None => ("model.n_heads", "head dim d_model / n_heads"),
                    };
                    return Err(Error::config(
                        key,
                        format!("{what} = {} must be even for rotary embeddings", self.head_dim()),
                    ));
                }
                if let Some(local) = self.rope_theta_local {
                    // (One spelling per model: two configs of it must compare equal.)
                    let why = if local == self.rope_theta {
                        Some("equals rope_theta: leave it unset")
                    } else if self.sliding_window.is_none() {
                        Some("no layer has a window (L in attention_pattern): leave it unset")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Err(Error::config("model.rope_theta_local", why));
                    }
                }
                let thetas = [("rope_theta", Some(self.rope_theta)), ("rope_theta_local", self.rope_theta_local)];
                for (key, theta) in thetas {
                    if theta.is_some_and(|t| !(t > 1.0 && t.is_finite())) {
                        return Err(Error::config(format!("model.{key}"), "must be a number greater than 1"));
                    }
                }
                if let Some(scaling) = &self.rope_scaling {
                    scaling.validate()?;
                }
            }
            Arch::Gpt2 => {
                if kv != self.n_heads {
                    return Err(Error::config(
                        "model.n_kv_heads",
                        format!(
                            "gpt2 has no grouped-query attention: leave it unset or equal to n_heads = {}",
                            self.n_heads
                        ),
                    ));
                }
                if self.tie_embeddings == Some(false) {
                    return Err(Error::config(
                        "model.tie_embeddings",
                        "gpt2 always ties its head to the embedding: leave it unset or true",
                    ));
                }
            }
            Arch::Mamba | Arch::Mamba2 | Arch::Hybrid => {}
        }
        Ok(())
    }

    /// Refuses settings this architecture does not read, so that none looks applied when it
    /// is not. Checked in configs a user writes, not in those earlier versions wrote into
    /// checkpoints, which may hold them (see [`Self::unread_as_defaults`]).
    pub fn refuse_unread(&self) -> Result<()> {
        // What is unread is [`Self::unread_as_defaults`]'s to say; here, only why.
        let read = self.unread_as_defaults();
        let (attention, mlp) = ("a pure Mamba model has no attention", "a pure Mamba model has no MLP");
        let rope = "only llama and gemma3 have rotary positions (gpt2 learns its positions, Mamba and hybrid models have none)";
        let unread = [
            ("n_kv_heads", self.n_kv_heads != read.n_kv_heads, attention),
            ("ffn_hidden", self.ffn_hidden != read.ffn_hidden, mlp),
            ("rope_theta", self.rope_theta != read.rope_theta, rope),
        ];
        match unread.iter().find(|(_, given, _)| *given) {
            Some((key, _, why)) => Err(Error::config(format!("model.{key}"), format!("{why}: leave it unset"))),
            None if read != *self => {
                Err(Error::config("model", format!("{:?} does not read a setting given", self.arch)))
            }
            None => Ok(()),
        }
    }

    /// The same model with what its architecture does not read at its defaults: what two
    /// configs of one model agree on, whether or not one holds an unread value.
    pub fn unread_as_defaults(&self) -> Self {
        let mut m = self.clone();
        if matches!(m.arch, Arch::Mamba | Arch::Mamba2) {
            (m.n_kv_heads, m.ffn_hidden) = (None, None);
        }
        if !m.llama_family() {
            m.rope_theta = default_rope_theta();
        }
        m
    }

    /// What every architecture checks.
    fn validate_common(&self) -> Result<()> {
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::config("model.vocab_size", "must fit in 32 bits"));
        }
        if self.ffn() == 0 {
            return Err(Error::config("model.ffn_hidden", "must be at least 1"));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return Err(Error::config("model.norm_eps", "must be a positive number"));
        }
        if !(self.init_std > 0.0 && self.init_std.is_finite()) {
            return Err(Error::config("model.init_std", "must be a positive number"));
        }
        Ok(())
    }

    fn validate_attention_pattern(&self) -> Result<()> {
        if !self.llama_family() && (self.sliding_window.is_some() || self.attention_pattern.is_some()) {
            let key = if self.sliding_window.is_some() { "model.sliding_window" } else { "model.attention_pattern" };
            return Err(Error::config(key, "only llama and gemma3 take it: leave it unset"));
        }
        if self.sliding_window == Some(0) {
            return Err(Error::config("model.sliding_window", "must be at least 1 (a query attends itself)"));
        }
        let p = self.attention_pattern.as_deref().unwrap_or(Self::default_attention_pattern(self.sliding_window));
        if let Some(bad) = p.chars().find(|c| !matches!(c, 'L' | 'G' | 'N')) {
            return Err(Error::config(
                "model.attention_pattern",
                format!("'{bad}' is not a layer: L (sliding window), G (global) or N (global, no positions)"),
            ));
        }
        if p.is_empty() || p.len() > self.n_layers {
            return Err(Error::config(
                "model.attention_pattern",
                format!("\"{p}\" needs 1 to n_layers = {} characters (repeated over the layers)", self.n_layers),
            ));
        }
        match (p.contains('L'), self.sliding_window) {
            (true, None) => {
                return Err(Error::config("model.attention_pattern", "L layers need a model.sliding_window"));
            }
            (false, Some(_)) => {
                return Err(Error::config(
                    "model.sliding_window",
                    format!("no layer of attention_pattern \"{p}\" is local (L): leave it unset"),
                ));
            }
            _ => {}
        }
        // Every checkpoint must load in transformers: layers without positions are SmolLM3's
        // (a plain Llama otherwise) or EXAONE 4's, whose global layers have none exactly where
        // it has windows; HyperCLOVA X has neither windows nor such layers.
        let (hyperclovax, exaone4) = (self.is_hyperclovax(), self.block_norms == BlockNorms::Post);
        let why = if self.arch == Arch::Gemma3 && p.contains('N') {
            Some("Gemma 3's layers all have rotary positions: write them L or G")
        } else if self.arch == Arch::Gemma3 {
            None
        } else if hyperclovax && p.contains(['L', 'N']) {
            Some("HyperCLOVA X, the model with norms on both sides or muP's multipliers, has neither windows nor NoPE")
        } else if exaone4 && p.contains('G') && p.contains(['L', 'N']) {
            Some("EXAONE 4's global layers have positions only in a model without windows: write them N")
        } else if !exaone4 && p.contains('N') && (self.qkv_bias || self.qk_norm) {
            Some(
                "layers without positions (N) are SmolLM3's, a plain Llama, or EXAONE 4's: not with qkv_bias or qk_norm",
            )
        } else {
            None
        };
        match why {
            Some(why) => Err(Error::config("model.attention_pattern", format!("\"{p}\": {why}"))),
            None => Ok(()),
        }
    }

    fn validate_pattern(&self) -> Result<()> {
        match (&self.pattern, self.arch) {
            (None, Arch::Hybrid) => Err(Error::config(
                "model.pattern",
                "a hybrid needs a pattern: one character per layer, M (Mamba-2), * (attention) or - (MLP)",
            )),
            (Some(_), arch) if arch != Arch::Hybrid => {
                Err(Error::config("model.pattern", "only arch = \"hybrid\" takes a pattern"))
            }
            (Some(p), _) => {
                if let Some(bad) = p.chars().find(|c| !matches!(c, 'M' | '*' | '-')) {
                    return Err(Error::config(
                        "model.pattern",
                        format!("{bad:?} is not a layer: use M (Mamba-2), * (attention) or - (MLP)"),
                    ));
                }
                if p.chars().count() != self.n_layers {
                    return Err(Error::config(
                        "model.pattern",
                        format!("has {} layers but model.n_layers = {}", p.chars().count(), self.n_layers),
                    ));
                }
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }

    fn validate_ssm(&self) -> Result<()> {
        let s = &self.ssm;
        let sizes = [
            ("state_size", self.ssm_state()),
            ("conv_kernel", s.conv_kernel),
            ("expand", s.expand),
            ("time_step_rank", self.ssm_rank()),
            ("head_dim", s.head_dim),
            ("n_groups", s.n_groups),
            ("chunk_size", s.chunk_size),
        ];
        for (key, value) in sizes {
            if value == 0 {
                return Err(Error::config(format!("model.ssm.{key}"), "must be at least 1"));
            }
        }
        // Keys of the other Mamba generation would be read by nothing.
        let default = SsmConfig::default();
        if self.arch == Arch::Mamba {
            for (key, set) in
                [("head_dim", s.head_dim != default.head_dim), ("n_groups", s.n_groups != default.n_groups)]
            {
                if set {
                    return Err(Error::config(
                        format!("model.ssm.{key}"),
                        "is Mamba-2's: Mamba-1 (arch = \"mamba\") has no heads or groups; leave it unset",
                    ));
                }
            }
        } else if s.time_step_rank.is_some() {
            return Err(Error::config(
                "model.ssm.time_step_rank",
                "is Mamba-1's dt rank: Mamba-2 layers have none; leave it unset",
            ));
        }
        if self.arch != Arch::Mamba {
            let inner = self.ssm_inner();
            if !inner.is_multiple_of(s.head_dim) {
                return Err(Error::config(
                    "model.ssm.head_dim",
                    format!("{} does not divide expand * d_model = {inner}", s.head_dim),
                ));
            }
            if !self.ssm_heads().is_multiple_of(s.n_groups) {
                return Err(Error::config(
                    "model.ssm.n_groups",
                    format!("{} does not divide the {} Mamba-2 heads", s.n_groups, self.ssm_heads()),
                ));
            }
        }
        let dt = (s.time_step_min, s.time_step_max, s.time_step_floor);
        if !(dt.0 > 0.0 && dt.0 <= dt.1 && dt.1.is_finite() && dt.2 > 0.0) {
            return Err(Error::config(
                "model.ssm.time_step_min",
                "need 0 < time_step_min <= time_step_max (finite) and time_step_floor > 0",
            ));
        }
        Ok(())
    }
}
