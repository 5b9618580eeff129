//! The parallel engine on the CUDA backend, ranks as threads, each with its own emulated
//! device. The thread communicators take the emulator's memory as device memory, so the
//! engine runs the path it runs with NCCL on GPUs: tensor-parallel collectives on the
//! backend's buffers (bf16 ones under mixed precision), data-parallel gradient buckets
//! queued on the device during backward, and ZeRO-1's shards reduce-scattered and gathered
//! in place. Every layout against one rank on the same backend,
//! as tests/layouts.rs of ondol-parallel does on the CPU.

use ondol_comm::{Mesh, RankComms};
use ondol_cuda::{CudaBackend, Dtype};
use ondol_model::{Arch, ModelConfig, SsmConfig};
use ondol_optim::OptimizerConfig;
use ondol_parallel::{Engine, Layout, ScheduleKind};
use std::time::Duration;

const STEPS: usize = 4;
const MICRO: usize = 2;
const BATCH: usize = 4;
const SEQ: usize = 8;

/// Four layers, so that pp 2 has two per stage; two kv heads shared by four query heads.
fn llama() -> ModelConfig {
    ModelConfig {
        n_kv_heads: Some(2),
        ffn_hidden: Some(24),
        tie_embeddings: Some(false),
        init_std: 0.1,
        ..ModelConfig::new(Arch::Llama, 67, 16, 4, 4, SEQ)
    }
}

/// Mamba-1 split by channels: 32 channels, 4 states, dt rank 4, state saved every 3 tokens.
fn mamba() -> ModelConfig {
    ModelConfig {
        arch: Arch::Mamba,
        n_heads: 0,
        n_kv_heads: None,
        ffn_hidden: None,
        ssm: SsmConfig {
            state_size: Some(4),
            conv_kernel: 3,
            time_step_rank: Some(4),
            chunk_size: 3,
            ..Default::default()
        },
        ..llama()
    }
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    tp: usize,
    pp: usize,
    dp: usize,
    sequence_parallel: bool,
    buckets: Option<usize>,
    zero: bool,
    /// Rows of logits the loss makes at a time (0: all of a micro-batch's).
    loss_chunk: usize,
}

fn shape(tp: usize, pp: usize, dp: usize) -> Shape {
    Shape { tp, pp, dp, sequence_parallel: false, buckets: None, zero: false, loss_chunk: 0 }
}

/// Step `step`'s global batch: `MICRO` micro-batches of `BATCH` sequences with signal.
fn global_batch(step: usize, vocab: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    ondol_core::testdata::markov_batches(1000 + step as u64, MICRO, BATCH, SEQ, vocab)
}

/// The losses of `STEPS` steps and the final whole weights, on emulated devices computing in
/// `dtype`; checks that every rank saw the same losses and summed its buckets on the device.
fn train(cfg: &ModelConfig, dtype: Dtype, s: Shape) -> (Vec<f64>, Vec<f32>) {
    let mesh = Mesh::new(s.tp, s.pp, s.dp).unwrap();
    let layout = Layout {
        mesh,
        schedule: ScheduleKind::OneFOneB,
        chunks: 1,
        stage_layers: Vec::new(),
        micro: MICRO,
        batch: BATCH / s.dp,
        seq: SEQ,
        recompute: 0,
        loss_chunk: s.loss_chunk,
        zero: s.zero,
        sequence_parallel: s.sequence_parallel,
        grad_buckets: s.buckets,
        document_mask: None,
    };
    let opt = OptimizerConfig { lr: 3e-3, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-6, grad_clip: 1.0 };
    let scale = 1.0 / (MICRO * BATCH * SEQ) as f32;
    let comms = RankComms::threads(mesh, Duration::from_secs(120)).unwrap();
    let results: Vec<(Vec<f64>, Option<Vec<f32>>)> = std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let (cfg, layout, opt) = ((*cfg).clone(), layout.clone(), opt.clone());
                scope.spawn(move || {
                    let d = c.coords.dp;
                    let be = CudaBackend::emulated(dtype, false);
                    let mut e = Engine::new(be, cfg.clone(), layout, opt, c.boxed(), 7).unwrap();
                    let expected = (s.buckets.is_some() && s.dp > 1).then_some("the device");
                    assert_eq!(e.bucket_path(), expected, "{s:?}");
                    let n = BATCH / s.dp * SEQ;
                    let losses = (0..STEPS)
                        .map(|step| {
                            let mine: Vec<_> = global_batch(step, cfg.vocab_size)
                                .into_iter()
                                .map(|(i, t)| (i[d * n..(d + 1) * n].to_vec(), t[d * n..(d + 1) * n].to_vec()))
                                .collect();
                            e.step(&mine, scale, 3e-3, || 0).unwrap().loss_sum * scale as f64
                        })
                        .collect();
                    (losses, e.whole_state().unwrap().map(|[p, _, _]| p))
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (rank, (losses, _)) in results.iter().enumerate() {
        assert_eq!(losses, &results[0].0, "{s:?}: rank {rank} reports other losses");
    }
    let (losses, weights) = results.into_iter().next().unwrap();
    (losses, weights.expect("world rank 0 gathers the whole weights"))
}

/// Losses within `tol` relative, weights within `tol` of the largest weight.
fn assert_close(name: &str, tol: f64, (la, wa): &(Vec<f64>, Vec<f32>), (lb, wb): &(Vec<f64>, Vec<f32>)) {
    for (step, (a, b)) in la.iter().zip(lb).enumerate() {
        assert!((a - b).abs() <= tol * a.abs(), "{name}: step {step} loss {b} vs one rank {a}");
    }
    let scale = wa.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    let worst = ondol_core::gradcheck::max_abs_diff(wa, wb);
    assert!(worst as f64 <= tol * scale as f64, "{name}: weights differ by {worst} (largest weight {scale})");
    assert!(la[STEPS - 1] < la[0], "{name}: the loss did not fall");
}

#[test]
fn layouts_on_the_device_path_train_like_one_rank() {
    let one = train(&llama(), Dtype::F32, shape(1, 1, 1));
    for (name, s) in [
        ("tp 2", shape(2, 1, 1)),
        ("tp 2, loss chunks of 7 rows", Shape { loss_chunk: 7, ..shape(2, 1, 1) }),
        ("pp 2 dp 2, buckets", Shape { buckets: Some(100), ..shape(1, 2, 2) }),
        (
            "tp 2 pp 2 dp 2 sequence parallel, buckets",
            Shape { sequence_parallel: true, buckets: Some(1 << 20), ..shape(2, 2, 2) },
        ),
        // ZeRO-1's shards reduce-scattered and all-gathered in place on the device.
        ("tp 2 dp 2 ZeRO-1", Shape { zero: true, ..shape(2, 1, 2) }),
    ] {
        assert_close(name, 1e-5, &one, &train(&llama(), Dtype::F32, s));
    }
}

/// A tied head on the last stage: its gradient and the first stage's embedding gradient
/// are summed on the device, in pieces of a bucket's size (100 floats: many pieces).
#[test]
fn a_tied_embedding_split_over_stages_trains_like_one_rank() {
    let tied = ModelConfig { tie_embeddings: Some(true), ..llama() };
    let one = train(&tied, Dtype::F32, shape(1, 1, 1));
    let split = train(&tied, Dtype::F32, Shape { buckets: Some(100), ..shape(1, 2, 1) });
    assert_close("tied, pp 2, buckets", 1e-5, &one, &split);
}

/// Buckets queued on the device during backward give the bits of one sum after it: in small
/// buckets, with kv heads shared by two tp shards kept out of them, and under ZeRO-1 (each
/// piece reduced into its owner's shard, as the reduce-scatter does).
#[test]
fn device_buckets_change_no_bit() {
    let zero = |s: Shape| Shape { zero: true, ..s };
    for (s, sizes) in [
        (shape(1, 1, 2), &[1, 100][..]),
        (shape(4, 1, 2), &[100]),
        (zero(shape(1, 1, 2)), &[100, 1 << 20]),
        (zero(shape(2, 1, 2)), &[100]),
    ] {
        let plain = train(&llama(), Dtype::F32, s);
        for &size in sizes {
            assert_eq!(
                plain,
                train(&llama(), Dtype::F32, Shape { buckets: Some(size), ..s }),
                "{s:?}, buckets of {size} floats"
            );
        }
    }
}

/// Mixed precision: the tensor-parallel activations travel as bf16, so partial sums round
/// once more than on one rank; the curve stays within 1 %.
#[test]
fn bf16_layouts_track_one_rank() {
    let one = train(&llama(), Dtype::Bf16, shape(1, 1, 1));
    let split = train(&llama(), Dtype::Bf16, Shape { buckets: Some(100), ..shape(2, 1, 2) });
    assert_close("bf16 tp 2 dp 2, buckets", 1e-2, &one, &split);
    let zero = train(&llama(), Dtype::Bf16, Shape { zero: true, ..shape(1, 1, 2) });
    assert_close("bf16 dp 2 ZeRO-1", 1e-2, &one, &zero);
}

/// Mamba-1 split by channels over two shards: x_proj's outputs and their gradients summed on
/// the device between the selective scan's kernels.
#[test]
fn tensor_parallel_mamba_on_the_device_path_trains_like_one_rank() {
    let one = train(&mamba(), Dtype::F32, shape(1, 1, 1));
    assert_close("mamba tp 2", 1e-5, &one, &train(&mamba(), Dtype::F32, shape(2, 1, 1)));
}
