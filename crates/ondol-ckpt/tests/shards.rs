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

/// A tensor that two names in the files give (here `X` and `transformer.X`) is an error, not
/// whichever came last.
#[test]
fn a_tensor_given_twice_is_refused() {
    let cfg = ModelConfig {
        ffn_hidden: Some(24),
        tie_embeddings: Some(false),
        ..ModelConfig::new(Arch::Llama, 50, 16, 1, 2, 8)
    };
    let model = Model::new(cfg).unwrap();
    let flat = model.layout.init(3);
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), "model", &model.layout, &flat, Contents::Weights, 1 << 30).unwrap();
    let head = model.layout.get("lm_head.weight").unwrap();
    let again = dir.path().join("again.safetensors");
    ondol_ckpt::tensors::write_file(
        &again,
        &[("transformer.lm_head.weight", head.shape.clone(), &flat[head.range()])],
        None,
    )
    .unwrap();
    let files = [files_of(dir.path(), "model").unwrap(), vec![again]].concat();
    let e = read_layout(&files, &model.layout, Contents::Weights).unwrap_err().to_string();
    assert!(e.contains("transformer.lm_head.weight") && e.contains("again"), "{e}");
}
