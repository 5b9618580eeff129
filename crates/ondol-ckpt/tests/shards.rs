//! Model files above the size limit are split into shards with an index, as transformers
//! writes them, and read back whole.

use ondol_ckpt::tensors::{files_of, read_layout, write_layout};
use ondol_model::{Arch, Model, ModelConfig};

#[test]
fn sharded_files_round_trip_through_their_index() {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 50,
        d_model: 16,
        n_layers: 3,
        n_heads: 2,
        n_kv_heads: None,
        ffn_hidden: Some(24),
        max_seq_len: 8,
        tie_embeddings: Some(false),
        rope_theta: 10_000.0,
        rope_scaling: None,
        qkv_bias: false,
        qk_norm: false,
        block_norms: Default::default(),
        head_dim: None,
        norm_eps: 1e-5,
        init_std: 0.02,
        init_residual_scaling: true,
        pattern: None,
        ssm: Default::default(),
        mup: Default::default(),
        sliding_window: None,
        attention_pattern: None,
        init_from: None,
    };
    let model = Model::new(cfg).unwrap();
    let flat = model.layout.init(3);
    let dir = tempfile::tempdir().unwrap();
    let written = write_layout(dir.path(), "model", &model.layout, &flat, 4096).unwrap();
    assert!(written.len() > 3, "{written:?}");
    assert_eq!(written.last().unwrap(), "model.safetensors.index.json");
    assert!(written[0].starts_with("model-00001-of-"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 4 * flat.len());
    assert_eq!(index["weight_map"].as_object().unwrap().len(), model.layout.params().len());
    let files = files_of(dir.path(), "model").unwrap();
    assert_eq!(files.len(), written.len() - 1);
    let back = read_layout(&files, &model.layout).unwrap();
    assert!(back.iter().zip(&flat).all(|(a, b)| a.to_bits() == b.to_bits()));
    // A shard gone missing is named.
    std::fs::remove_file(&files[1]).unwrap();
    let e = read_layout(&files, &model.layout).unwrap_err().to_string();
    assert!(e.contains(files[1].file_name().unwrap().to_str().unwrap()), "{e}");
}
