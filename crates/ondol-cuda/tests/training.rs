//! Whole models on the CUDA backend against the CPU: forward, loss and every parameter's
//! gradient in f32, then AdamW steps in f32 and in bf16 mixed precision (fp32 master weights
//! and moments, bf16 compute copy), for Llama, GPT-2, Mamba-1, Mamba-2 and a hybrid. This is
//! what the trainer runs per step, through the same backend contract, on the SIMT emulator
//! always and on a GPU where there is one. Then incremental decoding (a prompt, then one
//! token at a time through the inference cache: attention's cached kernel, the recurrent
//! convolution and scans) against the CPU's logits. And the device memory a workspace takes
//! against the estimate that `ondol inspect` and the trainer report.

use ondol_core::{Backend, Rng};
use ondol_cpu::CpuBackend;
use ondol_cuda::{CudaBackend, Dtype};
use ondol_model::{
    Arch, BlockNorms, InferenceCache, MicroBatch, Model, ModelConfig, MupConfig, Part, RopeScaling, RopeScalingKind,
    Scratch, SsmConfig, Workspace, scratch_elems,
};
use ondol_optim::{AdamW, OptimizerConfig};

const CPU: CpuBackend = CpuBackend;
const BATCH: usize = 2;
const SEQ: usize = 13;

/// A small model of `arch`; the state-space ones save their state every 5 tokens, so chunks
/// do not divide the sequence, and the hybrid is Mamba-2, attention, MLP and Mamba-2 again.
/// Mamba-2 has heads of 32 channels and 32 states, whose bf16 SSD runs on tensor cores. The
/// Llama has Qwen2's q, k and v biases and Llama 3.1's rotary scaling (one of its four
/// frequencies blended, three divided); the hybrid's attention heads are wider than d_model /
/// n_heads (12, not 8).
fn config(arch: Arch) -> ModelConfig {
    let pattern = (arch == Arch::Hybrid).then(|| "M*-M".to_string());
    let layers = pattern.as_ref().map_or(2, |p| p.len());
    ModelConfig {
        pattern,
        n_kv_heads: matches!(arch, Arch::Llama | Arch::Hybrid).then_some(2),
        ffn_hidden: (!matches!(arch, Arch::Mamba | Arch::Mamba2)).then_some(48),
        tie_embeddings: Some(arch == Arch::Gpt2),
        rope_scaling: (arch == Arch::Llama).then_some(RopeScaling {
            kind: RopeScalingKind::Llama3,
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_seq_len: 8,
        }),
        qkv_bias: arch == Arch::Llama,
        head_dim: (arch == Arch::Hybrid).then_some(12),
        init_std: 0.1,
        ssm: if matches!(arch, Arch::Llama | Arch::Gpt2) {
            SsmConfig::default()
        } else {
            let wide = arch == Arch::Mamba2;
            let (state, head_dim) = if wide { (32, 32) } else { (8, 8) };
            let ssm = SsmConfig { state_size: Some(state), chunk_size: 5, ..Default::default() };
            // Heads and groups are Mamba-2's (the hybrid's too).
            if arch == Arch::Mamba { ssm } else { SsmConfig { head_dim, n_groups: 2, ..ssm } }
        },
        ..ModelConfig::new(arch, 67, 32, layers, if matches!(arch, Arch::Mamba | Arch::Mamba2) { 0 } else { 4 }, 16)
    }
}

/// Every architecture, and beside the Llama with Qwen2's attention: one with Qwen3's (heads of
/// 12 where d_model / n_heads is 8, each q and k head RMS-normed), one with EXAONE 4's blocks
/// (Qwen3's attention, norms after the mixers alone) and one with Peri-LN's (norms before and
/// after) and muP's multipliers (HyperCLOVA X's), and one with EXAONE 4 32B's attention
/// (sliding windows of 5 keys, and a global layer without positions); and Gemma 3 (GeGLU,
/// norms on both sides, q and k norms, windows of 5 keys with their own rotary theta).
fn models() -> Vec<(&'static str, ModelConfig)> {
    let qwen3 = ModelConfig { qkv_bias: false, qk_norm: true, head_dim: Some(12), ..config(Arch::Llama) };
    let exaone4 = ModelConfig { block_norms: BlockNorms::Post, ..qwen3.clone() };
    let windows = ModelConfig { sliding_window: Some(5), attention_pattern: Some("LN".into()), ..exaone4.clone() };
    let mup = MupConfig {
        embedding_multiplier: 2.0,
        residual_multiplier: 0.5,
        logits_multiplier: 0.5,
        attention_multiplier: Some(0.2),
    };
    let peri_ln = ModelConfig { qkv_bias: false, block_norms: BlockNorms::Both, mup, ..config(Arch::Llama) };
    let gemma3 = ModelConfig {
        arch: Arch::Gemma3,
        qkv_bias: false,
        rope_scaling: None,
        head_dim: Some(12),
        sliding_window: Some(5),
        attention_pattern: Some("LG".into()),
        rope_theta_local: Some(100.0),
        ..config(Arch::Llama)
    };
    let archs = [("gpt2", Arch::Gpt2), ("mamba", Arch::Mamba), ("mamba2", Arch::Mamba2), ("hybrid", Arch::Hybrid)];
    let mut out = vec![
        ("llama", config(Arch::Llama)),
        ("qwen3", qwen3),
        ("exaone4", exaone4),
        ("exaone4-windows", windows),
        ("peri-ln", peri_ln),
        ("gemma3", gemma3),
    ];
    out.extend(archs.map(|(name, arch)| (name, config(arch))));
    out
}

/// The CUDA backends computing in `dtype`: the emulator, and GPU 0 if there is one. Under
/// ONDOL_REQUIRE_GPU (the GPU bundle) the GPU alone: CI has run the emulator, and device time
/// is scarce.
fn backends(dtype: Dtype) -> Vec<CudaBackend> {
    let gpu_only = std::env::var_os("ONDOL_REQUIRE_GPU").is_some();
    let mut out = if gpu_only { Vec::new() } else { vec![CudaBackend::emulated(dtype, false)] };
    match CudaBackend::open(0, dtype) {
        Ok(be) => out.push(be),
        Err(e) if gpu_only => panic!("ONDOL_REQUIRE_GPU is set: {e}"),
        Err(e) => eprintln!("GPU skipped: {e}"),
    }
    out
}

fn tokens(seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..BATCH * SEQ).map(|_| rng.below(67) as u32).collect()
}

/// The mean loss of `steps` AdamW updates (the loss before each), and after one forward and
/// backward the whole gradient, on `be`.
fn train<B: Backend>(be: &B, model: &Model, steps: usize) -> (Vec<f64>, Vec<f32>) {
    let (inputs, targets) = (tokens(1), tokens(2));
    let (ids, tgt) = (be.upload_ids(&inputs), be.upload_ids(&targets));
    let init = model.layout.init(7);
    let mut params = be.upload(&init);
    let mut grads = be.zeros_f32(init.len());
    let cfg = OptimizerConfig { lr: 3e-3, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8, grad_clip: 1.0 };
    let mut opt = AdamW::new(be, cfg, &init, model.layout.decay_runs());
    // The loss in uneven chunks of rows, as a long micro-batch would take it.
    let mut ws =
        Workspace::with_options(be, model, MicroBatch { loss_chunk: 7, ..MicroBatch::new(BATCH, SEQ) }).unwrap();
    let scale = 1.0 / (BATCH * SEQ) as f32;
    let (mut losses, mut first_grads) = (Vec::new(), Vec::new());
    for step in 0..steps {
        be.fill(be.all_mut(&mut grads), 0.0);
        model.forward(be, &params, &mut ws, &ids);
        losses.push(model.loss(be, &params, &mut ws, &tgt, Some((scale, &mut grads))) * scale as f64);
        model.backward(be, &params, &mut grads, &mut ws, &ids);
        if step == 0 {
            first_grads = be.download(&grads);
        }
        let clip = opt.clip_factor(AdamW::<B>::grad_norm(be, &grads));
        opt.update(be, &mut params, &grads, 3e-3, clip);
    }
    (losses, first_grads)
}

fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    ondol_core::gradcheck::max_abs_diff(got, want) / scale
}

#[test]
fn every_architecture_trains_on_the_cuda_backend_as_on_the_cpu() {
    for (arch, cfg) in models() {
        let model = Model::new(cfg).unwrap();
        let (want, want_grads) = train(&CPU, &model, 6);
        for be in backends(Dtype::F32) {
            let (got, grads) = train(&be, &model, 6);
            // Per tensor, so a wrong gradient is named.
            for info in model.layout.params() {
                let err = relative_error(&grads[info.range()], &want_grads[info.range()]);
                assert!(err < 1e-4, "{arch} on {}: gradient of {} off by {err:e}", be.device_name(), info.name);
            }
            for (step, (a, b)) in want.iter().zip(&got).enumerate() {
                assert!((a - b).abs() <= 1e-5 * a, "{arch} f32 on {} step {step}: {b} vs {a}", be.device_name());
            }
            eprintln!("{arch} f32 on {}: losses {got:.5?}", be.device_name());
        }
        for be in backends(Dtype::Bf16) {
            let (got, _) = train(&be, &model, 6);
            for (step, (a, b)) in want.iter().zip(&got).enumerate() {
                assert!((a - b).abs() <= 2e-2 * a, "{arch} bf16 on {} step {step}: {b} vs {a}", be.device_name());
            }
            eprintln!("{arch} bf16 on {}: losses {got:.5?} (cpu {want:.5?})", be.device_name());
        }
    }
}

/// The logits of a 5-token prompt and then 8 single tokens, each sequence of the batch, as
/// incremental decoding computes them on `be`.
fn decode<B: Backend>(be: &B, model: &Model) -> Vec<f32> {
    let (prompt, ids) = (5, tokens(3));
    let params = be.upload(&model.layout.init(7));
    let mut cache = InferenceCache::new(be, model, BATCH, SEQ);
    let mut ws = Workspace::new(be, model, BATCH, prompt).unwrap();
    let head: Vec<u32> = ids.chunks(SEQ).flat_map(|seq| seq[..prompt].to_vec()).collect();
    model.forward_cached(be, &params, &mut ws, &be.upload_ids(&head), &mut cache);
    let mut logits = model.logits(be, &params, &mut ws);
    let mut step = Workspace::new(be, model, BATCH, 1).unwrap();
    for t in prompt..SEQ {
        let next: Vec<u32> = ids.chunks(SEQ).map(|seq| seq[t]).collect();
        model.forward_cached(be, &params, &mut step, &be.upload_ids(&next), &mut cache);
        logits.extend(model.logits(be, &params, &mut step));
    }
    logits
}

#[test]
fn every_architecture_decodes_on_the_cuda_backend_as_on_the_cpu() {
    for (arch, cfg) in models() {
        let model = Model::new(cfg).unwrap();
        let want = decode(&CPU, &model);
        for (dtype, tol) in [(Dtype::F32, 1e-5), (Dtype::Bf16, 3e-2)] {
            for be in backends(dtype) {
                let err = relative_error(&decode(&be, &model), &want);
                eprintln!("{arch} {dtype:?} decoding on {}: logits off by {err:.2e}", be.device_name());
                assert!(err < tol, "{arch} {dtype:?} decoding on {}: logits off by {err:e}", be.device_name());
            }
        }
    }
}

/// A workspace allocates on the device what `Model::activation_elems` and `scratch_elems`
/// count, to the byte, in f32 and in bf16: the estimate `ondol inspect` and the engine's
/// memory report give. Whole models, recomputing blocks and making logits in chunks; pipeline
/// stages; a tensor-parallel shard with sequence parallelism and a padded head. (The
/// emulator counts its buffers exactly; a GPU's pool rounds.)
#[test]
fn workspaces_allocate_what_the_memory_estimate_counts() {
    let shapes = [
        MicroBatch::new(BATCH, SEQ),
        MicroBatch { recompute_every: 1, ..MicroBatch::new(BATCH, SEQ) },
        MicroBatch { recompute_every: 2, loss_chunk: 5, ..MicroBatch::new(BATCH, SEQ) },
    ];
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let be = CudaBackend::emulated(dtype, false);
        let allocated = || be.allocated_bytes().expect("the emulator counts its buffers");
        for (arch, cfg) in models() {
            let n = cfg.n_layers;
            let parts = [
                ("whole", Part::whole(&cfg)),
                ("first stage", Part::new(&cfg, 0, 1, 0..1)),
                ("last stage, tp 2 shard", Part::new(&cfg, 1, 2, 1..n)),
                (
                    "tp 2 sequence parallel",
                    Part::new(&cfg, 0, 2, 0..n).with_sequence_parallel(true).with_vocab_align(64),
                ),
            ];
            for (name, part) in parts {
                let model = Model::part(cfg.clone(), part).unwrap();
                for mb in shapes {
                    let what = format!("{arch} {name}, {mb:?}, {dtype:?}");
                    let before = allocated();
                    let mut ws = Workspace::without_scratch(&be, &model, mb).unwrap();
                    let held = allocated() - before;
                    assert_eq!(held, model.activation_elems(mb).bytes(dtype.bytes()), "{what}: a micro-batch's own");
                    ws.give_scratch(Scratch::new(&be, &[&model], mb));
                    let scratch = allocated() - before - held;
                    assert_eq!(scratch, scratch_elems(&[&model], mb).bytes(dtype.bytes()), "{what}: the scratch");
                    drop(ws);
                    assert_eq!(allocated(), before, "{what}: freed");
                }
            }
        }
    }
}
