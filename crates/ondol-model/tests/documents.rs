//! Documents packed into one sequence that attend only within their own: a rotary model's
//! logits for a document are then those of the document alone, wherever it sits in the
//! sequence (rotary scores depend on positions only through their differences).

use ondol_core::Rng;
use ondol_core::backend::document_starts;
use ondol_cpu::CpuBackend;
use ondol_model::{Arch, Model, ModelConfig, Workspace, counted_keys};

const EOT: u32 = 0;
const VOCAB: usize = 19;

fn llama() -> Model {
    let cfg = ModelConfig::new(Arch::Llama, VOCAB, 16, 2, 4, 40);
    Model::new(ModelConfig { n_kv_heads: Some(2), ffn_hidden: Some(24), init_std: 0.3, ..cfg }).unwrap()
}

/// A document: the end-of-text token that starts it, then `len - 1` other tokens.
fn document(rng: &mut Rng, len: usize) -> Vec<u32> {
    std::iter::once(EOT).chain((1..len).map(|_| 1 + rng.below(VOCAB as u64 - 1) as u32)).collect()
}

/// The logits of `ids` (one sequence), with its documents masked or not.
fn logits(m: &Model, params: &[f32], ids: &[u32], masked: bool) -> Vec<f32> {
    let be = CpuBackend;
    let mut ws = Workspace::new(&be, m, 1, ids.len()).unwrap();
    let first_keys = document_starts(ids, ids.len(), EOT);
    ws.set_first_keys(&be, masked.then_some(first_keys.as_slice()));
    m.forward(&be, &params.to_vec(), &mut ws, &ids.to_vec());
    m.logits(&be, &params.to_vec(), &mut ws)
}

#[test]
fn a_masked_document_reads_as_if_alone() {
    let m = llama();
    let params = m.layout.init(5);
    let mut rng = Rng::new(8);
    let docs = [document(&mut rng, 11), document(&mut rng, 17), document(&mut rng, 9)];
    let packed: Vec<u32> = docs.concat();
    let (got, plain) = (logits(&m, &params, &packed, true), logits(&m, &params, &packed, false));
    let mut start = 0;
    for (d, doc) in docs.iter().enumerate() {
        let alone = logits(&m, &params, doc, false);
        let here = &got[start * VOCAB..(start + doc.len()) * VOCAB];
        let scale = alone.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        let worst = here.iter().zip(&alone).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst <= 1e-5 * scale, "document {d} at {start}: logits {worst} off alone's (scale {scale})");
        // The first document sees nothing before it either way; the others do without a mask.
        let unmasked = &plain[start * VOCAB..(start + doc.len()) * VOCAB];
        let leak = unmasked.iter().zip(&alone).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
        assert_eq!(d == 0, leak <= 1e-5 * scale, "document {d}: unmasked logits {leak} off alone's");
        start += doc.len();
    }
}

/// A sliding window's layers count the keys they attend in the FLOPs per token, the global
/// ones the sequence (PaLM's 12 d T per layer).
#[test]
fn windowed_layers_count_the_keys_they_attend() {
    let (plain, seq) = (llama(), 40);
    let cfg = ModelConfig { sliding_window: Some(4), attention_pattern: Some("LG".into()), ..plain.cfg.clone() };
    let windowed = Model::new(cfg).unwrap();
    let per_key = 12.0 * plain.cfg.d_model as f64;
    let fewer = plain.flops_per_token(seq) as f64 - windowed.flops_per_token(seq) as f64;
    assert!((fewer - per_key * (seq as f64 - counted_keys(seq, Some(4)))).abs() <= 1.0, "{fewer}");
}
