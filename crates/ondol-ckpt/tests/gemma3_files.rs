//! Gemma 3 scales by 1 + w and stores w: model files hold its norm scales minus one, converted
//! on reading and writing, and a checkpoint that resumes keeps their exact values as well.

use ondol_ckpt::checkpoint::{self, Layout, Moments, Snapshot};
use ondol_ckpt::tensors::{Contents, files_of, read_layout, write_layout};
use ondol_model::{Arch, Model, ModelConfig};

fn gemma3() -> Model {
    Model::new(ModelConfig {
        head_dim: Some(8),
        ffn_hidden: Some(24),
        ..ModelConfig::new(Arch::Gemma3, 50, 16, 2, 2, 8)
    })
    .unwrap()
}

/// The model's weights with every norm scale at `scale`.
fn with_scales(model: &Model, scale: f32) -> Vec<f32> {
    let mut flat = model.layout.init(3);
    for p in model.layout.params().iter().filter(|p| p.stored_minus_one) {
        flat[p.range()].fill(scale);
    }
    flat
}

/// Gemma 3 scales by 1 + w: its files hold every RMSNorm weight (q and k norms included)
/// minus one, and reading adds it back; other tensors, and the optimizer's moments, are
/// stored as they are.
#[test]
fn gemma3_files_hold_norm_weights_minus_one() {
    let cfg =
        ModelConfig { head_dim: Some(8), ffn_hidden: Some(24), ..ModelConfig::new(Arch::Gemma3, 50, 16, 2, 2, 8) };
    let model = Model::new(cfg).unwrap();
    let mut flat = model.layout.init(3);
    for p in model.layout.params() {
        if p.name.ends_with("norm.weight") || p.name.ends_with("layernorm.weight") {
            flat[p.range()].fill(1.25);
        }
    }
    let shifted: Vec<&str> =
        model.layout.params().iter().filter(|p| p.stored_minus_one).map(|p| p.name.as_str()).collect();
    // Four per layer around the mixers, q and k norms, the final norm.
    assert_eq!(shifted.len(), 2 * 6 + 1, "{shifted:?}");
    for (stem, contents, stored) in [("model", Contents::Weights, 0.25), ("moments", Contents::AsIs, 1.25)] {
        let dir = tempfile::tempdir().unwrap();
        write_layout(dir.path(), stem, &model.layout, &flat, contents, 1 << 30).unwrap();
        let files = files_of(dir.path(), stem).unwrap();
        let bytes = std::fs::read(&files[0]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for name in &shifted {
            let t = st.tensor(name).unwrap();
            let first = f32::from_le_bytes(t.data()[..4].try_into().unwrap());
            assert_eq!(first, stored, "{stem}: {name}");
        }
        let embed = st.tensor("model.embed_tokens.weight").unwrap();
        let first = f32::from_le_bytes(embed.data()[..4].try_into().unwrap());
        assert_eq!(first, flat[model.layout.get("model.embed_tokens.weight").unwrap().offset]);
        let back = read_layout(&files, &model.layout, contents).unwrap();
        assert!(back.iter().zip(&flat).all(|(a, b)| a.to_bits() == b.to_bits()), "{stem}");
    }
}

/// Below 0.5, `x - 1` in f32 drops bits of `x` (0.2481324 would come back as 0.2481323): a
/// checkpoint's model file holds what transformers reads, and its optimizer/ the exact scales,
/// which a resume loads.
#[test]
fn a_gemma3_checkpoint_resumes_with_its_exact_norm_scales() {
    let model = gemma3();
    let params = with_scales(&model, 0.2481324);
    let through_file = (0.2481324f32 - 1.0) + 1.0;
    assert_ne!(through_file.to_bits(), 0.2481324f32.to_bits(), "the scale shows the loss");
    let n = params.len();
    let snap = Snapshot {
        model: model.cfg.clone(),
        layout: model.layout.clone(),
        params: params.clone(),
        moments: Some(Moments { exp_avg: vec![0.5; n], exp_avg_sq: vec![0.25; n] }),
        step: 3,
        tokens: 96,
        data: serde_json::json!(null),
        data_tokens: None,
        data_files: None,
        parallel: Layout { tp: 1, pp: 1, dp: 1 },
        run_config: "[model]\n".into(),
        extra_files: vec![],
        eos_token_id: Some(1),
        bos_token_id: Some(2),
        eos_token: None,
        max_shard_bytes: 1 << 30,
    };
    let dir = tempfile::tempdir().unwrap();
    let saved = checkpoint::save(dir.path(), &snap).unwrap();
    let loaded = checkpoint::load(&saved, &model.cfg, &model.layout).unwrap();
    // Gemma's own ids, as its files give them: <eos> 1, <bos> 2.
    for file in ["config.json", "generation_config.json"] {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(saved.join(file)).unwrap()).unwrap();
        assert_eq!((&json["eos_token_id"], &json["bos_token_id"]), (&1.into(), &2.into()), "{file}");
    }
    assert!(loaded.params.iter().zip(&params).all(|(a, b)| a.to_bits() == b.to_bits()));
    // The model file alone (evaluation, init_from) reads within f32's rounding of 1.
    let weights = read_layout(&files_of(&saved, "model").unwrap(), &model.layout, Contents::Weights).unwrap();
    let scale = model.layout.params().iter().find(|p| p.stored_minus_one).unwrap();
    assert_eq!(weights[scale.offset], through_file);
}
