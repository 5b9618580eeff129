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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `n_heads` (plain multi-head).
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// MLP width; defaults to 4 d_model (GPT-2) or 8/3 d_model rounded up to 64 (Llama).
    #[serde(default)]
    pub ffn_hidden: Option<usize>,
    pub max_seq_len: usize,
    /// Share the input embedding with the output head; GPT-2 always does.
    #[serde(default)]
    pub tie_embeddings: Option<bool>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f32,
    /// Standard deviation of the normal initialisation of weight matrices and embeddings.
    #[serde(default = "default_init_std")]
    pub init_std: f32,
    /// Scale the init of the projections into the residual stream by 1/sqrt(2 n_layers).
    #[serde(default = "default_true")]
    pub init_residual_scaling: bool,
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

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
    pub fn ffn(&self) -> usize {
        self.ffn_hidden.unwrap_or(match self.arch {
            Arch::Gpt2 => 4 * self.d_model,
            Arch::Llama => (8 * self.d_model / 3).div_ceil(64) * 64,
        })
    }
    pub fn tied(&self) -> bool {
        self.tie_embeddings.unwrap_or(self.arch == Arch::Gpt2)
    }

    /// Every constraint the model needs, each failure naming its key and what would be valid.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("max_seq_len", self.max_seq_len),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(format!("model.{key}"), "must be at least 1"));
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::config("model.vocab_size", "must fit in 32 bits"));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "model.n_heads",
                format!("{} does not divide d_model = {}", self.n_heads, self.d_model),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_heads.is_multiple_of(kv) {
            return Err(Error::config(
                "model.n_kv_heads",
                format!("{kv} must be at least 1 and divide n_heads = {}", self.n_heads),
            ));
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
        match self.arch {
            Arch::Llama => {
                if !self.head_dim().is_multiple_of(2) {
                    return Err(Error::config(
                        "model.n_heads",
                        format!("head dim d_model / n_heads = {} must be even for rotary embeddings", self.head_dim()),
                    ));
                }
                if !(self.rope_theta > 1.0 && self.rope_theta.is_finite()) {
                    return Err(Error::config("model.rope_theta", "must be a number greater than 1"));
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
        }
        Ok(())
    }
}
