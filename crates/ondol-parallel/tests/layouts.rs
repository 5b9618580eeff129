//! Every parallel layout against one rank, same global batch, fp32: ranks are threads joined
//! by deterministic communicators, so layouts differ from one rank only in the order in which
//! partial sums are added. 20 steps; losses and final whole weights within 1e-5 (relative to
//! the largest weight for the weights).

use ondol_comm::{Mesh, RankComms};
use ondol_cpu::CpuBackend;
use ondol_model::{
    Arch, BlockNorms, MicroBatch, Model, ModelConfig, MupConfig, Part, SsmConfig, Workspace, scratch_elems,
};
use ondol_optim::OptimizerConfig;
use ondol_parallel::{Engine, Layout, ScheduleKind};
use std::time::Duration;

const STEPS: usize = 20;
const MICRO: usize = 4;
const BATCH: usize = 4;
const SEQ: usize = 8;

fn llama(tie: bool) -> ModelConfig {
    ModelConfig {
        n_kv_heads: Some(2),
        ffn_hidden: Some(24),
        tie_embeddings: Some(tie),
        init_std: 0.1,
        // (A vocabulary of 67: uneven shards at tp = 2 and 4.)
        ..ModelConfig::new(Arch::Llama, 67, 16, 8, 4, SEQ)
    }
}

fn gpt2() -> ModelConfig {
    ModelConfig { arch: Arch::Gpt2, n_kv_heads: None, n_layers: 4, ..llama(true) }
}

fn hybrid() -> ModelConfig {
    ModelConfig {
        arch: Arch::Hybrid,
        n_layers: 4,
        pattern: Some("M*-M".into()),
        tie_embeddings: Some(false),
        ssm: SsmConfig {
            state_size: Some(4),
            conv_kernel: 3,
            head_dim: 4,
            n_groups: 2,
            chunk_size: 4,
            ..Default::default()
        },
        ..llama(false)
    }
}

/// Mamba-1: 32 channels (expand 2), split by channels, 4 states, dt rank 4.
fn mamba() -> ModelConfig {
    ModelConfig {
        arch: Arch::Mamba,
        n_layers: 4,
        n_heads: 0,
        n_kv_heads: None,
        ffn_hidden: None,
        tie_embeddings: Some(true),
        ssm: SsmConfig {
            state_size: Some(4),
            conv_kernel: 3,
            time_step_rank: Some(4),
            chunk_size: 3,
            ..Default::default()
        },
        ..llama(false)
    }
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    tp: usize,
    pp: usize,
    dp: usize,
    schedule: ScheduleKind,
    chunks: usize,
    zero: bool,
    recompute: usize,
    sequence_parallel: bool,
    /// Floats per data-parallel gradient bucket (None: one sync after the schedule).
    buckets: Option<usize>,
    /// Rows of logits the loss makes at a time (0: all of a micro-batch's).
    loss_chunk: usize,
    /// Steps to train, and AdamW's epsilon.
    steps: usize,
    eps: f32,
    /// Documents start at this token and attend only within their own (see
    /// [`documents_in`]).
    document_mask: Option<u32>,
}

fn shape(tp: usize, pp: usize, dp: usize) -> Shape {
    Shape {
        tp,
        pp,
        dp,
        schedule: ScheduleKind::OneFOneB,
        chunks: 1,
        zero: false,
        recompute: 0,
        sequence_parallel: false,
        buckets: None,
        loss_chunk: 0,
        steps: STEPS,
        eps: 1e-6,
        document_mask: None,
    }
}

fn sequence_parallel(tp: usize, pp: usize, dp: usize) -> Shape {
    Shape { sequence_parallel: true, ..shape(tp, pp, dp) }
}

/// Step `step`'s global batch: `MICRO` micro-batches of `BATCH` sequences with signal.
fn global_batch(step: usize, vocab: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    ondol_core::testdata::markov_batches(1000 + step as u64, MICRO, BATCH, SEQ, vocab)
}

/// Packs documents into the batch's sequences: an end-of-text token `eot` starts each, at
/// every 7 tokens' 4th and 5th (documents of 1 and 6 tokens, at varied offsets in the
/// sequences of 8).
fn documents_in(batch: &mut [(Vec<u32>, Vec<u32>)], eot: u32) {
    for (inputs, _) in batch {
        for (i, id) in inputs.iter_mut().enumerate() {
            if i % 7 == 3 || i % 7 == 4 {
                *id = eot;
            }
        }
    }
}

/// Replica `d` of `dp`'s share of a micro-batch: its rows.
fn share(batch: &[(Vec<u32>, Vec<u32>)], d: usize, dp: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    let n = BATCH / dp * SEQ;
    batch.iter().map(|(i, t)| (i[d * n..(d + 1) * n].to_vec(), t[d * n..(d + 1) * n].to_vec())).collect()
}

/// The engine layout of shape `s`.
fn layout_of(s: Shape) -> Layout {
    Layout {
        mesh: Mesh::new(s.tp, s.pp, s.dp).unwrap(),
        schedule: s.schedule,
        chunks: s.chunks,
        stage_layers: Vec::new(),
        micro: MICRO,
        batch: BATCH / s.dp,
        seq: SEQ,
        recompute: s.recompute,
        loss_chunk: s.loss_chunk,
        zero: s.zero,
        sequence_parallel: s.sequence_parallel,
        grad_buckets: s.buckets,
        document_mask: s.document_mask,
    }
}

/// Trains `s.steps` steps; returns the losses and the final whole weights (from world rank 0),
/// after checking that every rank saw the same loss.
fn train(cfg: &ModelConfig, s: Shape) -> (Vec<f64>, Vec<f32>) {
    let layout = layout_of(s);
    let mesh = layout.mesh;
    // eps 1e-6, not 1e-8: gradients that are zero in exact arithmetic (GPT-2's key bias, which
    // softmax cancels) are round-off, and a tiny eps lets AdamW turn round-off into full steps
    // that differ with the summation order.
    let opt = OptimizerConfig { lr: 3e-3, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, eps: s.eps, grad_clip: 1.0 };
    let comms = RankComms::threads(mesh, Duration::from_secs(60)).unwrap();
    let scale = 1.0 / (MICRO * BATCH * SEQ) as f32;
    let results: Vec<(Vec<f64>, Option<Vec<f32>>)> = std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let (cfg, layout, opt) = (cfg.clone(), layout.clone(), opt.clone());
                scope.spawn(move || {
                    let d = c.coords.dp;
                    let mut e = Engine::new(CpuBackend, cfg.clone(), layout, opt, c.boxed(), 7).unwrap();
                    let losses: Vec<f64> = (0..s.steps)
                        .map(|step| {
                            let mut batch = global_batch(step, cfg.vocab_size);
                            if let Some(eot) = s.document_mask {
                                documents_in(&mut batch, eot);
                            }
                            let batch = share(&batch, d, s.dp);
                            e.step(&batch, scale, 3e-3, || 0).unwrap().loss_sum * scale as f64
                        })
                        .collect();
                    (losses, e.whole_state().unwrap().map(|[p, _, _]| p))
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (rank, (losses, _)) in results.iter().enumerate() {
        assert_eq!(losses, &results[0].0, "rank {rank} reports other losses");
    }
    let mut results = results.into_iter();
    let (losses, weights) = results.next().unwrap();
    (losses, weights.expect("world rank 0 gathers the whole weights"))
}

fn assert_close(name: &str, (la, wa): &(Vec<f64>, Vec<f32>), (lb, wb): &(Vec<f64>, Vec<f32>)) {
    for (step, (a, b)) in la.iter().zip(lb).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{name}: step {step} loss {b} vs one rank {a}");
    }
    let scale = wa.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    let worst = ondol_core::gradcheck::max_abs_diff(wa, wb);
    assert!(worst <= 1e-5 * scale, "{name}: weights differ by {worst} (largest weight {scale})");
    assert!(la[la.len() - 1] < la[0], "{name}: the loss did not fall");
}

#[test]
fn every_layout_trains_like_one_rank() {
    let cfg = llama(false);
    let one = train(&cfg, shape(1, 1, 1));
    let interleaved = Shape { schedule: ScheduleKind::Interleaved, chunks: 2, ..shape(1, 4, 1) };
    for (name, s) in [
        ("tp 2", shape(2, 1, 1)),
        ("pp 2", shape(1, 2, 1)),
        ("dp 2", shape(1, 1, 2)),
        ("tp 2 pp 2 dp 2", shape(2, 2, 2)),
        ("pp 4 interleaved", interleaved),
        // Four shards of two kv heads: each kv head is shared by two shards.
        ("tp 4 dp 2", shape(4, 1, 2)),
        ("tp 4 dp 2 sequence parallel", sequence_parallel(4, 1, 2)),
        ("tp 2 pp 2 dp 2 sequence parallel", sequence_parallel(2, 2, 2)),
        // The loss in uneven chunks of rows, on one rank, vocab-parallel, and gathered.
        ("loss chunks of 5", Shape { loss_chunk: 5, ..shape(1, 1, 1) }),
        ("tp 2 loss chunks of 7", Shape { loss_chunk: 7, ..shape(2, 1, 1) }),
        ("tp 2 pp 2 dp 2 sequence parallel loss chunks of 5", Shape { loss_chunk: 5, ..sequence_parallel(2, 2, 2) }),
    ] {
        assert_close(name, &one, &train(&cfg, s));
    }
}

/// Qwen2's q, k and v biases split with their heads, a kv head's shared by two shards at tp 4.
#[test]
fn qkv_biases_split_with_their_heads() {
    let cfg = ModelConfig { qkv_bias: true, ..llama(false) };
    let one = train(&cfg, shape(1, 1, 1));
    assert_close("qkv biases tp 2 pp 2", &one, &train(&cfg, shape(2, 2, 1)));
    assert_close("qkv biases tp 4 dp 2", &one, &train(&cfg, shape(4, 1, 2)));
    assert_close("qkv biases tp 4 dp 2 sequence parallel", &one, &train(&cfg, sequence_parallel(4, 1, 2)));
}

/// Qwen3's attention: heads of 6 where d_model / n_heads is 4, and q_norm and k_norm, whole on
/// every shard, with gradients summed over the shards' heads (a kv head's shared at tp 4).
#[test]
fn qk_norms_and_wide_heads_split_with_their_heads() {
    let cfg = ModelConfig { qk_norm: true, head_dim: Some(6), ..llama(false) };
    let one = train(&cfg, shape(1, 1, 1));
    assert_close("qk norms tp 2 pp 2", &one, &train(&cfg, shape(2, 2, 1)));
    assert_close("qk norms tp 4 dp 2", &one, &train(&cfg, shape(4, 1, 2)));
    assert_close("qk norms tp 4 dp 2 sequence parallel", &one, &train(&cfg, sequence_parallel(4, 1, 2)));
}

/// Norms after the mixers (EXAONE 4's, with q and k norms; Peri-LN's, before and after too):
/// each on the mixer's output summed over the shards, its weight's gradient partial under
/// sequence parallelism; recomputed blocks rebuild the post-norms' inputs. This tiny model
/// with norms after its mixers alone amplifies round-off step over step (its mixers' outputs
/// sit below the norms' epsilon at init, and its embedding's gradients near 1e-6): dp 2, which
/// differs from one rank only in the gradients' summation order, is 3e-5 off it after one
/// step with AdamW's epsilon at 1e-6, and past 1e-5 by the fifth with it at 1e-4. So these
/// layouts train 3 steps with 1e-4, where each is within 3.1e-6 of one rank (dp 2: 1.3e-6).
#[test]
fn post_norms_split_as_the_stream_does() {
    for (norms, qk_norm) in [(BlockNorms::Post, true), (BlockNorms::Both, false)] {
        let cfg = ModelConfig { block_norms: norms, qk_norm, ..llama(false) };
        let eps = |s: Shape| Shape { steps: 3, eps: 1e-4, ..s };
        let one = train(&cfg, eps(shape(1, 1, 1)));
        for (name, s) in [
            ("dp 2", shape(1, 1, 2)),
            ("tp 2 pp 2", shape(2, 2, 1)),
            ("tp 4 dp 2", shape(4, 1, 2)),
            ("tp 2 dp 2 sequence parallel", sequence_parallel(2, 1, 2)),
        ] {
            assert_close(&format!("{norms:?} {name}"), &one, &train(&cfg, eps(s)));
        }
        let recompute = Shape { recompute: 1, ..sequence_parallel(2, 2, 1) };
        assert_eq!(train(&cfg, sequence_parallel(2, 2, 1)), train(&cfg, recompute), "{norms:?} recomputing");
    }
}

/// muP's multipliers: the embedding's on the first stage, the logits' on the last stage's head
/// input (a vocabulary-parallel head under tp), the residual one on each block's shard of the
/// stream, the attention's with q's rotation on each shard's heads.
#[test]
fn mup_multipliers_split_as_the_model_does() {
    let mup = MupConfig {
        embedding_multiplier: 2.0,
        residual_multiplier: 0.5,
        logits_multiplier: 0.5,
        attention_multiplier: Some(0.2),
    };
    let cfg = ModelConfig { mup, ..llama(false) };
    let one = train(&cfg, shape(1, 1, 1));
    assert_close("muP tp 2 pp 2", &one, &train(&cfg, shape(2, 2, 1)));
    assert_close("muP tp 2 dp 2 sequence parallel", &one, &train(&cfg, sequence_parallel(2, 1, 2)));
    let recompute = Shape { recompute: 1, ..sequence_parallel(2, 2, 1) };
    assert_eq!(train(&cfg, sequence_parallel(2, 2, 1)), train(&cfg, recompute), "muP recomputing");
}

/// Documents that attend only within their own: every stage and tensor shard of a micro-batch
/// masks its attention as one rank does, from the same first keys, also in recomputation.
#[test]
fn masked_documents_train_alike_in_every_layout() {
    for cfg in [llama(false), gpt2()] {
        let masked = |s: Shape| Shape { document_mask: Some(3), ..s };
        let one = train(&cfg, masked(shape(1, 1, 1)));
        let unmasked = train(&cfg, shape(1, 1, 1));
        assert!(one.0.iter().zip(&unmasked.0).all(|(a, b)| a != b), "{:?}: masking changed no loss", cfg.arch);
        for (name, s) in [
            ("tp 2 pp 2", shape(2, 2, 1)),
            ("tp 2 dp 2 sequence parallel", sequence_parallel(2, 1, 2)),
            ("pp 2 dp 2 recomputing", Shape { recompute: 1, ..shape(1, 2, 2) }),
        ] {
            assert_close(&format!("{:?} masked {name}", cfg.arch), &one, &train(&cfg, masked(s)));
        }
    }
}

/// Sliding windows shorter than the sequence and layers without positions, alone and with
/// masked documents: every shard and stage attends as one rank does.
#[test]
fn windows_and_nope_layers_train_alike_in_every_layout() {
    let cfg = ModelConfig { sliding_window: Some(3), attention_pattern: Some("LLGN".into()), ..llama(false) };
    for documents in [None, Some(3)] {
        let s = |s: Shape| Shape { document_mask: documents, ..s };
        let one = train(&cfg, s(shape(1, 1, 1)));
        for (name, layout) in
            [("tp 2 pp 2", shape(2, 2, 1)), ("tp 2 dp 2 sequence parallel", sequence_parallel(2, 1, 2))]
        {
            assert_close(&format!("windows {documents:?} {name}"), &one, &train(&cfg, s(layout)));
        }
    }
}

/// Gemma 3 (norms on both sides of the mixers, q and k norms, GeGLU, a scaled embedding, windows
/// with their own rotary theta) splits as Llama does. Like the post-norm models above, this tiny
/// one amplifies round-off step over step: dp 2, which differs from one rank only in the
/// gradients' summation order, has a loss 4.3e-5 off one rank's by step 10 (tp 2 pp 2: 9.5e-6)
/// and weights 1.5e-5 off by step 5. So, as those, these layouts train 3 steps with AdamW's
/// epsilon at 1e-4, where the weights are within 4.8e-6 of one rank's (dp 2: 3.6e-6).
#[test]
fn gemma3_trains_alike_in_every_layout() {
    let cfg = ModelConfig {
        arch: Arch::Gemma3,
        tie_embeddings: None,
        sliding_window: Some(3),
        attention_pattern: Some("LG".into()),
        rope_theta_local: Some(100.0),
        ..llama(false)
    };
    let steps = |s: Shape| Shape { steps: 3, eps: 1e-4, ..s };
    let one = train(&cfg, steps(shape(1, 1, 1)));
    for (name, layout) in [
        ("dp 2", shape(1, 1, 2)),
        ("tp 2 pp 2", shape(2, 2, 1)),
        ("tp 2 dp 2 sequence parallel", sequence_parallel(2, 1, 2)),
    ] {
        assert_close(&format!("gemma3 {name}"), &one, &train(&cfg, steps(layout)));
    }
}

/// A stop asked for on one rank during an evaluation reaches every rank with its loss, as a
/// step's does: tp 2 x dp 2, the request on the last rank only.
#[test]
fn an_evaluation_tells_every_rank_of_a_stop() {
    let (cfg, layout) = (llama(false), layout_of(shape(2, 1, 2)));
    let opt = OptimizerConfig { lr: 3e-3, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-6, grad_clip: 1.0 };
    let comms = RankComms::threads(layout.mesh, Duration::from_secs(60)).unwrap();
    let outcomes: Vec<(f64, u8)> = std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let (cfg, layout, opt) = (cfg.clone(), layout.clone(), opt.clone());
                scope.spawn(move || {
                    let (rank, d) = (c.rank(), c.coords.dp);
                    let mut e = Engine::new(CpuBackend, cfg.clone(), layout, opt, c.boxed(), 7).unwrap();
                    let batch = share(&global_batch(0, cfg.vocab_size), d, 2);
                    let done = e.evaluate(&batch, || if rank == 3 { 15 } else { 0 }).unwrap();
                    (done.loss_sum, done.stop)
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert!(outcomes.iter().all(|o| *o == outcomes[0] && o.1 == 15), "{outcomes:?}");
}

#[test]
fn zero_1_and_activation_checkpointing_change_nothing_but_memory() {
    let cfg = llama(false);
    let plain = train(&cfg, shape(2, 2, 2));
    let zero = train(&cfg, Shape { zero: true, ..shape(2, 2, 2) });
    assert_close("ZeRO-1", &plain, &zero);
    let recompute = train(&cfg, Shape { recompute: 1, ..shape(2, 2, 2) });
    assert_eq!(plain, recompute, "activation checkpointing must be bit-identical");
    let sp = train(&cfg, sequence_parallel(2, 2, 2));
    let sp_recompute = train(&cfg, Shape { recompute: 1, ..sequence_parallel(2, 2, 2) });
    assert_eq!(sp, sp_recompute, "activation checkpointing under sequence parallelism must be bit-identical");
}

/// Gradients accumulate over micro-batches in the same order in every schedule, so the
/// schedules agree bit for bit. The micro-batches in flight share one scratch (the mixers'
/// gradients, the recomputed blocks' activations, the loss's logits), which must carry
/// nothing from one call to the next: recomputing under GPipe (every micro-batch in flight)
/// and interleaved also changes no bit.
#[test]
fn pipeline_schedules_equal_each_other() {
    let cfg = llama(false);
    let one_f_one_b = train(&cfg, shape(1, 2, 1));
    let gpipe = Shape { schedule: ScheduleKind::Gpipe, ..shape(1, 2, 1) };
    let interleaved = Shape { schedule: ScheduleKind::Interleaved, chunks: 2, ..shape(1, 2, 1) };
    assert_eq!(one_f_one_b, train(&cfg, gpipe));
    assert_eq!(one_f_one_b, train(&cfg, interleaved));
    assert_eq!(one_f_one_b, train(&cfg, Shape { recompute: 1, ..gpipe }), "GPipe recomputing");
    assert_eq!(one_f_one_b, train(&cfg, Shape { recompute: 1, ..interleaved }), "interleaved recomputing");
}

/// GPT-2 (tied head kept on the last stage and summed with the first stage's embedding,
/// replicated biases of row-parallel layers), a Mamba-2/attention hybrid split by heads and
/// groups, and Mamba-1 split by channels (x_proj's outputs summed over the shards). Under
/// GPipe, recomputing, every micro-batch is in flight on the vocab-parallel last stage too,
/// all sharing one scratch while each keeps its head input's gradient: the same bits. So
/// too interleaved, one layer per chunk, recomputing layers 0 and 3: the second rank's one
/// scratch serves an attention chunk and a Mamba chunk with the head, whose kind only the
/// later chunk recomputes.
#[test]
fn gpt2_mamba_and_hybrid_layouts_train_like_one_rank() {
    for (name, cfg) in [("gpt2", gpt2()), ("hybrid", hybrid()), ("mamba", mamba())] {
        let one = train(&cfg, shape(1, 1, 1));
        let tp = train(&cfg, shape(2, 2, 1));
        assert_close(&format!("{name} tp 2 pp 2"), &one, &tp);
        let sp = train(&cfg, sequence_parallel(2, 2, 1));
        assert_close(&format!("{name} tp 2 pp 2 sequence parallel"), &one, &sp);
        let gpipe = |s: Shape| train(&cfg, Shape { schedule: ScheduleKind::Gpipe, recompute: 1, ..s });
        assert_eq!(tp, gpipe(shape(2, 2, 1)), "{name} tp 2 pp 2, GPipe recomputing");
        assert_eq!(sp, gpipe(sequence_parallel(2, 2, 1)), "{name} tp 2 pp 2 sequence parallel, GPipe recomputing");
        let interleaved =
            Shape { schedule: ScheduleKind::Interleaved, chunks: 2, recompute: 3, ..sequence_parallel(2, 2, 1) };
        assert_eq!(sp, train(&cfg, interleaved), "{name} tp 2 pp 2 x 2 chunks sequence parallel, recomputing");
    }
}

/// Sequence parallelism keeps 1 / tp of the residual stream and of the norms' activations on
/// each shard, and needs tp to divide the micro-batch's tokens.
#[test]
fn sequence_parallelism_splits_the_activations_between_the_mixers() {
    let cfg = llama(false);
    let part = Part::new(&cfg, 1, 4, 0..cfg.n_layers);
    let plain = Model::part(cfg.clone(), part.clone()).unwrap();
    let split = Model::part(cfg, part.with_sequence_parallel(true)).unwrap();
    let mb = MicroBatch::new(BATCH, SEQ);
    let bytes = |m: &Model| (m.activation_elems(mb) + scratch_elems(&[m], mb)).bytes(4);
    let (with, without) = (bytes(&split), bytes(&plain));
    assert!(with < without, "sequence parallel activations {with} B, not fewer than {without} B");
    assert!(Workspace::new(&CpuBackend, &split, BATCH, SEQ).is_ok());
    let err = Workspace::new(&CpuBackend, &split, 1, SEQ - 1).err().expect("7 tokens cannot be split 4 ways");
    assert!(err.to_string().contains("parallelism.sequence_parallel"), "{err}");
}

/// Gradient buckets summed over dp during backward give the same bits as one sum after it:
/// every element is added in the same order. Small buckets (several per block and per
/// chunk), with tensors that are first summed over tp or pp kept out: GPT-2's tied embedding
/// at pp 2, and kv heads shared by two tp shards; under ZeRO-1, buckets reduced piece by
/// piece into the shards' owners against one reduce-scatter.
#[test]
fn gradient_buckets_during_backward_change_no_bit() {
    let zero = |s: Shape| Shape { zero: true, ..s };
    for (name, cfg, s) in [
        ("llama dp 2", llama(false), shape(1, 1, 2)),
        ("llama dp 4 ZeRO-1", llama(false), zero(shape(1, 1, 4))),
        ("gpt2 pp 2 dp 2 ZeRO-1 (tied head)", gpt2(), zero(shape(1, 2, 2))),
        (
            "llama tp 2 pp 2 dp 2 interleaved",
            llama(false),
            Shape { schedule: ScheduleKind::Interleaved, chunks: 2, ..shape(2, 2, 2) },
        ),
        ("llama tp 4 dp 2 (shared kv heads)", llama(false), shape(4, 1, 2)),
        ("gpt2 pp 2 dp 2 (tied head)", gpt2(), shape(1, 2, 2)),
        ("hybrid dp 2", hybrid(), shape(1, 1, 2)),
    ] {
        let plain = train(&cfg, s);
        for size in [1, 100, 1 << 20] {
            assert_eq!(plain, train(&cfg, Shape { buckets: Some(size), ..s }), "{name}: buckets of {size} floats");
        }
    }
}
