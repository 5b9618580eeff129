//! Whole-model gradient checks: the analytic gradient of the summed cross-entropy with
//! respect to every parameter tensor (a sample of elements of each) against central
//! finite differences, for tiny Llama (grouped-query, tied and untied) and GPT-2 models.

use ondol_core::gradcheck::{check_indices, sample_indices};
use ondol_core::{Backend, Rng};
use ondol_cpu::CpuBackend;
use ondol_model::{Arch, ModelConfig, Transformer, Workspace};

fn tiny(arch: Arch, tie: Option<bool>) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 11,
        d_model: 8,
        n_layers: 2,
        n_heads: 2,
        n_kv_heads: if arch == Arch::Llama { Some(1) } else { None },
        ffn_hidden: Some(12),
        max_seq_len: 6,
        tie_embeddings: tie,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        // Larger than a real init so that every gradient is well above f32 noise.
        init_std: 0.3,
        init_residual_scaling: true,
        init_from: None,
    }
}

fn check_model(cfg: ModelConfig) {
    let be = CpuBackend;
    let model = Transformer::new(cfg).unwrap();
    let (batch, seq) = (2, 5);
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(11) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(11) as u32).collect();
    let mut params = model.layout.init(1);
    let mut ws = Workspace::new(&be, &model, batch, seq).unwrap();

    model.forward(&be, &params, &mut ws, &ids);
    model.loss(&be, &mut ws, &targets, Some(1.0));
    let mut grads = be.zeros(params.len());
    model.backward(&be, &params, &mut grads, &mut ws, &ids);

    let mut loss = |p: &[f32]| {
        let p = p.to_vec();
        model.forward(&be, &p, &mut ws, &ids);
        model.loss(&be, &mut ws, &targets, None)
    };
    for (i, info) in model.layout.params().iter().enumerate() {
        let indices = sample_indices(info.range(), 12, i as u64);
        check_indices(&mut params, &grads, &mut loss, 1e-2, 2e-2, 2e-3, &indices).assert_ok(&info.name);
    }
}

#[test]
fn llama_with_grouped_query_attention_untied() {
    check_model(tiny(Arch::Llama, Some(false)));
}

#[test]
fn llama_tied() {
    check_model(tiny(Arch::Llama, Some(true)));
}

#[test]
fn gpt2() {
    check_model(tiny(Arch::Gpt2, None));
}

#[test]
fn hugging_face_names_and_fused_layouts() {
    let llama = Transformer::new(tiny(Arch::Llama, Some(false))).unwrap();
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
    let k = llama.layout.get("model.layers.1.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.shape, [4, 8]); // one kv head of dim 4
    let gpt2 = Transformer::new(tiny(Arch::Gpt2, None)).unwrap();
    let c_attn = gpt2.layout.get("transformer.h.0.attn.c_attn.weight").unwrap();
    assert_eq!(c_attn.shape, [8, 24]); // Conv1D: [in, out]
    assert!(gpt2.layout.get("lm_head.weight").is_none()); // tied
    assert!(gpt2.layout.get("transformer.wpe.weight").is_some());
}
