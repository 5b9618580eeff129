//! Whole-model gradient checks: the analytic gradient of the summed cross-entropy with
//! respect to every parameter tensor (a sample of elements of each) against central
//! finite differences, for tiny Llama (grouped-query, tied and untied), Gemma 3, GPT-2, Mamba-1,
//! Mamba-2 and hybrid models (scan chunks shorter than the sequence, so state passing and the
//! backward's recompute from boundary states are both exercised).

use ondol_core::backend::document_starts;
use ondol_core::gradcheck::{check_indices, sample_indices};
use ondol_core::{Backend, Rng};
use ondol_cpu::CpuBackend;
use ondol_model::{Arch, BlockNorms, MicroBatch, Model, ModelConfig, MupConfig, SsmConfig, Workspace};

fn tiny(arch: Arch, tie: Option<bool>) -> ModelConfig {
    ModelConfig {
        n_kv_heads: if matches!(arch, Arch::Llama | Arch::Gemma3) { Some(1) } else { None },
        ffn_hidden: Some(12),
        tie_embeddings: tie,
        // Larger than a real init so that every gradient is well above f32 noise.
        init_std: 0.3,
        ..ModelConfig::new(arch, 11, 8, 2, 2, 6)
    }
}

/// `h`: the finite-difference step; the gated norms and scans curve more sharply than a
/// transformer does, so the state-space models take a smaller one.
fn check_model(cfg: ModelConfig, h: f32) {
    check_model_on(cfg, h, None);
}

/// [`check_model`]; with `eot`, the sequences hold documents that start at it and attend
/// only within their own, and every block is recomputed in backward.
fn check_model_on(cfg: ModelConfig, h: f32, eot: Option<u32>) {
    let be = CpuBackend;
    let model = Model::new(cfg).unwrap();
    let (batch, seq) = (2, 5);
    let mut rng = Rng::new(3);
    let mut ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(11) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(11) as u32).collect();
    let mut params = model.layout.init(1);
    // The loss in uneven chunks of rows (3, 3, 3, 1), as a long micro-batch takes it.
    let mb = MicroBatch { loss_chunk: 3, recompute_every: eot.map_or(0, |_| 1), ..MicroBatch::new(batch, seq) };
    let mut ws = Workspace::with_options(&be, &model, mb).unwrap();
    if let Some(eot) = eot {
        // Documents of 2 and 3 tokens, and of 1 and 4.
        ids.iter_mut().filter(|id| **id == eot).for_each(|id| *id = eot + 1);
        ids[2] = eot;
        ids[6] = eot;
        let first_keys = document_starts(&ids, seq, eot);
        assert_eq!(first_keys, [0, 0, 2, 2, 2, 0, 1, 1, 1, 1]);
        ws.set_first_keys(&be, Some(&first_keys));
    }

    model.forward(&be, &params, &mut ws, &ids);
    let mut grads = be.zeros(params.len());
    model.loss(&be, &params, &mut ws, &targets, Some((1.0, &mut grads)));
    model.backward(&be, &params, &mut grads, &mut ws, &ids);

    let mut loss = |p: &[f32]| {
        let p = p.to_vec();
        model.forward(&be, &p, &mut ws, &ids);
        model.loss(&be, &p, &mut ws, &targets, None)
    };
    for (i, info) in model.layout.params().iter().enumerate() {
        let indices = sample_indices(info.range(), 12, i as u64);
        check_indices(&mut params, &grads, &mut loss, h, 2e-2, 2e-3, &indices).assert_ok(&info.name);
    }
}

#[test]
fn llama_with_grouped_query_attention_untied() {
    check_model(tiny(Arch::Llama, Some(false)), 1e-2);
}

#[test]
fn llama_tied() {
    check_model(tiny(Arch::Llama, Some(true)), 1e-2);
}

/// Sliding windows of 2 keys, a global layer and one without positions; with documents too.
/// (A smaller step: at 1e-2 the curvature moves layer 0's o_proj difference by 3 %; at 3e-3
/// and at 1e-3 every sample agrees.)
#[test]
fn llama_with_windows_and_nope_layers() {
    let cfg = ModelConfig {
        n_layers: 3,
        sliding_window: Some(2),
        attention_pattern: Some("LGN".into()),
        ..tiny(Arch::Llama, Some(false))
    };
    check_model(cfg.clone(), 3e-3);
    check_model_on(cfg, 3e-3, Some(4));
}

/// Gemma 3: norms before and after each mixer, q and k norms, GeGLU, the embedding scaled by
/// sqrt(d_model), the scores by 1 / sqrt(3); windows of 2 keys with their own rotary theta.
/// (A smaller step: the scaled embedding curves the loss enough that at 3e-3 one v_proj
/// difference moves by 7 %; at 1e-3 every sample agrees, at 3e-4 f32's rounding shows.)
#[test]
fn gemma3_with_windows_of_their_own_theta() {
    let cfg = ModelConfig {
        sliding_window: Some(2),
        attention_pattern: Some("LG".into()),
        rope_theta_local: Some(100.0),
        mup: MupConfig { attention_multiplier: Some(1.0 / 3f64.sqrt()), ..MupConfig::default() },
        ..tiny(Arch::Gemma3, None)
    };
    check_model(cfg, 1e-3);
}

/// Documents packed into sequences, attending only within their own, through a recomputing
/// backward: Llama and GPT-2.
#[test]
fn llama_and_gpt2_within_documents() {
    check_model_on(tiny(Arch::Llama, Some(false)), 1e-2, Some(4));
    check_model_on(tiny(Arch::Gpt2, None), 1e-2, Some(4));
}

/// Qwen2's attention: biases on the query, key and value projections.
#[test]
fn llama_with_qkv_biases() {
    let cfg = ModelConfig { qkv_bias: true, ..tiny(Arch::Llama, Some(false)) };
    let model = Model::new(cfg.clone()).unwrap();
    let k = model.layout.get("model.layers.1.self_attn.k_proj.bias").unwrap();
    assert_eq!(k.shape, [4]); // one kv head of dim 4
    // (A smaller step than the other transformers': at this model's random point o_proj's
    // curvature moves a difference over 1e-2 by 5 %.)
    check_model(cfg, 3e-3);
}

/// Qwen3's attention: heads wider than d_model / n_heads, and an RMSNorm on each q and k head.
#[test]
fn llama_with_wide_heads_and_qk_norm() {
    let cfg = ModelConfig { head_dim: Some(6), qk_norm: true, ..tiny(Arch::Llama, Some(false)) };
    let model = Model::new(cfg.clone()).unwrap();
    let shape = |name: &str| model.layout.get(&format!("model.layers.1.self_attn.{name}")).unwrap().shape.clone();
    assert_eq!(shape("q_proj.weight"), [12, 8]); // two heads of 6
    assert_eq!(shape("o_proj.weight"), [8, 12]);
    assert_eq!((shape("q_norm.weight"), shape("k_norm.weight")), (vec![6], vec![6]));
    check_model(cfg, 1e-2);
}

/// EXAONE 4's blocks, norms after the mixers alone (with q and k norms), and HyperCLOVA X's,
/// norms before and after (Peri-LN).
#[test]
fn llama_with_post_norms_and_with_norms_before_and_after() {
    for (norms, qk_norm) in [(BlockNorms::Post, true), (BlockNorms::Both, false)] {
        let cfg = ModelConfig { block_norms: norms, qk_norm, ..tiny(Arch::Llama, Some(false)) };
        let model = Model::new(cfg.clone()).unwrap();
        let has = |name: &str| model.layout.get(&format!("model.layers.1.{name}.weight")).is_some();
        let names = ["input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm", "post_norm1"];
        let want = match norms {
            BlockNorms::Post => [false, true, true, false],
            _ => [true, true, false, true],
        };
        assert_eq!(names.map(has), want, "{norms:?}");
        // (A smaller step: a norm after the MLP bends the loss in down_proj's weights sharply
        // enough that a step of 1e-2 is 3 % off.)
        check_model(cfg, 1e-3);
    }
}

/// muP's multipliers (HyperCLOVA X's and Granite's): on the embedding, each block's output,
/// the attention scores and the logits; with norms on both sides, as HyperCLOVA X has them.
#[test]
fn llama_with_mup_multipliers() {
    let mup = MupConfig {
        embedding_multiplier: 3.0,
        residual_multiplier: 0.5,
        logits_multiplier: 0.25,
        attention_multiplier: Some(0.125),
    };
    for norms in [BlockNorms::Pre, BlockNorms::Both] {
        check_model(ModelConfig { mup: mup.clone(), block_norms: norms, ..tiny(Arch::Llama, Some(false)) }, 1e-3);
    }
}

#[test]
fn gpt2() {
    check_model(tiny(Arch::Gpt2, None), 1e-2);
}

/// `ssm` with Mamba-2 heads of `head_dim` channels in `groups` groups, unless `arch` is
/// Mamba-1's, which has neither.
fn mamba2_heads(arch: Arch, ssm: SsmConfig, head_dim: usize, groups: usize) -> SsmConfig {
    if arch == Arch::Mamba { ssm } else { SsmConfig { head_dim, n_groups: groups, ..ssm } }
}

/// A tiny state-space model: E = 16 channels, 4 states, chunks of 2 tokens (Mamba-2: heads
/// of 4 channels, 2 groups).
fn tiny_ssm(arch: Arch, pattern: Option<&str>) -> ModelConfig {
    let n_layers = pattern.map_or(2, |p| p.len());
    ModelConfig {
        n_heads: if pattern.is_some() { 2 } else { 0 },
        n_kv_heads: pattern.map(|_| 1),
        ffn_hidden: pattern.map(|_| 12),
        n_layers,
        pattern: pattern.map(str::to_string),
        ssm: mamba2_heads(
            arch,
            SsmConfig { state_size: Some(4), conv_kernel: 3, chunk_size: 2, ..Default::default() },
            4,
            2,
        ),
        tie_embeddings: Some(false),
        ..tiny(arch, None)
    }
}

#[test]
fn mamba() {
    check_model(tiny_ssm(Arch::Mamba, None), 2e-3);
}

#[test]
fn mamba2() {
    check_model(tiny_ssm(Arch::Mamba2, None), 2e-3);
}

#[test]
fn hybrid() {
    check_model(tiny_ssm(Arch::Hybrid, Some("M*-M")), 2e-3);
}

/// Nemotron-H 4B's attention: heads of 128 where d_model / n_heads is 96.
#[test]
fn hybrid_with_wide_heads() {
    check_model(ModelConfig { head_dim: Some(6), ..tiny_ssm(Arch::Hybrid, Some("M*-M")) }, 2e-3);
}

#[test]
fn hugging_face_names_and_fused_layouts() {
    let llama = Model::new(tiny(Arch::Llama, Some(false))).unwrap();
    let names: Vec<&str> = llama.layout.params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        &names[..10],
        [
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ]
    );
    assert_eq!(names.last(), Some(&"lm_head.weight"));
    // Weight decay: matrices (an untied head included) yes; embeddings, norms and biases no.
    let decays = |name: &str| llama.layout.get(name).unwrap().decay;
    assert!(decays("lm_head.weight") && decays("model.layers.0.self_attn.o_proj.weight"));
    assert!(!decays("model.embed_tokens.weight") && !decays("model.norm.weight"));
    let k = llama.layout.get("model.layers.1.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.shape, [4, 8]); // one kv head of dim 4
    let gpt2 = Model::new(tiny(Arch::Gpt2, None)).unwrap();
    let c_attn = gpt2.layout.get("transformer.h.0.attn.c_attn.weight").unwrap();
    assert_eq!(c_attn.shape, [8, 24]); // Conv1D: [in, out]
    assert!(gpt2.layout.get("lm_head.weight").is_none()); // tied
    assert!(gpt2.layout.get("transformer.wpe.weight").is_some());

    let mamba = Model::new(tiny_ssm(Arch::Mamba, None)).unwrap();
    let shapes: Vec<(&str, &[usize])> =
        mamba.layout.params().iter().take(11).map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
    let want: [(&str, &[usize]); 11] = [
        ("backbone.embeddings.weight", &[11, 8]),
        ("backbone.layers.0.norm.weight", &[8]),
        ("backbone.layers.0.mixer.in_proj.weight", &[32, 8]),
        ("backbone.layers.0.mixer.conv1d.weight", &[16, 1, 3]),
        ("backbone.layers.0.mixer.conv1d.bias", &[16]),
        ("backbone.layers.0.mixer.x_proj.weight", &[1 + 2 * 4, 16]),
        ("backbone.layers.0.mixer.dt_proj.weight", &[16, 1]),
        ("backbone.layers.0.mixer.dt_proj.bias", &[16]),
        ("backbone.layers.0.mixer.A_log", &[16, 4]),
        ("backbone.layers.0.mixer.D", &[16]),
        ("backbone.layers.0.mixer.out_proj.weight", &[8, 16]),
    ];
    assert_eq!(shapes, want);
    // Hugging Face's init: A = -(1..=N) per channel, D = 1, softplus(dt bias) log-uniform in
    // [time_step_min, time_step_max].
    let init = mamba.layout.init(7);
    let tensor = |m: &Model, name: &str| init[m.layout.get(name).unwrap().range()].to_vec();
    let a_log = tensor(&mamba, "backbone.layers.1.mixer.A_log");
    assert!(a_log.chunks(4).all(|row| row.iter().enumerate().all(|(n, v)| (v - ((n + 1) as f32).ln()).abs() < 1e-6)));
    assert!(tensor(&mamba, "backbone.layers.0.mixer.D").iter().all(|&v| v == 1.0));
    let steps: Vec<f32> =
        tensor(&mamba, "backbone.layers.0.mixer.dt_proj.bias").iter().map(|b| b.exp().ln_1p()).collect();
    assert!(steps.iter().all(|s| (0.001 * 0.999..=0.1 * 1.001).contains(s)), "{steps:?}");
    assert!(steps.iter().cloned().fold(0.0, f32::max) > 0.01, "log-uniform steps spread over two decades");

    let hybrid = Model::new(tiny_ssm(Arch::Hybrid, Some("M*-M"))).unwrap();
    let in_proj = hybrid.layout.get("backbone.layers.0.mixer.in_proj.weight").unwrap();
    assert_eq!(in_proj.shape, [16 + (16 + 2 * 2 * 4) + 4, 8]); // z, xBC, dt (4 heads)
    assert!(hybrid.layout.get("backbone.layers.1.mixer.k_proj.weight").is_some());
    assert!(hybrid.layout.get("backbone.layers.2.mixer.up_proj.weight").is_some());
    assert!(hybrid.layout.get("backbone.norm_f.weight").is_some());
}
