//! Incremental decoding with an inference cache gives the logits of the full forward pass:
//! prefill a prompt, then feed one token at a time, two sequences at once, for Llama (GQA,
//! rotary; Gemma 3, whose windowed layers have their own rotary theta) and GPT-2 (learned
//! positions) with their keys and values cached, and for Mamba-1,
//! Mamba-2 and a hybrid with their recurrent states carried (the convolution's last inputs,
//! the scan's state).

use ondol_core::Rng;
use ondol_cpu::CpuBackend;
use ondol_model::{Arch, InferenceCache, Model, ModelConfig, RopeScaling, RopeScalingKind, SsmConfig, Workspace};

fn model(arch: Arch) -> Model {
    Model::new(config(arch)).unwrap()
}

fn config(arch: Arch) -> ModelConfig {
    ModelConfig {
        n_kv_heads: if matches!(arch, Arch::Llama | Arch::Hybrid) { Some(2) } else { None },
        ffn_hidden: (!matches!(arch, Arch::Mamba | Arch::Mamba2)).then_some(24),
        init_std: 0.3,
        pattern: (arch == Arch::Hybrid).then(|| "M*-M".to_string()),
        // Chunks of 3 for the full forward's scans, so that it crosses chunk boundaries.
        ssm: match arch {
            Arch::Llama | Arch::Gpt2 => SsmConfig::default(),
            Arch::Mamba => SsmConfig { state_size: Some(6), chunk_size: 3, ..Default::default() },
            _ => SsmConfig { state_size: Some(6), head_dim: 8, n_groups: 2, chunk_size: 3, ..Default::default() },
        },
        ..ModelConfig::new(
            arch,
            23,
            16,
            if arch == Arch::Hybrid { 4 } else { 2 },
            if matches!(arch, Arch::Mamba | Arch::Mamba2) { 0 } else { 4 },
            12,
        )
    }
}

fn check(arch: Arch) {
    check_model(model(arch));
}

fn check_model(m: Model) {
    let arch = m.cfg.arch;
    let be = CpuBackend;
    let params = m.layout.init(4);
    let (batch, seq, prompt) = (2, 9, 4);
    let mut rng = Rng::new(2);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(23) as u32).collect();
    let mut full = Workspace::new(&be, &m, batch, seq).unwrap();
    m.forward(&be, &params, &mut full, &ids);
    let want = m.logits(&be, &params, &mut full);
    let v = m.cfg.vocab_size;

    let mut cache = InferenceCache::new(&be, &m, batch, m.cfg.max_seq_len);
    let mut pre = Workspace::new(&be, &m, batch, prompt).unwrap();
    let prompt_ids: Vec<u32> = (0..batch).flat_map(|b| ids[b * seq..b * seq + prompt].to_vec()).collect();
    m.forward_cached(&be, &params, &mut pre, &prompt_ids, &mut cache);
    let mut got = vec![vec![0.0f32; seq * v]; batch];
    let logits = m.logits(&be, &params, &mut pre);
    for b in 0..batch {
        got[b][..prompt * v].copy_from_slice(&logits[b * prompt * v..(b + 1) * prompt * v]);
    }
    let mut step = Workspace::new(&be, &m, batch, 1).unwrap();
    for t in prompt..seq {
        let next: Vec<u32> = (0..batch).map(|b| ids[b * seq + t]).collect();
        m.forward_cached(&be, &params, &mut step, &next, &mut cache);
        let logits = m.logits(&be, &params, &mut step);
        for b in 0..batch {
            got[b][t * v..(t + 1) * v].copy_from_slice(&logits[b * v..(b + 1) * v]);
        }
    }
    assert_eq!(cache.len, seq);
    for b in 0..batch {
        for (i, (g, w)) in got[b].iter().zip(&want[b * seq * v..(b + 1) * seq * v]).enumerate() {
            assert!((g - w).abs() < 2e-5 * (1.0 + w.abs()), "{arch:?} seq {b} position {}: {g} vs {w}", i / v);
        }
    }
}

#[test]
fn llama_cached_decoding_matches_the_full_forward() {
    check(Arch::Llama);
}

/// Sliding windows of 3 keys (shorter than the prompt, so the prefill's queries and each
/// decoding step's see a window), and a layer without positions.
#[test]
fn llama_with_windows_and_nope_layers_cached_decoding_matches_the_full_forward() {
    for pattern in ["LN", "GL"] {
        let cfg =
            ModelConfig { sliding_window: Some(3), attention_pattern: Some(pattern.into()), ..config(Arch::Llama) };
        check_model(Model::new(cfg).unwrap());
    }
}

/// Gemma 3's windows of 3 keys with their own rotary theta beside a global layer; and with
/// the global layer's rotary embeddings scaled linearly, the windowed layer's not.
#[test]
fn gemma3_cached_decoding_matches_the_full_forward() {
    let cfg = ModelConfig {
        arch: Arch::Gemma3,
        sliding_window: Some(3),
        attention_pattern: Some("LG".into()),
        rope_theta: 1e6,
        rope_theta_local: Some(100.0),
        ..config(Arch::Llama)
    };
    check_model(Model::new(cfg.clone()).unwrap());
    let linear = RopeScaling {
        kind: RopeScalingKind::Linear,
        factor: 4.0,
        low_freq_factor: 0.0,
        high_freq_factor: 0.0,
        original_max_seq_len: 0,
    };
    check_model(Model::new(ModelConfig { rope_theta_local: None, rope_scaling: Some(linear), ..cfg }).unwrap());
}

#[test]
fn gpt2_cached_decoding_matches_the_full_forward() {
    check(Arch::Gpt2);
}

#[test]
fn mamba_recurrent_decoding_matches_the_full_forward() {
    check(Arch::Mamba);
}

#[test]
fn mamba2_recurrent_decoding_matches_the_full_forward() {
    check(Arch::Mamba2);
}

#[test]
fn hybrid_decoding_matches_the_full_forward() {
    check(Arch::Hybrid);
}
