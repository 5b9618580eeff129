//! Hugging Face `config.json` for the architectures ondol implements, both ways.
//!
//! Export writes the fields transformers reads for `LlamaForCausalLM` (`Qwen2ForCausalLM`
//! with biases on q, k and v, `Qwen3ForCausalLM` with q_norm and k_norm, `Exaone4ForCausalLM`
//! with those and norms after the mixers, `HyperCLOVAXForCausalLM` with norms before and after;
//! an imported EXAONE 3 goes out as the Llama it is), `Gemma3ForCausalLM` (an imported image-text
//! Gemma 3 as its text model), `GPT2LMHeadModel`, `MambaForCausalLM`, `Mamba2ForCausalLM` and
//! `NemotronHForCausalLM`. Import is strict: a field that would change the model's arithmetic
//! and that ondol does not implement (a rope scaling other than linear or llama3's, soft-capping,
//! biases on o_proj, another activation, ...) is an error that names the field; fields that
//! only matter for training regularisation (dropout) are accepted with a warning, since ondol
//! trains without dropout.

use ondol_core::{Error, Result};
use ondol_model::{
    Arch, BlockNorms, LayerAttention, LayerKind, ModelConfig, MupConfig, RopeScaling, RopeScalingKind, SsmConfig,
};
use serde_json::{Map, Value, json};

/// The `config.json` of `cfg` in the Hugging Face schema of its architecture.
pub fn to_hf_config(cfg: &ModelConfig, eos_token_id: Option<u32>) -> Value {
    let mut v = match cfg.arch {
        Arch::Mamba => json!({
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ssm_inner(),
            "state_size": cfg.ssm_state(),
            "num_hidden_layers": cfg.n_layers,
            "layer_norm_epsilon": cfg.norm_eps,
            "expand": cfg.ssm.expand,
            "conv_kernel": cfg.ssm.conv_kernel,
            "time_step_rank": cfg.ssm_rank(),
            "time_step_scale": 1.0,
            "time_step_min": cfg.ssm.time_step_min,
            "time_step_max": cfg.ssm.time_step_max,
            "time_step_floor": cfg.ssm.time_step_floor,
            "time_step_init_scheme": "random",
            "use_bias": false,
            "use_conv_bias": true,
            "hidden_act": "silu",
            "residual_in_fp32": true,
            "rescale_prenorm_residual": false,
            "tie_word_embeddings": cfg.tied(),
            "initializer_range": cfg.init_std,
            "use_cache": true,
            "torch_dtype": "float32",
        }),
        Arch::Mamba2 => json!({
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_heads": cfg.ssm_heads(),
            "head_dim": cfg.ssm.head_dim,
            "state_size": cfg.ssm_state(),
            "n_groups": cfg.ssm.n_groups,
            "num_hidden_layers": cfg.n_layers,
            "layer_norm_epsilon": cfg.norm_eps,
            "expand": cfg.ssm.expand,
            "conv_kernel": cfg.ssm.conv_kernel,
            "chunk_size": cfg.ssm.chunk_size,
            "time_step_min": cfg.ssm.time_step_min,
            "time_step_max": cfg.ssm.time_step_max,
            "time_step_floor": cfg.ssm.time_step_floor,
            "use_bias": false,
            "use_conv_bias": true,
            "hidden_act": "silu",
            "residual_in_fp32": true,
            "rescale_prenorm_residual": false,
            "tie_word_embeddings": cfg.tied(),
            "initializer_range": cfg.init_std,
            "use_cache": true,
            "torch_dtype": "float32",
        }),
        Arch::Hybrid => nemotron_h_config(cfg),
        Arch::Gemma3 => gemma3_config(cfg),
        Arch::Llama => llama_layout(
            cfg,
            json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "rope_theta": cfg.rope_theta,
                "rope_parameters": rope_parameters(cfg),
                "hidden_act": "silu",
                "mlp_bias": false,
                "pretraining_tp": 1,
            }),
        ),
        Arch::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ffn(),
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "tie_word_embeddings": true,
            "initializer_range": cfg.init_std,
            "use_cache": true,
            "torch_dtype": "float32",
        }),
    };
    if let Some(eos) = eos_token_id {
        v["eos_token_id"] = json!(eos);
        v["bos_token_id"] = json!(eos);
    }
    if cfg.rope_scaling.is_some() {
        // (transformers before 5 read the scaling here; 5 from rope_parameters.)
        v["rope_scaling"] = rope_parameters(cfg);
    }
    if cfg.arch == Arch::Llama {
        as_llama_relative(cfg, &mut v);
    }
    v
}

/// Rewrites Llama's config `v` as the transformers model that has what `cfg` adds to Llama
/// (the model's validation admits only these combinations): q, k and v biases, Qwen2; q and k
/// norms, Qwen3; those and norms after the mixers alone, EXAONE 4; norms before and after, or
/// muP's multipliers, HyperCLOVA X; sliding windows or layers without positions on a plain
/// Llama, SmolLM3 (Qwen2, Qwen3 and EXAONE 4 have windows too).
fn as_llama_relative(cfg: &ModelConfig, v: &mut Value) {
    let layers: Vec<LayerAttention> = (0..cfg.n_layers).map(|l| cfg.layer_attention(l)).collect();
    let plain_attention = cfg.sliding_window.is_none() && layers.iter().all(|l| l.rope);
    let (model_type, class) = match (cfg.block_norms, cfg.qk_norm, cfg.qkv_bias) {
        (BlockNorms::Pre, false, false) if cfg.mup.is_default() && plain_attention => return,
        (BlockNorms::Pre, false, false) if cfg.mup.is_default() => ("smollm3", "SmolLM3ForCausalLM"),
        (BlockNorms::Pre, false, false) => ("hyperclovax", "HyperCLOVAXForCausalLM"),
        (BlockNorms::Pre, false, true) => ("qwen2", "Qwen2ForCausalLM"),
        (BlockNorms::Pre, true, _) => ("qwen3", "Qwen3ForCausalLM"),
        (BlockNorms::Post, ..) => ("exaone4", "Exaone4ForCausalLM"),
        (BlockNorms::Both, ..) => ("hyperclovax", "HyperCLOVAXForCausalLM"),
    };
    let o = v.as_object_mut().expect("a config is an object");
    o.remove("pretraining_tp");
    if model_type != "hyperclovax" {
        o.remove("mlp_bias");
    }
    // Llama's attention_bias would put one on o_proj too: Qwen2 has q, k and v's alone.
    if cfg.qkv_bias || model_type == "exaone4" {
        o.remove("attention_bias");
    }
    v["architectures"] = json!([class]);
    v["model_type"] = json!(model_type);
    let kinds = hf_layer_types(cfg);
    let window = json!(cfg.sliding_window);
    match model_type {
        "qwen2" | "qwen3" => {
            v["use_sliding_window"] = json!(cfg.sliding_window.is_some());
            v["sliding_window"] = window;
            // (Where the windows are the last layers, transformers from before layer_types reads
            // them from max_window_layers, the first windowed layer.)
            let first = layers.iter().position(|l| l.window.is_some()).unwrap_or(cfg.n_layers);
            let suffix = layers[first..].iter().all(|l| l.window.is_some());
            v["max_window_layers"] = json!(if suffix { first } else { cfg.n_layers });
            v["layer_types"] = json!(kinds);
        }
        "exaone4" => {
            // Its global layers have rotary positions exactly where it has no window: global
            // layers without them take one, which no layer uses.
            let nope = layers.iter().any(|l| !l.rope);
            v["sliding_window"] = json!(cfg.sliding_window.or(nope.then_some(cfg.max_seq_len)));
            v["sliding_window_pattern"] = Value::Null;
            v["layer_types"] = json!(kinds);
        }
        "smollm3" => {
            v["use_sliding_window"] = json!(cfg.sliding_window.is_some());
            v["sliding_window"] = window;
            v["no_rope_layers"] = json!(layers.iter().map(|l| u8::from(l.rope)).collect::<Vec<_>>());
            v["layer_types"] = json!(kinds);
            // Its defaults are SmolLM3's own tokenizer's ids, past a smaller vocabulary.
            for key in ["pad_token_id", "bos_token_id", "eos_token_id"] {
                if v.get(key).is_none() {
                    v[key] = Value::Null;
                }
            }
        }
        _ => {
            let m = &cfg.mup;
            v["use_post_norm"] = json!(cfg.block_norms == BlockNorms::Both);
            v["embedding_multiplier"] = json!(m.embedding_multiplier);
            v["residual_multiplier"] = json!(m.residual_multiplier);
            v["logits_scaling"] = json!(m.logits_multiplier);
            // (Its eager attention takes no default.)
            v["attention_multiplier"] = json!(cfg.attention_scale());
        }
    }
}

/// Gemma 3's text model (`Gemma3ForCausalLM`), with the model's validation's limits: its
/// query_pre_attn_scalar an integer, no soft-capping, rope scaling on the global layers alone.
/// Its sliding_window is required even where no layer has a window (it then applies to none).
/// The layers' kinds are `layer_types`; `sliding_window_pattern` (every n-th layer global,
/// n past the last layer where none is; null where the layers are not so) serves readers
/// that know only it.
fn gemma3_config(cfg: &ModelConfig) -> Value {
    let layers = hf_layer_types(cfg);
    let local_theta = cfg.rope_theta_local.unwrap_or(cfg.rope_theta);
    let every_nth = (1..=cfg.n_layers + 1)
        .find(|&n| layers.iter().enumerate().all(|(i, kind)| (*kind == "full_attention") == (i + 1).is_multiple_of(n)));
    let gemma3 = json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        // (transformers 5 reads rope_parameters; 4 rope_theta and rope_local_base_freq.)
        "rope_parameters": {
            "full_attention": rope_parameters(cfg),
            "sliding_attention": { "rope_type": "default", "rope_theta": local_theta },
        },
        "rope_theta": cfg.rope_theta,
        "rope_local_base_freq": local_theta,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar(),
        "sliding_window": cfg.sliding_window.unwrap_or(cfg.max_seq_len),
        "layer_types": layers,
        "sliding_window_pattern": every_nth,
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
        "use_bidirectional_attention": false,
        // (Its defaults are Gemma's own tokenizer's ids.)
        "pad_token_id": null,
        "bos_token_id": null,
        "eos_token_id": null,
    });
    llama_layout(cfg, gemma3)
}

/// transformers' `layer_types` of a Llama-layout model: each layer's attention, windowed or
/// over the whole context.
fn hf_layer_types(cfg: &ModelConfig) -> Vec<&'static str> {
    (0..cfg.n_layers)
        .map(|l| if cfg.layer_attention(l).window.is_some() { "sliding_attention" } else { "full_attention" })
        .collect()
}

/// `fields` and what every Llama-layout config.json has: the sizes, the norms' epsilon,
/// attention without biases, the head's tying, the init.
fn llama_layout(cfg: &ModelConfig, mut fields: Value) -> Value {
    let common = json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn(),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tied(),
        "initializer_range": cfg.init_std,
        "use_cache": true,
        "torch_dtype": "float32",
    });
    let o = fields.as_object_mut().expect("fields are an object");
    for (key, value) in common.as_object().expect("an object") {
        o.insert(key.clone(), value.clone());
    }
    fields
}

/// Nemotron-H's names for the layer kinds of a hybrid pattern.
const NEMOTRON_LAYER_TYPES: [(LayerKind, &str); 3] =
    [(LayerKind::Mamba, "linear_attention"), (LayerKind::Attention, "full_attention"), (LayerKind::Mlp, "mlp")];

/// A hybrid as `NemotronHForCausalLM` (Mamba-2 mixers, attention without positional encoding,
/// squared-ReLU MLPs, each behind an RMSNorm), which represents it exactly.
fn nemotron_h_config(cfg: &ModelConfig) -> Value {
    let types: Vec<&str> = cfg
        .layer_kinds()
        .iter()
        .map(|k| NEMOTRON_LAYER_TYPES.iter().find(|(kind, _)| kind == k).expect("every kind has a name").1)
        .collect();
    json!({
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "layers_block_type": types,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_dim(),
        "max_position_embeddings": cfg.max_seq_len,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "intermediate_size": cfg.ffn(),
        "mlp_hidden_act": "relu2",
        "mlp_bias": false,
        "ssm_state_size": cfg.ssm_state(),
        "mamba_num_heads": cfg.ssm_heads(),
        "mamba_head_dim": cfg.ssm.head_dim,
        "mamba_hidden_act": "silu",
        "n_groups": cfg.ssm.n_groups,
        "conv_kernel": cfg.ssm.conv_kernel,
        "expand": cfg.ssm.expand,
        "chunk_size": cfg.ssm.chunk_size,
        "time_step_min": cfg.ssm.time_step_min,
        "time_step_max": cfg.ssm.time_step_max,
        "time_step_floor": cfg.ssm.time_step_floor,
        "use_conv_bias": true,
        "mamba_proj_bias": false,
        "use_bias": false,
        "layer_norm_epsilon": cfg.norm_eps,
        "residual_in_fp32": true,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": cfg.tied(),
        "initializer_range": cfg.init_std,
        "use_cache": true,
        "torch_dtype": "float32",
    })
}

/// `generation_config.json`: sampling defaults that transformers' `generate` picks up.
pub fn generation_config(eos_token_id: Option<u32>) -> Value {
    let mut v = json!({ "do_sample": true, "temperature": 0.8, "top_p": 0.95 });
    if let Some(eos) = eos_token_id {
        v["eos_token_id"] = json!(eos);
        v["bos_token_id"] = json!(eos);
    }
    v
}

/// `tokenizer_config.json` for a checkpoint's `tokenizer.json`: without it transformers'
/// AutoTokenizer loads the tokenizer knowing no end-of-text token (generation and padding
/// then know none).
pub fn tokenizer_config(eos_token: &str, max_seq_len: usize) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": false,
    })
}

/// Reads one field of a Hugging Face config with its expected type.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
    /// The file's names of fields read under Llama's (EXAONE 3's, see [`EXAONE_FIELDS`]).
    renamed: &'static [(&'static str, &'static str)],
}

impl Fields<'_> {
    /// The name of field `key` in the file.
    fn in_file<'k>(&self, key: &'k str) -> &'k str {
        self.renamed.iter().find(|(ours, _)| *ours == key).map_or(key, |(_, theirs)| theirs)
    }
    fn err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(format!("{}` in `{}", self.in_file(key), self.file), message)
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.map.get(key).ok_or_else(|| self.err(key, "is missing"))?;
        v.as_u64().map(|n| n as usize).ok_or_else(|| self.err(key, format!("{v} is not a non-negative integer")))
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }
    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, format!("{v} is not a number"))),
        }
    }
    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("{v} is not true or false"))),
        }
    }
    /// Errors unless the field is absent or equal to `want` (a feature ondol lacks).
    fn must_be(&self, key: &str, want: &Value, what: &str) -> Result<()> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if v == want => Ok(()),
            Some(v) => Err(self.err(key, format!("{v} is not supported: ondol implements {what}"))),
        }
    }
}

/// Fields that do not change the model's arithmetic.
const HARMLESS: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "use_cache",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "task_specific_params",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
];

const MAMBA_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "state_size",
    "num_hidden_layers",
    "layer_norm_epsilon",
    "expand",
    "conv_kernel",
    "time_step_rank",
    "time_step_scale",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
    "time_step_init_scheme",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "residual_in_fp32",
    "rescale_prenorm_residual",
    "tie_word_embeddings",
    "use_mambapy",
    "use_associative_scan",
];

const MAMBA2_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "num_heads",
    "head_dim",
    "state_size",
    "n_groups",
    "num_hidden_layers",
    "layer_norm_epsilon",
    "expand",
    "conv_kernel",
    "chunk_size",
    "time_step_rank",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
    "time_step_limit",
    "use_bias",
    "use_conv_bias",
    "hidden_act",
    "residual_in_fp32",
    "rescale_prenorm_residual",
    "tie_word_embeddings",
];

const NEMOTRON_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "layers_block_type",
    "hybrid_override_pattern",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "attention_bias",
    "intermediate_size",
    "mlp_hidden_act",
    "mlp_bias",
    "ssm_state_size",
    "mamba_num_heads",
    "mamba_head_dim",
    "mamba_hidden_act",
    "n_groups",
    "conv_kernel",
    "expand",
    "chunk_size",
    "time_step_min",
    "time_step_max",
    "time_step_floor",
    "time_step_limit",
    "use_conv_bias",
    "mamba_proj_bias",
    "use_bias",
    "layer_norm_epsilon",
    "residual_in_fp32",
    "rescale_prenorm_residual",
    "num_nextn_predict_layers",
    "tie_word_embeddings",
    "use_mamba_kernels",
    "mamba_ssm_cache_dtype",
    "num_logits_to_keep",
    "sliding_window",
    // Mixture-of-experts and multi-token-prediction sizes: inert without "moe" layers and
    // with num_nextn_predict_layers = 0, both checked.
    "moe_intermediate_size",
    "moe_latent_size",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_overlap",
    "mtp_layers_block_type",
    "n_group",
    "n_routed_experts",
    "n_shared_experts",
    "norm_topk_prob",
    "num_experts_per_tok",
    "output_router_logits",
    "routed_scaling_factor",
    "topk_group",
];

/// A Mamba model has no position limit; imported models get this one, which only bounds
/// `training.seq_len` and may be raised freely.
const SSM_MAX_SEQ: usize = 1 << 16;

/// The step-size init fields every Mamba config carries.
fn ssm_steps(f: &Fields) -> Result<SsmConfig> {
    let d = SsmConfig::default();
    Ok(SsmConfig {
        time_step_min: f.f64("time_step_min", d.time_step_min)?,
        time_step_max: f.f64("time_step_max", d.time_step_max)?,
        time_step_floor: f.f64("time_step_floor", d.time_step_floor)?,
        ..d
    })
}

/// ondol applies no clamp to the step size: `time_step_limit` must be (0, inf), the default.
fn no_step_limit(f: &Fields) -> Result<()> {
    match f.map.get("time_step_limit") {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.get(0).and_then(Value::as_f64) == Some(0.0) && v.get(1).is_some_and(is_infinite) => Ok(()),
        Some(v) => Err(f.err("time_step_limit", format!("{v} is not supported: ondol implements no clamp, (0, inf)"))),
    }
}

/// JSON has no infinity: transformers writes `{"__float__": "Infinity"}` (5.x) or Python's
/// bare `Infinity` (older), which [`parse_config`] turns into a string.
fn is_infinite(v: &Value) -> bool {
    let text = v.get("__float__").unwrap_or(v);
    text.as_str() == Some("Infinity") || v.as_f64().is_some_and(f64::is_infinite)
}

/// A Llama config's rotary embeddings, as transformers 5 writes them (`rope_parameters`;
/// Gemma 3's global layers' entry of it).
fn rope_parameters(cfg: &ModelConfig) -> Value {
    match &cfg.rope_scaling {
        None => json!({ "rope_type": "default", "rope_theta": cfg.rope_theta }),
        Some(s) if s.kind == RopeScalingKind::Linear => {
            json!({ "rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": s.factor })
        }
        Some(s) => json!({
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }),
    }
}

/// The rope scaling a rotary-embedding object `p` of `config.json`'s `key` describes: none for
/// the default embeddings, linear or llama3's; others are refused.
fn rope_scaling_of(f: &Fields, key: &str, p: &Value) -> Result<Option<RopeScaling>> {
    let kind = p.get("rope_type").or_else(|| p.get("type")).cloned().unwrap_or(json!("default"));
    // (A field of the embedding that ondol would ignore, partial_rotary_factor say, is refused.)
    let llama3 = ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"];
    let known = |k: &str| {
        ["rope_type", "type", "rope_theta", "factor"].contains(&k) || (kind == "llama3" && llama3.contains(&k))
    };
    if let Some(unknown) = p.as_object().and_then(|o| o.keys().find(|k| !known(k))) {
        return Err(f.err(key, format!("{unknown} is not supported in a {kind} rotary embedding")));
    }
    match kind.as_str() {
        Some("default") => Ok(None),
        Some("llama3") => Ok(Some(llama3_scaling(f, key, p)?)),
        Some("linear") => {
            let factor = p.get("factor").and_then(Value::as_f64);
            let factor = factor.ok_or_else(|| f.err(key, "linear rope scaling needs a number factor"))?;
            Ok(Some(RopeScaling {
                kind: RopeScalingKind::Linear,
                factor,
                low_freq_factor: 0.0,
                high_freq_factor: 0.0,
                original_max_seq_len: 0,
            }))
        }
        _ => Err(f.err(
            key,
            format!("rope type {kind} is not supported: only default rotary embeddings, linear and llama3's"),
        )),
    }
}

/// The llama3 scaling of `config.json`'s `key` (`p`, its value).
fn llama3_scaling(f: &Fields, key: &str, p: &Value) -> Result<RopeScaling> {
    let number = |field: &str| {
        p.get(field)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(key, format!("llama3 rope scaling needs a number {field}")))
    };
    // (transformers takes the model's context where the field is absent.)
    let original = match p.get("original_max_position_embeddings") {
        Some(_) => number("original_max_position_embeddings")?,
        None => f.usize("max_position_embeddings")? as f64,
    };
    if !(original >= 1.0 && original.fract() == 0.0) {
        return Err(f.err(key, format!("original_max_position_embeddings {original} must be a whole number >= 1")));
    }
    let scaling = RopeScaling {
        kind: RopeScalingKind::Llama3,
        factor: number("factor")?,
        low_freq_factor: number("low_freq_factor")?,
        high_freq_factor: number("high_freq_factor")?,
        original_max_seq_len: original as usize,
    };
    Ok(scaling)
}

/// ondol's `model.head_dim` from the field `head_dim` (or, when it is absent, `missing`, the
/// architecture's default): none where heads are hidden_size / heads wide, as by default.
fn head_dim(f: &Fields, d_model: usize, n_heads: usize, missing: Option<usize>) -> Result<Option<usize>> {
    match f.opt_usize("head_dim")?.or(missing) {
        Some(hd) if hd.checked_mul(n_heads).is_none() => {
            Err(f.err("head_dim", format!("{hd} x {n_heads} heads is too large")))
        }
        hd => Ok(hd.filter(|&hd| n_heads > 0 && hd * n_heads != d_model)),
    }
}

/// `heads` (a field of the config) must be expand * hidden_size / head_dim.
fn check_heads(f: &Fields, key: &str, d_model: usize, ssm: &SsmConfig) -> Result<()> {
    let heads = f.usize(key)?;
    if heads * ssm.head_dim != ssm.expand * d_model {
        return Err(f.err(
            key,
            format!(
                "{heads} heads x head_dim {} != expand * hidden_size = {}: ondol needs all channels in heads",
                ssm.head_dim,
                ssm.expand * d_model
            ),
        ));
    }
    Ok(())
}

fn ssm_model(f: &Fields, arch: Arch, d_model: usize, ssm: SsmConfig, tied_default: bool) -> Result<ModelConfig> {
    Ok(ModelConfig {
        arch,
        vocab_size: f.usize("vocab_size")?,
        d_model,
        n_layers: f.usize("num_hidden_layers")?,
        n_heads: 0,
        n_kv_heads: None,
        ffn_hidden: None,
        max_seq_len: SSM_MAX_SEQ,
        tie_embeddings: Some(f.bool("tie_word_embeddings", tied_default)?),
        rope_theta: 10_000.0,
        rope_theta_local: None,
        rope_scaling: None,
        qkv_bias: false,
        qk_norm: false,
        block_norms: Default::default(),
        head_dim: None,
        norm_eps: f.f64("layer_norm_epsilon", 1e-5)? as f32,
        init_std: f.f64("initializer_range", 0.1)? as f32,
        init_residual_scaling: true,
        pattern: None,
        ssm,
        mup: Default::default(),
        sliding_window: None,
        attention_pattern: None,
        init_from: None,
    })
}

fn nemotron_h_from(f: &Fields) -> Result<ModelConfig> {
    let map = f.map;
    f.must_be("attention_bias", &json!(false), "attention without biases")?;
    f.must_be("mlp_bias", &json!(false), "an MLP without biases")?;
    f.must_be("mlp_hidden_act", &json!("relu2"), "relu2 MLPs")?;
    f.must_be("mamba_hidden_act", &json!("silu"), "SiLU")?;
    f.must_be("use_conv_bias", &json!(true), "a convolution with bias")?;
    f.must_be("mamba_proj_bias", &json!(false), "Mamba projections without biases")?;
    f.must_be("use_bias", &json!(false), "Mamba projections without biases")?;
    f.must_be("num_nextn_predict_layers", &json!(0), "no multi-token prediction layers")?;
    f.must_be("sliding_window", &Value::Null, "full attention")?;
    no_step_limit(f)?;
    // transformers reads either field; where a config has both, they must say the same.
    let from_types = match map.get("layers_block_type") {
        Some(Value::Array(types)) => Some(
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("linear_attention" | "mamba") => Ok('M'),
                    Some("full_attention" | "attention") => Ok('*'),
                    Some("mlp") => Ok('-'),
                    _ => Err(f.err(
                        "layers_block_type",
                        format!("{t} is not supported: ondol implements mamba, attention and mlp layers (no moe)"),
                    )),
                })
                .collect::<Result<String>>()?,
        ),
        None | Some(Value::Null) => None,
        Some(v) => return Err(f.err("layers_block_type", format!("{v} is not a list of layer types"))),
    };
    let from_override = match map.get("hybrid_override_pattern") {
        Some(Value::String(p)) if p.contains('E') => {
            return Err(f.err("hybrid_override_pattern", "E (mixture of experts) layers are not supported"));
        }
        Some(Value::String(p)) => Some(p.clone()),
        None | Some(Value::Null) => None,
        Some(v) => return Err(f.err("hybrid_override_pattern", format!("{v} is not a pattern string"))),
    };
    let pattern = match (from_types, from_override) {
        (Some(types), Some(over)) if types != over => {
            return Err(f.err(
                "hybrid_override_pattern",
                format!(
                    "\"{over}\" differs from layers_block_type, which makes \"{types}\": which layers is this model?"
                ),
            ));
        }
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => return Err(f.err("layers_block_type", "is missing (or hybrid_override_pattern)")),
    };
    if let Some(n) = f.opt_usize("num_hidden_layers")?
        && n != pattern.chars().count()
    {
        return Err(f.err(
            "num_hidden_layers",
            format!("{n} differs from the {} layers of the pattern \"{pattern}\"", pattern.chars().count()),
        ));
    }
    let d_model = f.usize("hidden_size")?;
    let n_heads = f.usize("num_attention_heads")?;
    // transformers' Nemotron-H takes head_dim = 128 when the field is absent.
    let attn_head_dim = head_dim(f, d_model, n_heads, Some(128))?;
    // Its Mamba width is heads x head_dim; `expand` is not read (and may be absent).
    let (heads, head_dim) = (f.usize("mamba_num_heads")?, f.usize("mamba_head_dim")?);
    if !(heads * head_dim).is_multiple_of(d_model) {
        return Err(f.err(
            "mamba_num_heads",
            format!(
                "{heads} heads x mamba_head_dim {head_dim} is not a multiple of hidden_size {d_model}: ondol's Mamba \
                 width is expand * hidden_size"
            ),
        ));
    }
    let ssm = SsmConfig {
        state_size: Some(f.usize("ssm_state_size")?),
        conv_kernel: f.usize("conv_kernel")?,
        expand: heads * head_dim / d_model,
        head_dim,
        n_groups: f.usize("n_groups")?,
        chunk_size: f.usize("chunk_size")?,
        ..ssm_steps(f)?
    };
    Ok(ModelConfig {
        arch: Arch::Hybrid,
        vocab_size: f.usize("vocab_size")?,
        d_model,
        n_layers: pattern.chars().count(),
        n_heads,
        n_kv_heads: f.opt_usize("num_key_value_heads")?,
        ffn_hidden: Some(f.usize("intermediate_size")?),
        max_seq_len: f.usize("max_position_embeddings")?,
        tie_embeddings: Some(f.bool("tie_word_embeddings", false)?),
        rope_theta: 10_000.0,
        rope_theta_local: None,
        rope_scaling: None,
        qkv_bias: false,
        qk_norm: false,
        block_norms: Default::default(),
        head_dim: attn_head_dim,
        norm_eps: f.f64("layer_norm_epsilon", 1e-5)? as f32,
        init_std: f.f64("initializer_range", 0.02)? as f32,
        init_residual_scaling: true,
        pattern: Some(pattern),
        ssm,
        mup: Default::default(),
        sliding_window: None,
        attention_pattern: None,
        init_from: None,
    })
}

/// Parses a `config.json`, accepting the bare `Infinity`, `-Infinity` and `NaN` Python's json
/// module writes (Mamba-2's `time_step_limit`), which become strings.
pub fn parse_config(text: &str, file: &str) -> Result<Value> {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string && let Some(word) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|w| rest.starts_with(w)) {
            out.push_str(&format!("\"{word}\""));
            rest = &rest[word.len()..];
            continue;
        }
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_string = !in_string,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out).map_err(|e| Error::Input(format!("{file}: not valid JSON: {e}")))
}

/// Dropout probabilities: accepted, since they do not change inference, but reported.
const DROPOUT: &[&str] =
    &["attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "embed_dropout"];

/// EXAONE 3.0 and 3.5 are Llama under other names: Llama's field, the file's (as transformers'
/// ExaoneConfig maps them); the tensors are renamed on reading (see `tensors::read_layout`).
const EXAONE_FIELDS: &[(&str, &str)] = &[
    ("num_hidden_layers", "num_layers"),
    ("rms_norm_eps", "layer_norm_epsilon"),
    ("hidden_act", "activation_function"),
];

/// `map` with EXAONE's field names as Llama's; a Llama name beside them is an error.
fn exaone_as_llama(map: &Map<String, Value>, file: &str) -> Result<Map<String, Value>> {
    let mut out = map.clone();
    for (llama, exaone) in EXAONE_FIELDS {
        if out.contains_key(*llama) {
            return Err(Error::config(
                format!("{llama}` in `{file}"),
                format!("is not an EXAONE field: EXAONE names it {exaone}"),
            ));
        }
        if let Some(v) = out.remove(*exaone) {
            out.insert(llama.to_string(), v);
        }
    }
    out.remove("auto_map"); // the remote code's classes, which transformers no longer needs
    Ok(out)
}

/// The sliding window and attention pattern (see `ModelConfig::attention_pattern`) of a
/// Llama-family config, as transformers reads its fields:
/// - Mistral: `sliding_window` on every layer (4096 where absent, null: none).
/// - Qwen2 and Qwen3: a window only under `use_sliding_window` (`sliding_window`, 4096 where
///   absent), on the layers `layer_types` names, or else on those from `max_window_layers` (28).
/// - SmolLM3: `no_rope_layers` (1: rotary positions; else every `no_rope_layer_interval`-th
///   layer, 4, has none), and a window under `use_sliding_window` where `layer_types` says (by
///   default on the layers without positions, which ondol does not implement).
/// - EXAONE 4: `sliding_window` (4096 where absent) on the layers `layer_types` names, or else
///   from `sliding_window_pattern` (every n-th layer global; a string pattern transformers
///   reads only with layer_types); where it has a window, its global layers have no rotary
///   positions.
fn attention_layers(f: &Fields, model_type: &str, layers: usize) -> Result<(Option<usize>, Option<String>)> {
    let window = |default: Option<usize>| -> Result<Option<usize>> {
        match f.map.get("sliding_window") {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(w) => match w.as_u64().filter(|&w| w > 0) {
                Some(w) => Ok(Some(w as usize)),
                None => Err(f.err("sliding_window", format!("{w} is not a positive integer"))),
            },
        }
    };
    let enabled = |key: &str| f.bool(key, false);
    // Per layer: (sliding, rotary positions).
    let (window, kinds): (Option<usize>, Vec<(bool, bool)>) = match model_type {
        "mistral" => {
            let w = window(Some(4096))?;
            (w, vec![(w.is_some(), true); layers])
        }
        "qwen2" | "qwen3" => {
            let w = if enabled("use_sliding_window")? { window(Some(4096))? } else { None };
            let first = match f.map.get("max_window_layers") {
                None | Some(Value::Null) => 28,
                Some(_) => f.usize("max_window_layers")?,
            };
            let sliding = layer_types(f, layers, |i| w.is_some() && i >= first)?;
            (w, sliding.into_iter().map(|s| (s, true)).collect())
        }
        "smollm3" => {
            let rope: Vec<bool> = match f.map.get("no_rope_layers").filter(|v| !v.is_null()) {
                Some(v) => {
                    let flags = v.as_array().filter(|a| a.len() == layers);
                    let flags = flags.and_then(|a| a.iter().map(|x| x.as_u64().filter(|&x| x <= 1)).collect());
                    let flags: Vec<u64> = flags.ok_or_else(|| {
                        f.err("no_rope_layers", format!("{v} is not one 0 or 1 per layer ({layers})"))
                    })?;
                    flags.into_iter().map(|x| x == 1).collect()
                }
                None => {
                    let every = match f.map.get("no_rope_layer_interval") {
                        None | Some(Value::Null) => 4,
                        Some(_) => f.usize("no_rope_layer_interval")?.max(1),
                    };
                    (0..layers).map(|i| !(i + 1).is_multiple_of(every)).collect()
                }
            };
            let w = if enabled("use_sliding_window")? { window(None)? } else { None };
            let sliding = layer_types(f, layers, |i| w.is_some() && !rope[i])?;
            (w, sliding.into_iter().zip(rope).collect())
        }
        "gemma3_text" => {
            let w = window(Some(4096))?;
            // (transformers reads sliding_window_pattern only without layer_types, and never
            // the _sliding_window_pattern it writes back.)
            let has_types = f.map.get("layer_types").is_some_and(|v| !v.is_null());
            let every = if has_types { 0 } else { f.usize_or("sliding_window_pattern", 6)? };
            if every == 0 && !has_types {
                return Err(f.err("sliding_window_pattern", "0 is not a layer count: every n-th layer is global"));
            }
            let sliding = layer_types(f, layers, |i| !(i + 1).is_multiple_of(every))?;
            (w, sliding.into_iter().map(|s| (s, true)).collect())
        }
        "exaone4" => {
            let w = window(Some(4096))?;
            let every_nth = |n: usize, i: usize| n > 0 && !(i + 1).is_multiple_of(n);
            let sliding = match f.map.get("sliding_window_pattern") {
                _ if f.map.get("layer_types").is_some_and(|v| !v.is_null()) => layer_types(f, layers, |_| false)?,
                // (transformers 5 reads a string pattern only through layer_types.)
                Some(Value::String(p)) => {
                    return Err(f.err(
                        "sliding_window_pattern",
                        format!("\"{p}\" without layer_types: give layer_types, as transformers needs them"),
                    ));
                }
                Some(Value::Number(n)) if n.as_u64().is_some() && w.is_some() => {
                    let n = n.as_u64().unwrap_or(0) as usize;
                    (0..layers).map(|i| every_nth(n, i)).collect()
                }
                Some(other) if w.is_some() => {
                    return Err(f.err(
                        "sliding_window_pattern",
                        format!("{other} is neither a layer count nor a string of L and G"),
                    ));
                }
                // (transformers divides by the pattern, 0 without a window: layer_types must say.)
                _ if w.is_none() => vec![false; layers],
                _ => (0..layers).map(|i| every_nth(4, i)).collect(),
            };
            (w, sliding.into_iter().map(|s| (s, w.is_none() || s)).collect())
        }
        _ => (None, vec![(false, true); layers]),
    };
    let mut pattern = String::with_capacity(layers);
    for (i, &(sliding, rope)) in kinds.iter().enumerate() {
        pattern.push(match (sliding, rope) {
            (true, true) => 'L',
            (false, true) => 'G',
            (false, false) => 'N',
            (true, false) => {
                return Err(f.err(
                    "layer_types",
                    format!(
                        "layer {i} has a sliding window and no rotary positions, which ondol does not implement \
                         (windows on layers with positions, and global layers with or without them)"
                    ),
                ));
            }
        });
        if sliding && window.is_none() {
            return Err(f.err(
                "layer_types",
                format!(
                    "layer {i} is sliding_attention, but the model has no window (use_sliding_window or sliding_window)"
                ),
            ));
        }
    }
    let window = window.filter(|_| pattern.contains('L'));
    let uniform = ModelConfig::default_attention_pattern(window);
    let pattern = (!pattern.chars().all(|c| c.to_string() == uniform)).then_some(pattern);
    Ok((window, pattern))
}

/// Which of `layers` layers are sliding-window ones: as the config's `layer_types` names them
/// (full_attention or sliding_attention), or else as `default` says.
fn layer_types(f: &Fields, layers: usize, default: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
    let Some(v) = f.map.get("layer_types").filter(|v| !v.is_null()) else {
        return Ok((0..layers).map(default).collect());
    };
    let kinds = v
        .as_array()
        .filter(|a| a.len() == layers)
        .ok_or_else(|| f.err("layer_types", format!("is not one entry per layer ({layers})")))?;
    kinds
        .iter()
        .map(|k| match k.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(f.err(
                "layer_types",
                format!("{k} is not supported: ondol implements full_attention and sliding_attention"),
            )),
        })
        .collect()
}

/// muP's multipliers, HyperCLOVA X's and Granite's fields beyond Llama's (and HyperCLOVA X's
/// use_post_norm).
const MUP_FIELDS: &[&str] = &["embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier"];

/// The muP multipliers of a HyperCLOVA X or Granite config: Granite divides the logits by its
/// logits_scaling where HyperCLOVA X multiplies, and takes an absent attention multiplier as
/// 1 where HyperCLOVA X takes the usual 1 / sqrt(head_dim) (which ondol writes as none).
fn mup(f: &Fields, granite: bool, head_dim: usize) -> Result<MupConfig> {
    let logits = f.f64("logits_scaling", 1.0)?;
    let attention = match f.map.get("attention_multiplier") {
        None | Some(Value::Null) if !granite => None,
        _ => Some(f.f64("attention_multiplier", 1.0)?),
    };
    Ok(MupConfig {
        embedding_multiplier: f.f64("embedding_multiplier", 1.0)?,
        residual_multiplier: f.f64("residual_multiplier", 1.0)?,
        logits_multiplier: if granite { 1.0 / logits } else { logits },
        attention_multiplier: attention.filter(|&m| !is_usual_scale(m, head_dim)),
    })
}

/// Whether an attention scale is the usual 1 / sqrt(head_dim), which ondol writes as none
/// (to rounding: configs spell it in decimal).
fn is_usual_scale(scale: f64, head_dim: usize) -> bool {
    let usual = 1.0 / (head_dim as f64).sqrt();
    (scale - usual).abs() <= 1e-12 * usual
}

/// Gemma 3's text model's fields (`gemma3_text`); its attention layers are read by
/// [`attention_layers`].
const GEMMA3_FIELDS: &[&str] = &[
    "hidden_activation",
    "rope_parameters",
    "rope_theta",
    "rope_local_base_freq",
    "rope_scaling",
    "query_pre_attn_scalar",
    "sliding_window",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "layer_types",
    "attention_bias",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
    "cache_implementation",
];

/// What every Llama-layout config.json has and import reads (see [`llama_layout`]).
const LLAMA_LAYOUT_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "attention_bias",
    "tie_word_embeddings",
];

/// A `gemma3_text` config: transformers 5's `rope_parameters` (a rotary embedding per layer
/// type, the global layers' possibly scaled) or the fields before it (`rope_theta`,
/// `rope_local_base_freq`, `rope_scaling` the global layers'), agreeing where a file has both;
/// the defaults are transformers' (its config class's sizes, Gemma 2 2B's; global theta 1e6,
/// local 1e4, query_pre_attn_scalar 256, a window of 4096 on five layers of six), which the
/// text_config of an image-text checkpoint relies on.
fn gemma3_from(f: &Fields) -> Result<ModelConfig> {
    f.must_be("hidden_activation", &json!("gelu_pytorch_tanh"), "GeGLU with gelu_pytorch_tanh")?;
    f.must_be("attention_bias", &json!(false), "attention without biases")?;
    f.must_be("final_logit_softcapping", &Value::Null, "logits without soft-capping")?;
    f.must_be("attn_logit_softcapping", &Value::Null, "attention scores without soft-capping")?;
    f.must_be("use_bidirectional_attention", &json!(false), "causal attention")?;
    // Per layer type: transformers 5's rope_parameters entry, or the fields before it
    // (rope_scaling the global layers'), or the defaults.
    let entry = |kind: &str| f.map.get("rope_parameters").and_then(|p| p.get(kind)).filter(|v| !v.is_null());
    let theta = |kind: &str, key: &str, default: f64| -> Result<f64> {
        let field = f.map.get(key).filter(|v| !v.is_null()).map(|_| f.f64(key, default)).transpose()?;
        match (entry(kind).and_then(|e| e.get("rope_theta")).and_then(Value::as_f64), field) {
            (Some(t), Some(other)) if t != other => {
                Err(f.err("rope_parameters", format!("{kind}'s rope_theta {t} disagrees with {key}'s {other}")))
            }
            (Some(t), _) => Ok(t),
            (None, field) => Ok(field.unwrap_or(default)),
        }
    };
    let (global, local) =
        (theta("full_attention", "rope_theta", 1e6)?, theta("sliding_attention", "rope_local_base_freq", 1e4)?);
    let scaling_in =
        |key: &str, p: Option<&Value>| p.map(|p| rope_scaling_of(f, key, p)).transpose().map(Option::flatten);
    let legacy = f.map.get("rope_scaling").filter(|v| !v.is_null());
    // (transformers lets rope_scaling override the entry: where a file has both, they agree.)
    let nested = scaling_in("rope_parameters", entry("full_attention"))?;
    let rope_scaling = match (legacy, scaling_in("rope_scaling", legacy)?) {
        (Some(_), scaling) if entry("full_attention").is_some() && scaling != nested => {
            return Err(f.err("rope_scaling", "disagrees with rope_parameters' full_attention on the scaling"));
        }
        (Some(_), scaling) => scaling,
        (None, _) => nested,
    };
    if scaling_in("rope_parameters", entry("sliding_attention"))?.is_some() {
        return Err(f.err(
            "rope_parameters",
            "sliding_attention: scaled rotary embeddings on windowed layers are not supported (Gemma 3 scales its global layers')",
        ));
    }
    let layers = f.usize_or("num_hidden_layers", 26)?;
    let (sliding_window, attention_pattern) = attention_layers(f, "gemma3_text", layers)?;
    let d_model = f.usize_or("hidden_size", 2304)?;
    let n_heads = f.usize_or("num_attention_heads", 8)?;
    let head_dim = head_dim(f, d_model, n_heads, Some(256))?;
    // (A scalar that is not positive gives no multiplier the model's validation admits.)
    let scalar = f.f64("query_pre_attn_scalar", 256.0)?;
    let multiplier = 1.0 / scalar.sqrt();
    let head_width = head_dim.unwrap_or(d_model / n_heads.max(1));
    Ok(ModelConfig {
        n_kv_heads: Some(f.usize_or("num_key_value_heads", 4)?),
        head_dim,
        ffn_hidden: Some(f.usize_or("intermediate_size", 9216)?),
        tie_embeddings: Some(f.bool("tie_word_embeddings", true)?),
        rope_theta: global,
        rope_theta_local: (local != global && sliding_window.is_some()).then_some(local),
        rope_scaling,
        norm_eps: f.f64("rms_norm_eps", 1e-6)? as f32,
        init_std: f.f64("initializer_range", 0.02)? as f32,
        mup: MupConfig {
            attention_multiplier: Some(multiplier).filter(|&m| !is_usual_scale(m, head_width)),
            ..MupConfig::default()
        },
        sliding_window,
        attention_pattern,
        ..ModelConfig::new(
            Arch::Gemma3,
            f.usize_or("vocab_size", 262_208)?,
            d_model,
            layers,
            n_heads,
            f.usize_or("max_position_embeddings", 131_072)?,
        )
    })
}

/// The text model of a Gemma 3 image-text config (`Gemma3ForConditionalGeneration`: 4B and
/// larger), from its `text_config`; the image model is left out, with a warning (its tensors
/// are skipped on reading, see `tensors::read_layout`).
fn gemma3_text_of_image_text(f: &Fields) -> Result<(ModelConfig, Vec<String>)> {
    let text = f.map.get("text_config").filter(|v| v.is_object());
    let mut text =
        text.cloned().ok_or_else(|| f.err("text_config", "is missing: Gemma 3's text model is read from it"))?;
    match text.get("model_type") {
        None => text["model_type"] = json!("gemma3_text"),
        Some(t) if t == "gemma3_text" => {}
        Some(t) => return Err(f.err("text_config", format!("has model_type {t}, not \"gemma3_text\""))),
    }
    let (cfg, mut warnings) = from_hf_config(&text, &format!("{} (text_config)", f.file))?;
    warnings.push(format!(
        "{}: Gemma 3's image model (vision_config and its projector) is left out: ondol imports the text model",
        f.file
    ));
    Ok((cfg, warnings))
}

/// Whether a HyperCLOVA X config has norms after the mixers (`use_post_norm`), which it must
/// say: its default has changed between transformers versions.
fn hyperclovax_post_norm(f: &Fields) -> Result<bool> {
    match f.map.get("use_post_norm") {
        None | Some(Value::Null) => Err(f.err("use_post_norm", "is missing: give true or false")),
        Some(_) => f.bool("use_post_norm", true),
    }
}

/// The model config of a Hugging Face `config.json` (`file` names it in errors).
/// Returns the config and warnings for the user.
pub fn from_hf_config(json: &Value, file: &str) -> Result<(ModelConfig, Vec<String>)> {
    let map = json.as_object().ok_or_else(|| Error::Input(format!("{file}: not a JSON object")))?;
    let model_type = map.get("model_type").and_then(Value::as_str).unwrap_or("");
    let exaone = model_type == "exaone";
    let llama_named = if exaone { Some(exaone_as_llama(map, file)?) } else { None };
    let map = llama_named.as_ref().unwrap_or(map);
    let f = Fields { map, file, renamed: if exaone { EXAONE_FIELDS } else { &[] } };
    let (cfg, known): (ModelConfig, &[&str]) = match model_type {
        // Mistral is Llama with a sliding window on every layer, Qwen2 Llama with biases on q,
        // k and v and windows on the layers its layer_types (or max_window_layers) name, Qwen3
        // Qwen2 with an RMSNorm on each q and k head instead of the biases, SmolLM3 Llama with
        // layers without positions (see `attention_layers` for these and EXAONE 4's).
        "llama" | "mistral" | "qwen2" | "qwen3" | "smollm3" | "exaone" | "exaone4" | "hyperclovax" | "granite" => {
            if model_type == "qwen2" {
                f.must_be("use_mrope", &json!(false), "rotary positions along one axis")?;
            }
            let post_norm = model_type == "hyperclovax" && hyperclovax_post_norm(&f)?;
            let max_seq_len = f.usize("max_position_embeddings")?;
            let (sliding_window, attention_pattern) = attention_layers(&f, model_type, f.usize("num_hidden_layers")?)?;
            f.must_be("hidden_act", &json!("silu"), "SiLU (SwiGLU)")?;
            f.must_be("attention_bias", &json!(false), "attention without biases")?;
            f.must_be("mlp_bias", &json!(false), "an MLP without biases")?;
            f.must_be("pretraining_tp", &json!(1), "pretraining_tp = 1")?;
            // transformers 5 writes rope_parameters, earlier versions rope_scaling (the same
            // fields, the theta mostly beside them); where a config has several, they must agree.
            let mut theta = match map.get("rope_theta") {
                Some(_) => Some(("rope_theta", f.f64("rope_theta", 10_000.0)?)),
                None => None,
            };
            let mut rope: Option<(&str, Option<RopeScaling>)> = None;
            for key in ["rope_parameters", "rope_scaling"] {
                let Some(p) = map.get(key).filter(|v| !v.is_null()) else { continue };
                if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
                    match theta {
                        Some((first, other)) if other != t => {
                            return Err(f.err(key, format!("rope_theta {t} disagrees with {first}'s {other}")));
                        }
                        _ => theta = Some((key, t)),
                    }
                }
                let scaling = rope_scaling_of(&f, key, p)?;
                match &rope {
                    Some((first, theirs)) if *theirs != scaling => {
                        return Err(f.err(key, format!("disagrees with {first} on the rotary embeddings")));
                    }
                    Some(_) => {}
                    None => rope = Some((key, scaling)),
                }
            }
            let rope_scaling = rope.and_then(|(_, scaling)| scaling);
            // (SmolLM3's default theta is 2e6.)
            let theta = theta.map_or(if model_type == "smollm3" { 2e6 } else { 10_000.0 }, |(_, t)| t);
            let d_model = f.usize("hidden_size")?;
            let n_heads = f.usize("num_attention_heads")?;
            // (transformers' Qwen3 takes head_dim = 128 when the field is absent.)
            let head_dim = head_dim(&f, d_model, n_heads, (model_type == "qwen3").then_some(128))?;
            let mup = match model_type {
                "hyperclovax" | "granite" => {
                    mup(&f, model_type == "granite", head_dim.unwrap_or(d_model / n_heads.max(1)))?
                }
                _ => MupConfig::default(),
            };
            let cfg = ModelConfig {
                arch: Arch::Llama,
                vocab_size: f.usize("vocab_size")?,
                d_model,
                n_layers: f.usize("num_hidden_layers")?,
                n_heads,
                // (SmolLM3's default is 4 kv heads, the others' as many as the heads.)
                n_kv_heads: match f.opt_usize("num_key_value_heads")? {
                    None if model_type == "smollm3" => Some(4),
                    kv => kv,
                },
                ffn_hidden: Some(f.usize("intermediate_size")?),
                max_seq_len,
                // (SmolLM3's config ties by default, the others do not.)
                tie_embeddings: Some(f.bool("tie_word_embeddings", model_type == "smollm3")?),
                rope_theta: theta,
                rope_theta_local: None,
                rope_scaling,
                qkv_bias: model_type == "qwen2",
                qk_norm: matches!(model_type, "qwen3" | "exaone4"),
                block_norms: match model_type {
                    "exaone4" => BlockNorms::Post,
                    _ if post_norm => BlockNorms::Both,
                    _ => BlockNorms::Pre,
                },
                head_dim,
                // (transformers' EXAONE configs default to 1e-5, the others to 1e-6.)
                norm_eps: f.f64("rms_norm_eps", if model_type.starts_with("exaone") { 1e-5 } else { 1e-6 })? as f32,
                init_std: f.f64("initializer_range", 0.02)? as f32,
                init_residual_scaling: true,
                pattern: None,
                ssm: Default::default(),
                mup,
                sliding_window,
                attention_pattern,
                init_from: None,
            };
            (cfg, &["rope_theta", "rope_parameters", "rope_scaling", "hidden_act", "mlp_bias", "pretraining_tp"])
        }
        "gpt2" => {
            let act = map.get("activation_function").cloned().unwrap_or(json!("gelu_new"));
            if act != json!("gelu_new") && act != json!("gelu_pytorch_tanh") {
                return Err(
                    f.err("activation_function", format!("{act} is not supported: ondol implements gelu_new (tanh)"))
                );
            }
            f.must_be("scale_attn_weights", &json!(true), "attention scaled by 1/sqrt(head_dim)")?;
            f.must_be("scale_attn_by_inverse_layer_idx", &json!(false), "no per-layer attention scaling")?;
            f.must_be("reorder_and_upcast_attn", &json!(false), "plain attention order")?;
            f.must_be("add_cross_attention", &json!(false), "a decoder without cross-attention")?;
            f.must_be("tie_word_embeddings", &json!(true), "GPT-2 with its head tied to the embedding")?;
            let cfg = ModelConfig {
                arch: Arch::Gpt2,
                vocab_size: f.usize("vocab_size")?,
                d_model: f.usize("n_embd")?,
                n_layers: f.usize("n_layer")?,
                n_heads: f.usize("n_head")?,
                n_kv_heads: None,
                ffn_hidden: f.opt_usize("n_inner")?,
                max_seq_len: f.usize("n_positions")?,
                tie_embeddings: None,
                rope_theta: 10_000.0,
                rope_theta_local: None,
                rope_scaling: None,
                qkv_bias: false,
                qk_norm: false,
                block_norms: Default::default(),
                head_dim: None,
                norm_eps: f.f64("layer_norm_epsilon", 1e-5)? as f32,
                init_std: f.f64("initializer_range", 0.02)? as f32,
                init_residual_scaling: true,
                pattern: None,
                ssm: Default::default(),
                mup: Default::default(),
                sliding_window: None,
                attention_pattern: None,
                init_from: None,
            };
            (
                cfg,
                &[
                    "vocab_size",
                    "n_embd",
                    "n_layer",
                    "n_head",
                    "n_inner",
                    "n_positions",
                    "n_ctx",
                    "layer_norm_epsilon",
                    "activation_function",
                    "scale_attn_weights",
                    "scale_attn_by_inverse_layer_idx",
                    "reorder_and_upcast_attn",
                    "add_cross_attention",
                    "tie_word_embeddings",
                ],
            )
        }
        "mamba" => {
            f.must_be("use_bias", &json!(false), "Mamba projections without biases")?;
            f.must_be("use_conv_bias", &json!(true), "a convolution with bias")?;
            f.must_be("hidden_act", &json!("silu"), "SiLU")?;
            f.must_be("time_step_scale", &json!(1.0), "time_step_scale = 1")?;
            let d_model = f.usize("hidden_size")?;
            let expand = f.usize("expand")?;
            if let Some(inner) = f.opt_usize("intermediate_size")?
                && inner != expand * d_model
            {
                return Err(
                    f.err("intermediate_size", format!("{inner} != expand * hidden_size = {}", expand * d_model))
                );
            }
            let rank = match map.get("time_step_rank") {
                None | Some(Value::Null) => None,
                Some(v) if v == &json!("auto") => None,
                Some(_) => Some(f.usize("time_step_rank")?),
            };
            let ssm = SsmConfig {
                state_size: Some(f.usize("state_size")?),
                conv_kernel: f.usize("conv_kernel")?,
                expand,
                time_step_rank: rank,
                ..ssm_steps(&f)?
            };
            (ssm_model(&f, Arch::Mamba, d_model, ssm, true)?, MAMBA_FIELDS)
        }
        "mamba2" => {
            f.must_be("use_bias", &json!(false), "Mamba projections without biases")?;
            f.must_be("use_conv_bias", &json!(true), "a convolution with bias")?;
            f.must_be("hidden_act", &json!("silu"), "SiLU")?;
            no_step_limit(&f)?;
            let d_model = f.usize("hidden_size")?;
            let ssm = SsmConfig {
                state_size: Some(f.usize("state_size")?),
                conv_kernel: f.usize("conv_kernel")?,
                expand: f.usize("expand")?,
                head_dim: f.usize("head_dim")?,
                n_groups: f.usize("n_groups")?,
                chunk_size: f.usize("chunk_size")?,
                ..ssm_steps(&f)?
            };
            check_heads(&f, "num_heads", d_model, &ssm)?;
            (ssm_model(&f, Arch::Mamba2, d_model, ssm, false)?, MAMBA2_FIELDS)
        }
        "nemotron_h" => (nemotron_h_from(&f)?, NEMOTRON_FIELDS),
        "gemma3_text" => (gemma3_from(&f)?, GEMMA3_FIELDS),
        "gemma3" => return gemma3_text_of_image_text(&f),
        other => {
            return Err(f.err(
                "model_type",
                format!(
                    "\"{other}\" is not supported: ondol imports \"llama\", \"mistral\", \"qwen2\", \"qwen3\", \
                     \"smollm3\", \"exaone\", \"exaone4\", \"hyperclovax\", \"granite\", \"gemma3_text\", \"gpt2\", \
                     \"mamba\", \"mamba2\" and \"nemotron_h\""
                ),
            ));
        }
    };
    // What the user is told of how the model was read.
    let mut warnings = Vec::new();
    for (key, value) in map {
        let key = key.as_str();
        let read_elsewhere = match model_type {
            "mistral" => key == "sliding_window",
            "qwen2" | "qwen3" => {
                ["use_sliding_window", "sliding_window", "max_window_layers", "layer_types"].contains(&key)
                    || (model_type == "qwen2" && key == "use_mrope")
            }
            "smollm3" => {
                ["use_sliding_window", "sliding_window", "no_rope_layers", "no_rope_layer_interval", "layer_types"]
                    .contains(&key)
            }
            "exaone4" => ["sliding_window", "sliding_window_pattern", "layer_types"].contains(&key),
            "hyperclovax" => MUP_FIELDS.contains(&key) || key == "use_post_norm",
            "granite" => MUP_FIELDS.contains(&key),
            _ => false,
        };
        let llama_layout = cfg.llama_family();
        if known.contains(&key)
            || HARMLESS.contains(&key)
            || read_elsewhere
            || (llama_layout && LLAMA_LAYOUT_FIELDS.contains(&key))
        {
            continue;
        }
        if DROPOUT.contains(&key) {
            if value.as_f64().unwrap_or(0.0) != 0.0 {
                warnings.push(format!("{file}: {key} = {value} ignored: ondol trains without dropout"));
            }
            continue;
        }
        return Err(f.err(key, format!("{value}: ondol does not implement this field; remove it if it is inert")));
    }
    // The constraint is ondol's, on the value read from the file: name the file's field where
    // one holds it, and ondol's key.
    cfg.validate().map_err(|e| match e {
        Error::Config { key, message } => {
            // (Mistral, Qwen, EXAONE and HyperCLOVA X, as read, name their fields as Llama does.)
            let llama = matches!(
                model_type,
                "mistral" | "qwen2" | "qwen3" | "smollm3" | "exaone" | "exaone4" | "hyperclovax" | "granite"
            );
            match hf_field(if llama { "llama" } else { model_type }, &key) {
                Some(field) => {
                    Error::config(format!("{}` in `{file}", f.in_file(field)), format!("(ondol's {key}) {message}"))
                }
                None => Error::config(format!("{key}` as read from `{file}"), message),
            }
        }
        other => other,
    })?;
    Ok((cfg, warnings))
}

/// The field of a `model_type` config.json that [`from_hf_config`] reads ondol's model key
/// `key` from, if one field does.
fn hf_field(model_type: &str, key: &str) -> Option<&'static str> {
    let key = key.strip_prefix("model.")?;
    let field = match (model_type, key) {
        ("gemma3_text", "mup.attention_multiplier") => "query_pre_attn_scalar",
        ("gemma3_text", "rope_theta_local") => "rope_local_base_freq",
        ("gemma3_text", _) => return hf_field("llama", &format!("model.{key}")),
        (_, "vocab_size") => "vocab_size",
        (_, "init_std") => "initializer_range",
        ("gpt2", "d_model") => "n_embd",
        ("gpt2", "n_layers") => "n_layer",
        ("gpt2", "n_heads") => "n_head",
        ("gpt2", "ffn_hidden") => "n_inner",
        ("gpt2", "max_seq_len") => "n_positions",
        ("gpt2", _) => return None,
        (_, "d_model") => "hidden_size",
        (_, "n_layers") => "num_hidden_layers",
        (_, "tie_embeddings") => "tie_word_embeddings",
        ("llama", "norm_eps") => "rms_norm_eps",
        (_, "norm_eps") => "layer_norm_epsilon",
        ("llama", "rope_theta") => "rope_theta",
        ("llama" | "nemotron_h", "n_heads") => "num_attention_heads",
        ("llama" | "nemotron_h", "n_kv_heads") => "num_key_value_heads",
        ("llama" | "nemotron_h", "head_dim") => "head_dim",
        ("llama", "mup.embedding_multiplier") => "embedding_multiplier",
        ("llama", "mup.residual_multiplier") => "residual_multiplier",
        ("llama", "mup.logits_multiplier") => "logits_scaling",
        ("llama", "mup.attention_multiplier") => "attention_multiplier",
        ("llama" | "nemotron_h", "ffn_hidden") => "intermediate_size",
        ("llama" | "nemotron_h", "max_seq_len") => "max_position_embeddings",
        ("nemotron_h", "pattern") => "layers_block_type",
        ("nemotron_h", "ssm.state_size") => "ssm_state_size",
        ("nemotron_h", "ssm.head_dim") => "mamba_head_dim",
        ("llama", _) => return None,
        (_, "ssm.state_size") => "state_size",
        (_, "ssm.time_step_rank") => "time_step_rank",
        (_, "ssm.time_step_min") => "time_step_min",
        (_, "ssm.time_step_max") => "time_step_max",
        (_, "ssm.time_step_floor") => "time_step_floor",
        (_, "ssm.conv_kernel") => "conv_kernel",
        (_, "ssm.expand") => "expand",
        (_, "ssm.head_dim") => "head_dim",
        (_, "ssm.n_groups") => "n_groups",
        (_, "ssm.chunk_size") => "chunk_size",
        _ => return None,
    };
    Some(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 97,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: Some(2),
            ffn_hidden: Some(40),
            max_seq_len: 64,
            tie_embeddings: Some(false),
            rope_theta: 500_000.0,
            rope_theta_local: None,
            rope_scaling: None,
            qkv_bias: false,
            qk_norm: false,
            block_norms: Default::default(),
            head_dim: None,
            norm_eps: 1e-6,
            init_std: 0.02,
            init_residual_scaling: true,
            pattern: None,
            ssm: Default::default(),
            mup: Default::default(),
            sliding_window: None,
            attention_pattern: None,
            init_from: None,
        }
    }

    #[test]
    fn export_then_import_is_the_identity() {
        for cfg in [llama(), ModelConfig { arch: Arch::Gpt2, n_kv_heads: None, tie_embeddings: None, ..llama() }] {
            let json = to_hf_config(&cfg, Some(5));
            let (back, warnings) = from_hf_config(&json, "config.json").unwrap();
            assert!(warnings.is_empty());
            assert_eq!(back.arch, cfg.arch);
            assert_eq!((back.vocab_size, back.d_model, back.n_layers, back.n_heads), (97, 32, 2, 4));
            assert_eq!(back.kv_heads(), cfg.kv_heads());
            assert_eq!(back.ffn(), cfg.ffn());
            assert_eq!(back.tied(), cfg.tied());
            assert_eq!(back.norm_eps, cfg.norm_eps);
            if cfg.arch == Arch::Llama {
                assert_eq!(back.rope_theta, 500_000.0);
            }
        }
    }

    /// Llama 3.1's rotary scaling goes out in both of transformers' fields and comes back; a
    /// config of transformers 4 (rope_scaling only) imports as one of 5 does.
    #[test]
    fn llama3_rope_scaling_exports_and_imports() {
        let scaling = RopeScaling {
            kind: RopeScalingKind::Llama3,
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_seq_len: 8192,
        };
        let cfg = ModelConfig { rope_scaling: Some(scaling), ..llama() };
        let json = to_hf_config(&cfg, None);
        assert_eq!(json["rope_parameters"], json["rope_scaling"]);
        assert_eq!(json["rope_parameters"]["original_max_position_embeddings"], 8192);
        assert_eq!(from_hf_config(&json, "c").unwrap().0, cfg);
        let mut older = json.clone();
        older.as_object_mut().unwrap().remove("rope_parameters");
        assert_eq!(from_hf_config(&older, "c").unwrap().0, cfg);
        let mut disagreeing = json;
        disagreeing["rope_scaling"]["factor"] = json!(8.0);
        let e = from_hf_config(&disagreeing, "c").unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("disagrees with rope_parameters"), "{e}");
    }

    /// A Llama with biases on q, k and v goes out as Qwen2 (Llama's attention_bias would
    /// bias o_proj too) and comes back.
    #[test]
    fn qkv_biases_export_and_import_as_qwen2() {
        let cfg = ModelConfig { qkv_bias: true, ..llama() };
        let json = to_hf_config(&cfg, None);
        assert_eq!((json["model_type"].as_str(), json.get("attention_bias")), (Some("qwen2"), None));
        assert_eq!(from_hf_config(&json, "c").unwrap().0, cfg);
        // Its window counts only under use_sliding_window, on the layers layer_types names or
        // else from max_window_layers on; as transformers reads it.
        let mut windowed = json.clone();
        windowed["sliding_window"] = json!(16);
        windowed.as_object_mut().unwrap().remove("layer_types");
        assert_eq!(from_hf_config(&windowed, "c").unwrap().0.sliding_window, None);
        windowed["use_sliding_window"] = json!(true);
        windowed["max_window_layers"] = json!(1);
        let read = from_hf_config(&windowed, "c").unwrap().0;
        assert_eq!((read.sliding_window, read.attention_pattern.as_deref()), (Some(16), Some("GL")));
        assert_eq!(to_hf_config(&read, None)["layer_types"], json!(["full_attention", "sliding_attention"]));
        assert_eq!(from_hf_config(&to_hf_config(&read, None), "c").unwrap().0, read);
        let mut mixed = windowed.clone();
        mixed["use_sliding_window"] = json!(false);
        mixed["layer_types"] = json!(["full_attention", "sliding_attention"]);
        let e = from_hf_config(&mixed, "c").unwrap_err().to_string();
        assert!(e.contains("layer_types") && e.contains("no window"), "{e}");
        mixed["layer_types"] = json!(["full_attention", "chunked_attention"]);
        let e = from_hf_config(&mixed, "c").unwrap_err().to_string();
        assert!(e.contains("layer_types") && e.contains("chunked_attention"), "{e}");
    }

    /// Windows and layers without positions on a plain Llama go out as SmolLM3 and come back;
    /// SmolLM3's own defaults (a layer without positions every 4th, a tied head) come in.
    #[test]
    fn windows_and_nope_layers_export_and_import_as_smollm3() {
        let cfg =
            ModelConfig { n_layers: 4, sliding_window: Some(8), attention_pattern: Some("LLGN".into()), ..llama() };
        let json = to_hf_config(&cfg, None);
        assert_eq!(json["model_type"].as_str(), Some("smollm3"));
        assert_eq!(json["no_rope_layers"], json!([1, 1, 1, 0]));
        assert_eq!(json["use_sliding_window"], json!(true));
        assert_eq!(from_hf_config(&json, "c").unwrap().0, cfg);
        let mut defaults = json.clone();
        for key in ["no_rope_layers", "layer_types", "sliding_window", "use_sliding_window", "tie_word_embeddings"] {
            defaults.as_object_mut().unwrap().remove(key);
        }
        let read = from_hf_config(&defaults, "c").unwrap().0;
        assert_eq!((read.attention_pattern.as_deref(), read.sliding_window, read.tied()), (Some("GGGN"), None, true));
        // SmolLM3 puts its windows on the layers without positions by default; ondol has none such.
        let mut nope_windows = defaults;
        nope_windows["use_sliding_window"] = json!(true);
        nope_windows["sliding_window"] = json!(8);
        let e = from_hf_config(&nope_windows, "c").unwrap_err().to_string();
        assert!(e.contains("layer 3") && e.contains("no rotary positions"), "{e}");
        // Mistral's window is on every layer.
        let mistral = ModelConfig { sliding_window: Some(8), ..llama() };
        let mut json = to_hf_config(&llama(), None);
        json["model_type"] = json!("mistral");
        json["sliding_window"] = json!(8);
        assert_eq!(from_hf_config(&json, "c").unwrap().0, mistral);
        assert_eq!(to_hf_config(&mistral, None)["layer_types"], json!(["sliding_attention", "sliding_attention"]));
    }

    /// Gemma 3 goes out as its text model and comes back; gemma-3-1b's config.json as
    /// transformers 4 wrote it (rope_theta and rope_local_base_freq, a global layer every 6th)
    /// reads as the same model as transformers 5's spelling; what ondol lacks is named.
    #[test]
    fn gemma3_exports_and_imports_in_both_spellings() {
        let cfg = ModelConfig {
            arch: Arch::Gemma3,
            n_layers: 6,
            head_dim: Some(16),
            tie_embeddings: Some(true),
            rope_theta: 1e6,
            rope_theta_local: Some(1e4),
            sliding_window: Some(8),
            attention_pattern: Some("LLLLLG".into()),
            mup: MupConfig { attention_multiplier: Some(1.0 / 12f64.sqrt()), ..MupConfig::default() },
            ..llama()
        };
        let json = to_hf_config(&cfg, Some(5));
        assert_eq!(
            (json["model_type"].as_str(), json["query_pre_attn_scalar"].as_u64()),
            (Some("gemma3_text"), Some(12))
        );
        assert_eq!(json["rope_parameters"]["sliding_attention"]["rope_theta"], json!(1e4));
        // (For readers of the pattern alone: every 6th layer global.)
        assert_eq!(json["sliding_window_pattern"], json!(6));
        assert_eq!(from_hf_config(&json, "c").unwrap(), (cfg.clone(), vec![]));
        let legacy = json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": false,
            "attention_dropout": 0.0, "attn_logit_softcapping": null, "final_logit_softcapping": null,
            "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "cache_implementation": "hybrid",
            "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 32, "intermediate_size": 40,
            "initializer_range": 0.02, "max_position_embeddings": 64, "num_attention_heads": 4,
            "num_hidden_layers": 6, "num_key_value_heads": 2, "query_pre_attn_scalar": 12, "rms_norm_eps": 1e-6,
            "rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 8,
            "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 97
        });
        let read = from_hf_config(&legacy, "c").unwrap().0;
        assert_eq!(read, ModelConfig { tie_embeddings: Some(true), ..cfg.clone() });
        // query_pre_attn_scalar = head_dim is the usual scale, which ondol writes as none.
        let mut usual = legacy.clone();
        usual["query_pre_attn_scalar"] = json!(16 * 16);
        usual["head_dim"] = json!(256);
        let read = from_hf_config(&usual, "c").unwrap().0;
        assert_eq!((read.mup.attention_multiplier, read.query_pre_attn_scalar()), (None, 256));
        for (key, value, names) in [
            ("final_logit_softcapping", json!(30.0), "soft-capping"),
            ("rope_scaling", json!({"rope_type": "yarn", "factor": 8.0}), "yarn"),
            ("rope_scaling", json!({"rope_type": "linear", "factor": 8.0, "partial_rotary_factor": 0.5}), "partial"),
            ("rope_parameters", json!({"full_attention": {"rope_theta": 5e5}}), "disagrees"),
            ("hidden_activation", json!("gelu"), "gelu_pytorch_tanh"),
            ("sliding_window_pattern", json!(0), "not a layer count"),
        ] {
            let mut bad = legacy.clone();
            bad[key] = value;
            let e = from_hf_config(&bad, "g/config.json").unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("g/config.json") && e.contains(names), "{e}");
        }
        // 4B and larger: linear scaling on the global layers, which goes out and comes back.
        let mut scaled = legacy.clone();
        scaled["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        let read = from_hf_config(&scaled, "c").unwrap().0;
        let linear = read.rope_scaling.clone().expect("linear scaling");
        assert_eq!((linear.kind, linear.factor), (RopeScalingKind::Linear, 8.0));
        let json = to_hf_config(&read, None);
        assert_eq!(json["rope_parameters"]["full_attention"]["rope_type"], json!("linear"));
        assert_eq!(json["rope_parameters"]["sliding_attention"]["rope_type"], json!("default"));
        assert_eq!(from_hf_config(&json, "c").unwrap().0, read);
        // transformers lets rope_scaling override rope_parameters: where both are, they agree.
        let mut both = scaled.clone();
        both["rope_parameters"] = json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6}});
        let e = from_hf_config(&both, "c").unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("disagrees"), "{e}");
        // Their image-text config: the text model from its sparse text_config, on
        // transformers' defaults, and a word that the image model is left out.
        let image_text = json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
            "mm_tokens_per_image": 256, "initializer_range": 0.02,
            "text_config": {
                "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024
            },
            "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model", "patch_size": 14}
        });
        let (read, warnings) = from_hf_config(&image_text, "m/config.json").unwrap();
        assert_eq!((read.arch, read.vocab_size, read.d_model, read.n_layers), (Arch::Gemma3, 262_208, 2560, 34));
        assert_eq!((read.n_heads, read.kv_heads(), read.head_dim(), read.query_pre_attn_scalar()), (8, 4, 256, 256));
        assert_eq!((read.sliding_window, read.attention_layers().matches('G').count()), (Some(1024), 5));
        assert_eq!((read.rope_theta, read.rope_theta_local), (1e6, Some(1e4)));
        assert!(warnings.len() == 1 && warnings[0].contains("image model"), "{warnings:?}");
        let mut bad = image_text.clone();
        bad["text_config"]["final_logit_softcapping"] = json!(30.0);
        let e = from_hf_config(&bad, "m/config.json").unwrap_err().to_string();
        assert!(e.contains("final_logit_softcapping` in `m/config.json (text_config)"), "{e}");
        // transformers takes query_pre_attn_scalar as an integer: so must a model that exports.
        let odd = ModelConfig { mup: MupConfig { attention_multiplier: Some(0.3), ..MupConfig::default() }, ..cfg };
        let e = odd.validate().unwrap_err().to_string();
        assert!(e.contains("model.mup.attention_multiplier") && e.contains("query_pre_attn_scalar"), "{e}");
    }

    /// q_norm and k_norm make a Qwen3; wider heads go out as head_dim and come back, for Llama
    /// and for Nemotron-H.
    #[test]
    fn qk_norms_export_and_import_as_qwen3_and_head_dims_as_given() {
        let cfg = ModelConfig { qk_norm: true, head_dim: Some(12), ..llama() };
        let json = to_hf_config(&cfg, None);
        assert_eq!((json["model_type"].as_str(), json["head_dim"].as_u64()), (Some("qwen3"), Some(12)));
        assert_eq!(json["attention_bias"], json!(false));
        assert_eq!(from_hf_config(&json, "c").unwrap().0, cfg);
        let hybrid = ModelConfig {
            arch: Arch::Hybrid,
            n_layers: 2,
            pattern: Some("M*".into()),
            head_dim: Some(12),
            ssm: SsmConfig { state_size: Some(8), head_dim: 16, ..Default::default() },
            ..llama()
        };
        assert_eq!(from_hf_config(&to_hf_config(&hybrid, None), "c").unwrap().0.head_dim, Some(12));
    }

    /// Norms after the mixers make an EXAONE 4 (with q and k norms) or a HyperCLOVA X (before
    /// and after); what ondol lacks of either is refused by name.
    #[test]
    fn post_norms_export_and_import_as_exaone4_and_hyperclovax() {
        let exaone4 = ModelConfig { block_norms: BlockNorms::Post, qk_norm: true, ..llama() };
        let peri_ln = ModelConfig { block_norms: BlockNorms::Both, ..llama() };
        for (cfg, model_type) in [(&exaone4, "exaone4"), (&peri_ln, "hyperclovax")] {
            let json = to_hf_config(cfg, None);
            assert_eq!(json["model_type"].as_str(), Some(model_type));
            assert_eq!(from_hf_config(&json, "c").unwrap().0, *cfg, "{model_type}");
        }
        // EXAONE 4.0 32B's windowed layers: its global ones have no rotary positions where it
        // has a window (absent: 4096), as transformers reads it.
        let mut windowed = to_hf_config(&exaone4, None);
        windowed["layer_types"] = json!(["sliding_attention", "full_attention"]);
        windowed["sliding_window"] = json!(16);
        let read = from_hf_config(&windowed, "c").unwrap().0;
        assert_eq!((read.sliding_window, read.attention_pattern.as_deref()), (Some(16), Some("LN")));
        assert_eq!(from_hf_config(&to_hf_config(&read, None), "c").unwrap().0, read);
        windowed["layer_types"] = json!(["full_attention", "full_attention"]);
        windowed.as_object_mut().unwrap().remove("sliding_window");
        let read = from_hf_config(&windowed, "c").unwrap().0;
        assert_eq!((read.sliding_window, read.attention_pattern.as_deref()), (None, Some("NN")));
        assert_eq!(from_hf_config(&to_hf_config(&read, None), "c").unwrap().0, read);
        // A pattern of every 4th layer global, where layer_types is absent; a string pattern
        // without them transformers cannot read.
        windowed.as_object_mut().unwrap().remove("layer_types");
        windowed["num_hidden_layers"] = json!(4);
        windowed["sliding_window_pattern"] = json!(4);
        let read = from_hf_config(&windowed, "c").unwrap().0;
        assert_eq!((read.sliding_window, read.attention_pattern.as_deref()), (Some(4096), Some("LLLN")));
        windowed["sliding_window_pattern"] = json!("LLLG");
        assert!(from_hf_config(&windowed, "c").unwrap_err().to_string().contains("layer_types"));
        // A window on EXAONE 4's global layers with positions is not EXAONE 4's.
        let e = ModelConfig { sliding_window: Some(8), attention_pattern: Some("LG".into()), ..exaone4.clone() };
        assert!(e.validate().unwrap_err().to_string().contains("write them N"));
        let e = ModelConfig { attention_pattern: Some("GN".into()), ..exaone4.clone() };
        assert!(e.validate().unwrap_err().to_string().contains("write them N"));
        // HyperCLOVA X without post-norms or multipliers is a Llama; its use_post_norm default
        // has changed between transformers versions, so the file must give it.
        let mut plain = to_hf_config(&peri_ln, None);
        plain["use_post_norm"] = json!(false);
        assert_eq!(from_hf_config(&plain, "c").unwrap().0, llama());
        plain.as_object_mut().unwrap().remove("use_post_norm");
        assert!(from_hf_config(&plain, "c").unwrap_err().to_string().contains("use_post_norm"));
    }

    /// muP's multipliers go out as HyperCLOVA X's (with or without its post-norms) and come
    /// back; Granite's, whose logits_scaling divides, import as the same model.
    #[test]
    fn mup_multipliers_export_as_hyperclovax_and_import_from_granite() {
        let mup = MupConfig {
            embedding_multiplier: 12.0,
            residual_multiplier: 0.22,
            logits_multiplier: 0.125,
            attention_multiplier: Some(0.0078125),
        };
        for norms in [BlockNorms::Pre, BlockNorms::Both] {
            let cfg = ModelConfig { mup: mup.clone(), block_norms: norms, ..llama() };
            let json = to_hf_config(&cfg, None);
            assert_eq!(
                (json["model_type"].as_str(), json["logits_scaling"].as_f64()),
                (Some("hyperclovax"), Some(0.125))
            );
            assert_eq!(from_hf_config(&json, "c").unwrap().0, cfg, "{norms:?}");
        }
        let mut granite = to_hf_config(&ModelConfig { mup: mup.clone(), ..llama() }, None);
        let o = granite.as_object_mut().unwrap();
        o.remove("use_post_norm");
        o.insert("model_type".into(), json!("granite"));
        o.insert("logits_scaling".into(), json!(8.0));
        assert_eq!(from_hf_config(&granite, "c").unwrap().0.mup, mup);
        // Granite's absent attention multiplier is 1, not 1 / sqrt(head_dim).
        granite.as_object_mut().unwrap().remove("attention_multiplier");
        assert_eq!(from_hf_config(&granite, "c").unwrap().0.mup.attention_multiplier, Some(1.0));
        granite["logits_scaling"] = json!(0.0);
        let e = from_hf_config(&granite, "c").unwrap_err().to_string();
        assert!(e.contains("logits_scaling") && e.contains("positive"), "{e}");
    }

    /// config.json of checkpoints people fine-tune, as their repositories hold them.
    #[test]
    fn configs_of_checkpoints_people_fine_tune_import() {
        let llama_3_1_8b = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
            "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
            "use_cache": true, "vocab_size": 128256}"#;
        let mistral_7b_v0_3 = r#"{"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
            "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0", "use_cache": true,
            "vocab_size": 32768}"#;
        let qwen2_5_0_5b = r#"{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
            "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
            "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
            "use_cache": true, "use_mrope": false, "use_sliding_window": false, "vocab_size": 151936}"#;
        let qwen3_0_6b = r#"{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
            "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
            "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
            "use_sliding_window": false, "vocab_size": 151936}"#;
        let exaone_3_5_2_4b = r#"{"activation_function": "silu", "architectures": ["ExaoneForCausalLM"],
            "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_exaone.ExaoneConfig",
            "AutoModelForCausalLM": "modeling_exaone.ExaoneForCausalLM"}, "bos_token_id": 1, "embed_dropout": 0.0,
            "eos_token_id": 361, "head_dim": 80, "hidden_size": 2560, "initializer_range": 0.02,
            "intermediate_size": 7168, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 32768,
            "model_type": "exaone", "num_attention_heads": 32, "num_key_value_heads": 8, "num_layers": 30,
            "pad_token_id": 0, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 1000000.0,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
            "use_cache": true, "vocab_size": 102400}"#;
        let mistral_nemo = r#"{"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
            "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
            "intermediate_size": 14336, "max_position_embeddings": 1024000, "model_type": "mistral",
            "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0, "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 131072}"#;
        let import = |text: &str| from_hf_config(&parse_config(text, "config.json").unwrap(), "config.json");
        let llama = import(llama_3_1_8b).unwrap().0;
        let scaling = llama.rope_scaling.expect("llama3 scaling");
        assert_eq!((scaling.factor, scaling.original_max_seq_len, llama.rope_theta), (8.0, 8192, 500_000.0));
        let mistral = import(mistral_7b_v0_3).unwrap().0;
        assert_eq!((mistral.arch, mistral.kv_heads(), mistral.rope_theta), (Arch::Llama, 8, 1e6));
        // Mistral Nemo's heads are 128 wide where hidden_size / heads is 160.
        let nemo = import(mistral_nemo).unwrap().0;
        assert_eq!((nemo.head_dim, nemo.d_model, nemo.n_heads), (Some(128), 5120, 32));
        let qwen = import(qwen2_5_0_5b).unwrap().0;
        assert!(qwen.qkv_bias && qwen.tied() && qwen.head_dim() == 64, "{qwen:?}");
        let exaone = import(exaone_3_5_2_4b).unwrap().0;
        assert_eq!((exaone.arch, exaone.n_layers, exaone.head_dim(), exaone.tied()), (Arch::Llama, 30, 80, true));
        assert_eq!((exaone.norm_eps, exaone.rope_scaling.map(|s| s.factor)), (1e-5, Some(8.0)));
        // Its fields are named as the file names them; Llama's names are not EXAONE's.
        let e =
            import(&exaone_3_5_2_4b.replace(r#""activation_function": "silu""#, r#""activation_function": "gelu""#))
                .unwrap_err()
                .to_string();
        assert!(e.contains("`activation_function` in `config.json`"), "{e}");
        let e = import(&exaone_3_5_2_4b.replace(r#""num_layers": 30"#, r#""num_layers": 30, "num_hidden_layers": 30"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_hidden_layers") && e.contains("num_layers"), "{e}");
        // transformers' EXAONE configs default the norms' epsilon to 1e-5, not Llama's 1e-6.
        let no_eps = exaone_3_5_2_4b.replace(r#""layer_norm_epsilon": 1e-05,"#, "");
        assert_eq!(import(&no_eps).unwrap().0.norm_eps, 1e-5);
        let qwen3 = import(qwen3_0_6b).unwrap().0;
        assert!(qwen3.qk_norm && !qwen3.qkv_bias && qwen3.tied(), "{qwen3:?}");
        assert_eq!((qwen3.head_dim, qwen3.rope_theta, qwen3.max_seq_len), (Some(128), 1e6, 40960));
        // transformers' Qwen3 takes heads of 128 when head_dim is absent; Qwen3's o_proj has
        // a bias with attention_bias, which ondol lacks.
        assert_eq!(import(&qwen3_0_6b.replace(r#""head_dim": 128,"#, "")).unwrap().0.head_dim, Some(128));
        let e = import(&qwen3_0_6b.replace(r#""attention_bias": false"#, r#""attention_bias": true"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("attention_bias"), "{e}");
        // A theta given twice must be one theta.
        let e =
            import(&llama_3_1_8b.replace(r#""rope_type": "llama3"}"#, r#""rope_type": "llama3", "rope_theta": 1e4}"#))
                .unwrap_err()
                .to_string();
        assert!(e.contains("rope_theta") && e.contains("disagrees"), "{e}");
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut json = to_hf_config(&llama(), None);
        json["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = from_hf_config(&json, "x/config.json").unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("yarn") && e.contains("x/config.json"), "{e}");
        let mut json = to_hf_config(&llama(), None);
        json["attention_bias"] = json!(true);
        assert!(from_hf_config(&json, "c").unwrap_err().to_string().contains("attention_bias"));
        let mut json = to_hf_config(&llama(), None);
        json["sliding_window"] = json!(4096);
        assert!(from_hf_config(&json, "c").unwrap_err().to_string().contains("sliding_window"));
        json["model_type"] = json!("smollm3");
        json["no_rope_layers"] = json!([1, 2]);
        assert!(from_hf_config(&json, "c").unwrap_err().to_string().contains("no_rope_layers"));
        let mut json = to_hf_config(&llama(), None);
        json["model_type"] = json!("falcon");
        assert!(from_hf_config(&json, "c").unwrap_err().to_string().contains("falcon"));
        // Mistral without a window is Llama; an absent one is transformers' 4096.
        let mut json = to_hf_config(&llama(), None);
        json["model_type"] = json!("mistral");
        json["sliding_window"] = json!(null);
        assert_eq!(from_hf_config(&json, "c").unwrap().0, llama());
        json.as_object_mut().unwrap().remove("sliding_window");
        assert_eq!(from_hf_config(&json, "c").unwrap().0.sliding_window, Some(4096));
        // A value that breaks one of ondol's constraints: its key and the file.
        let mut json = to_hf_config(&llama(), None);
        json["num_key_value_heads"] = json!(3);
        let e = from_hf_config(&json, "x/config.json").unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads` in `x/config.json") && e.contains("model.n_kv_heads"), "{e}");
        assert!(e.contains("divide"), "{e}");
        // GPT-2's names for the same.
        let gpt2 = ModelConfig { arch: Arch::Gpt2, n_kv_heads: None, tie_embeddings: None, ..llama() };
        let mut json = to_hf_config(&gpt2, None);
        json["n_head"] = json!(5);
        let e = from_hf_config(&json, "g/config.json").unwrap_err().to_string();
        assert!(e.contains("n_head` in `g/config.json") && e.contains("model.n_heads"), "{e}");
    }

    #[test]
    fn state_space_models_export_then_import_as_themselves() {
        let ssm = SsmConfig { state_size: Some(8), head_dim: 16, n_groups: 2, chunk_size: 8, ..Default::default() };
        let base = ModelConfig { n_heads: 0, n_kv_heads: None, ffn_hidden: None, ssm, ..llama() };
        let hybrid = ModelConfig {
            arch: Arch::Hybrid,
            n_layers: 3,
            n_heads: 4,
            n_kv_heads: Some(2),
            ffn_hidden: Some(48),
            pattern: Some("M*-".into()),
            ..base.clone()
        };
        for cfg in
            [ModelConfig { arch: Arch::Mamba, ..base.clone() }, ModelConfig { arch: Arch::Mamba2, ..base }, hybrid]
        {
            let (back, warnings) = from_hf_config(&to_hf_config(&cfg, None), "config.json").unwrap();
            assert!(warnings.is_empty(), "{warnings:?}");
            let sizes =
                |c: &ModelConfig| (c.arch, c.d_model, c.ssm_inner(), c.ssm_state(), c.ssm.conv_kernel, c.tied());
            assert_eq!(sizes(&back), sizes(&cfg));
            assert_eq!(back.layer_kinds(), cfg.layer_kinds());
            // Mamba-1's chunk is only how often backward saves a state: not part of HF's model.
            if cfg.arch == Arch::Mamba {
                assert_eq!(back.ssm_rank(), cfg.ssm_rank());
            } else {
                let groups = |c: &ModelConfig| (c.ssm_heads(), c.ssm.n_groups, c.ssm.chunk_size);
                assert_eq!(groups(&back), groups(&cfg));
            }
            if cfg.arch == Arch::Hybrid {
                assert_eq!((back.n_heads, back.kv_heads(), back.ffn()), (4, 2, 48));
            }
        }
    }

    #[test]
    fn python_infinities_parse_and_strings_keep_theirs() {
        let text = r#"{"time_step_limit": [0.0, Infinity], "note": "Infinity \" NaN", "x": -Infinity}"#;
        let v = parse_config(text, "c").unwrap();
        assert_eq!(v["time_step_limit"][1], json!("Infinity"));
        assert_eq!(v["note"], json!("Infinity \" NaN"));
        assert_eq!(v["x"], json!("-Infinity"));
        assert!(is_infinite(&v["time_step_limit"][1]) && is_infinite(&json!({"__float__": "Infinity"})));
        assert!(parse_config("{", "dir/config.json").unwrap_err().to_string().contains("dir/config.json"));
    }

    #[test]
    fn nemotron_h_without_head_dim_means_128() {
        let cfg = ModelConfig {
            arch: Arch::Hybrid,
            n_layers: 2,
            pattern: Some("M*".into()),
            ssm: SsmConfig { state_size: Some(8), head_dim: 16, ..Default::default() },
            ..llama()
        };
        let mut json = to_hf_config(&cfg, None);
        json.as_object_mut().unwrap().remove("head_dim");
        assert_eq!(from_hf_config(&json, "c").unwrap().0.head_dim, Some(128));
        json.as_object_mut().unwrap().remove("expand");
        json["head_dim"] = json!(8);
        assert_eq!(from_hf_config(&json, "c").unwrap().0.ssm.expand, 2, "expand follows heads x head_dim");
    }

    /// Nemotron-H's layers come from layers_block_type or hybrid_override_pattern: either one
    /// alone, or both agreeing; a disagreement, or a num_hidden_layers of another count, is
    /// refused naming the field.
    #[test]
    fn nemotron_h_layer_fields_must_agree() {
        let cfg = ModelConfig {
            arch: Arch::Hybrid,
            n_layers: 3,
            pattern: Some("M*-".into()),
            ssm: SsmConfig { state_size: Some(8), head_dim: 16, ..Default::default() },
            ..llama()
        };
        let json = to_hf_config(&cfg, None);
        let pattern = |json: &Value| from_hf_config(json, "c").map(|(c, _)| c.pattern.unwrap());
        let mut both = json.clone();
        both["hybrid_override_pattern"] = json!("M*-");
        assert_eq!(pattern(&both).unwrap(), "M*-");
        let mut only_override = both.clone();
        only_override.as_object_mut().unwrap().remove("layers_block_type");
        assert_eq!(pattern(&only_override).unwrap(), "M*-");
        both["hybrid_override_pattern"] = json!("MM-");
        let e = pattern(&both).unwrap_err().to_string();
        assert!(e.contains("hybrid_override_pattern") && e.contains("\"MM-\"") && e.contains("\"M*-\""), "{e}");
        let mut layers = json.clone();
        layers["num_hidden_layers"] = json!(4);
        let e = pattern(&layers).unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers") && e.contains("4 differs"), "{e}");
    }
}
