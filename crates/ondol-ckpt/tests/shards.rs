//! Model files above the size limit are split into shards with an index, as transformers
//! writes them, and read back whole.

use ondol_ckpt::tensors::{Contents, files_of, read_layout, write_layout};
use ondol_model::{Arch, Model, ModelConfig};

#[test]
fn sharded_files_round_trip_through_their_index() {
    let cfg = ModelConfig {
        ffn_hidden: Some(24),
        tie_embeddings: Some(false),
        ..ModelConfig::new(Arch::Llama, 50, 16, 3, 2, 8)
    };
    let model = Model::new(cfg).unwrap();
    let flat = model.layout.init(3);
    let dir = tempfile::tempdir().unwrap();
    let written = write_layout(dir.path(), "model", &model.layout, &flat, Contents::Weights, 4096).unwrap();
    assert!(written.len() > 3, "{written:?}");
    assert_eq!(written.last().unwrap(), "model.safetensors.index.json");
    assert!(written[0].starts_with("model-00001-of-"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 4 * flat.len());
    assert_eq!(index["weight_map"].as_object().unwrap().len(), model.layout.params().len());
    let files = files_of(dir.path(), "model").unwrap();
    assert_eq!(files.len(), written.len() - 1);
    let back = read_layout(&files, &model.layout, Contents::Weights).unwrap();
    assert!(back.iter().zip(&flat).all(|(a, b)| a.to_bits() == b.to_bits()));
    // A shard gone missing is named.
    std::fs::remove_file(&files[1]).unwrap();
    let e = read_layout(&files, &model.layout, Contents::Weights).unwrap_err().to_string();
    assert!(e.contains(files[1].file_name().unwrap().to_str().unwrap()), "{e}");
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
    for (stem, contents, stored) in [("model", Contents::Weights, 0.25), ("moments", Contents::Moments, 1.25)] {
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
