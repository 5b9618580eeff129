//! Golden parity with Hugging Face transformers: tiny random Llama (GQA; tied with a large
//! rope theta; Llama 3.1's rope scaling), Mistral, Qwen2, Qwen3, EXAONE 3.5 and 4, HyperCLOVA X
//! (Peri-LN, muP), Granite (muP), Gemma 3, GPT-2, Mamba, Mamba-2 and Nemotron-H (hybrid) models made by
//! scripts/make-hf-fixtures.py, with transformers'
//! logits and loss on fixed tokens. ondol imports each directory as transformers wrote it
//! and must reproduce the logits within 1e-4 (relative to the logits' scale) in f32.

use ondol_ckpt::{hf, tensors};
use ondol_cpu::CpuBackend;
use ondol_model::{Model, ModelConfig, Workspace};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Expected {
    ids: Vec<u32>,
    batch: usize,
    seq: usize,
    logits: Vec<f32>,
    loss: f32,
}

fn expected(dir: &Path) -> Expected {
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let (batch, seq) = (ids.shape()[0], ids.shape()[1]);
    let ids = ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    Expected { ids, batch, seq, logits: f32s("logits"), loss: f32s("loss")[0] }
}

/// ondol's logits for the fixture's tokens, from the directory transformers saved.
fn ondol_logits(dir: &Path, e: &Expected) -> (Vec<f32>, f64) {
    ondol_logits_edited(dir, e, |_| {})
}

/// [`ondol_logits`] with the imported config changed by `edit` first.
fn ondol_logits_edited(dir: &Path, e: &Expected, edit: impl FnOnce(&mut ModelConfig)) -> (Vec<f32>, f64) {
    let json = hf::parse_config(&std::fs::read_to_string(dir.join("config.json")).unwrap(), "config.json").unwrap();
    let (mut cfg, warnings) = hf::from_hf_config(&json, "config.json").unwrap();
    // (Gemma 3's image-text checkpoints say that their image model is left out.)
    assert!(
        warnings.iter().all(|w| w.contains("image model (vision_config and its projector) is left out")),
        "{warnings:?}"
    );
    edit(&mut cfg);
    let model = Model::new(cfg).unwrap();
    let params =
        tensors::read_layout(&tensors::files_of(dir, "model").unwrap(), &model.layout, tensors::Contents::Weights)
            .unwrap();
    let be = CpuBackend;
    let mut ws = Workspace::new(&be, &model, e.batch, e.seq).unwrap();
    model.forward(&be, &params, &mut ws, &e.ids);
    let logits = model.logits(&be, &params, &mut ws);
    // transformers' loss: next-token cross-entropy over the seq - 1 shifted positions per row.
    let v = model.cfg.vocab_size;
    let mut sum = 0.0f64;
    for b in 0..e.batch {
        for t in 0..e.seq - 1 {
            let row = &logits[(b * e.seq + t) * v..][..v];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|x| (*x as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - row[e.ids[b * e.seq + t + 1] as usize] as f64;
        }
    }
    (logits, sum / (e.batch * (e.seq - 1)) as f64)
}

fn check(name: &str) {
    let rtol = 1e-4;
    let dir = fixture(name);
    let e = expected(&dir);
    let (logits, loss) = ondol_logits(&dir, &e);
    assert_eq!(logits.len(), e.logits.len());
    let scale = e.logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = ondol_core::gradcheck::max_abs_diff(&logits, &e.logits);
    eprintln!("{name}: max abs logit difference {worst:.2e} (logit scale {scale:.2}), loss {loss:.7} vs {:.7}", e.loss);
    assert!(worst <= rtol * scale, "{name}: max |ondol - transformers| = {worst:e} (logit scale {scale})");
    assert!((loss - e.loss as f64).abs() <= rtol as f64 * e.loss as f64, "{name}: loss {loss} vs {}", e.loss);
}

#[test]
fn llama_with_grouped_query_attention_matches_transformers() {
    check("tiny-llama-gqa");
}

#[test]
fn tied_llama_with_large_rope_theta_matches_transformers() {
    check("tiny-llama-tied");
}

/// Llama 3.1's rotary scaling (`rope_type = "llama3"`): one frequency of the fixture's head
/// kept, one blended, two divided. Without the scaling the logits part from transformers'.
#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("tiny-llama3-rope");
    check_matters("tiny-llama3-rope", |cfg| cfg.rope_scaling = None);
}

/// Mistral without a sliding window is Llama under another name (and a large rope theta).
#[test]
fn mistral_matches_transformers() {
    check("tiny-mistral");
}

/// Fails where the fixture's model without `strip` matches transformers as well: the setting
/// must show in its logits.
fn check_matters(name: &str, strip: impl FnOnce(&mut ModelConfig)) {
    let dir = fixture(name);
    let e = expected(&dir);
    let (plain, _) = ondol_logits_edited(&dir, &e, strip);
    let scale = e.logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let apart = ondol_core::gradcheck::max_abs_diff(&plain, &e.logits);
    assert!(apart > 1e-2 * scale, "{name}: the fixture does not tell the setting apart: {apart:e}");
}

/// Mistral 7B v0.1's sliding window (5 keys of the fixture's 13 tokens) on every layer.
#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    check("tiny-mistral-window");
    check_matters("tiny-mistral-window", |c| c.sliding_window = None);
}

/// SmolLM3: a layer without rotary positions (its every 4th), and windows of 4 keys on two of
/// the others ("LGLN"), a tied head.
#[test]
fn smollm3_with_nope_layers_and_windows_matches_transformers() {
    check("tiny-smollm3");
    check_matters("tiny-smollm3", |c| c.attention_pattern = Some("LGLL".into()));
    check_matters("tiny-smollm3", |c| (c.sliding_window, c.attention_pattern) = (None, Some("GGGN".into())));
}

/// Gemma 3's text model: norms before and after each mixer, q and k norms, GeGLU, the embedding
/// scaled by sqrt(d_model), norm weights stored minus one, windows of 4 keys with their own
/// rotary theta on three layers of four ("LLGL"), the scores scaled by 1 / sqrt(6) (its
/// query_pre_attn_scalar) where heads are 8 wide.
#[test]
fn gemma3_matches_transformers() {
    check("tiny-gemma3");
    check_matters("tiny-gemma3", |c| c.rope_theta_local = None);
    check_matters("tiny-gemma3", |c| c.mup.attention_multiplier = None);
    check_matters("tiny-gemma3", |c| c.attention_pattern = Some("LLLL".into()));
}

/// Gemma 3 4B's kind of checkpoint: the text model of an image-text one (its tensors under
/// `language_model.`, an image model beside them that the import leaves out), the global
/// layers' rotary embeddings scaled linearly by 8 and the windowed layers' not.
#[test]
fn the_text_model_of_gemma3_image_text_matches_transformers() {
    check("tiny-gemma3-image-text");
    check_matters("tiny-gemma3-image-text", |c| c.rope_scaling = None);
}

/// EXAONE 4.0 32B's attention: windows of 4 keys with rotary positions on three layers of
/// four, the fourth global without them ("LLLN").
#[test]
fn exaone4_with_windows_and_global_nope_layers_matches_transformers() {
    check("tiny-exaone4-window");
    check_matters("tiny-exaone4-window", |c| c.attention_pattern = Some("LLLL".into()));
}

/// Qwen2: biases on q, k and v (perturbed from transformers' zeros), and a tied head.
#[test]
fn qwen2_matches_transformers() {
    check("tiny-qwen2");
}

/// Qwen3: an RMSNorm on each q and k head (weights perturbed from transformers' ones), heads
/// of 12 where hidden_size / heads is 8, a tied head.
#[test]
fn qwen3_matches_transformers() {
    check("tiny-qwen3");
}

/// EXAONE 3.5: Llama with its own field names (num_layers, layer_norm_epsilon,
/// activation_function) and tensor names (transformer.h.0.attn.attention.q_proj, c_fc_0, ...),
/// Llama 3.1's rotary scaling in transformers 4's rope_scaling, a tied head.
#[test]
fn exaone_matches_transformers() {
    check("tiny-exaone");
}

/// EXAONE 4 (as 1.2B, full attention in every layer): Qwen3's attention, and RMSNorms after
/// the attention and the MLP instead of before.
#[test]
fn exaone4_matches_transformers() {
    check("tiny-exaone4");
}

/// HyperCLOVA X: Llama with RMSNorms after the attention and the MLP as well as before
/// (Peri-LN), and muP's multipliers on the embedding, the blocks' outputs, the attention
/// scores and the logits.
#[test]
fn hyperclovax_matches_transformers() {
    check("tiny-hyperclovax");
}

/// Granite: muP's multipliers, its logits divided by logits_scaling; a tied head.
#[test]
fn granite_matches_transformers() {
    check("tiny-granite");
}

/// A run's `[model]` that leaves out the rotary scaling, the q, k, v biases, the q and k norms,
/// the head width, the sliding window or the layers' attention is another model than the
/// directory's: `init_from` refuses it, naming the key.
#[test]
fn rotary_scaling_biases_norms_and_head_width_are_part_of_the_model() {
    for (name, strip, key) in [
        (
            "tiny-llama3-rope",
            (|c: &mut ModelConfig| c.rope_scaling = None) as fn(&mut ModelConfig),
            "model.rope_scaling",
        ),
        ("tiny-qwen2", |c: &mut ModelConfig| c.qkv_bias = false, "model.qkv_bias"),
        ("tiny-qwen3", |c: &mut ModelConfig| c.qk_norm = false, "model.qk_norm"),
        ("tiny-qwen3", |c: &mut ModelConfig| c.head_dim = None, "model.head_dim"),
        ("tiny-hyperclovax", |c: &mut ModelConfig| c.block_norms = Default::default(), "model.block_norms"),
        ("tiny-granite", |c: &mut ModelConfig| c.mup = Default::default(), "model.mup"),
        ("tiny-mistral-window", |c: &mut ModelConfig| c.sliding_window = None, "model.sliding_window"),
        ("tiny-smollm3", |c: &mut ModelConfig| c.attention_pattern = None, "model.attention_pattern"),
    ] {
        let dir = fixture(name);
        let json = hf::parse_config(&std::fs::read_to_string(dir.join("config.json")).unwrap(), "config.json").unwrap();
        let theirs = hf::from_hf_config(&json, "config.json").unwrap().0;
        let mut ours = theirs.clone();
        strip(&mut ours);
        let e = ondol_ckpt::checkpoint::check_compatible(&dir, &theirs, &ours).unwrap_err().to_string();
        assert!(e.contains(key), "{name}: {e}");
    }
}

/// A run that gives muP's attention multiplier as 1 / sqrt(head_dim), which config.json's
/// reader takes for the default, holds the same model as its checkpoint: it resumes.
#[test]
fn an_attention_multiplier_of_the_usual_scale_is_the_same_model() {
    let dir = fixture("tiny-granite");
    let json = hf::parse_config(&std::fs::read_to_string(dir.join("config.json")).unwrap(), "config.json").unwrap();
    let mut theirs = hf::from_hf_config(&json, "config.json").unwrap().0;
    theirs.mup.attention_multiplier = None;
    let mut ours = theirs.clone();
    ours.mup.attention_multiplier = Some(1.0 / (ours.head_dim() as f64).sqrt());
    ondol_ckpt::checkpoint::check_compatible(&dir, &theirs, &ours).unwrap();
    ours.mup.attention_multiplier = Some(0.25);
    assert!(ondol_ckpt::checkpoint::check_compatible(&dir, &theirs, &ours).is_err());
}

#[test]
fn gpt2_matches_transformers() {
    check("tiny-gpt2");
}

#[test]
fn mamba_matches_transformers() {
    check("tiny-mamba");
}

#[test]
fn mamba2_with_groups_and_chunks_shorter_than_the_sequence_matches_transformers() {
    check("tiny-mamba2");
}

/// Nemotron-H's Mamba-2 mixers, attention and relu² MLPs in one pattern (expected logits from
/// transformers 5.25, which no longer floors the step at time_step_min as 5.23 did).
#[test]
fn nemotron_h_hybrid_matches_transformers() {
    check("tiny-nemotron-h");
}
