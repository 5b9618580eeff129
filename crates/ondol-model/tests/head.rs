//! The output head's two memory savings change memory, not the model. A head padded to
//! aligned rows (`Part::vocab_align`) starts from the same weights with zero padding, gives
//! the same loss, the same gradient on every real row, and an exactly zero gradient in the
//! padding, so the padding stays zero under AdamW. A loss made in chunks of rows
//! (`Workspace::with_options`) gives the same losses and gradients. Untied (Llama), tied
//! (GPT-2) and a state-space model.

use ondol_core::{Backend, Rng};
use ondol_cpu::CpuBackend;
use ondol_model::{Arch, MicroBatch, Model, ModelConfig, Part, SsmConfig, Workspace};

fn config(arch: Arch) -> ModelConfig {
    let ssm = arch == Arch::Mamba2;
    ModelConfig {
        ffn_hidden: (!ssm).then_some(24),
        init_std: 0.2,
        ssm: if ssm {
            SsmConfig { state_size: Some(4), head_dim: 8, chunk_size: 4, ..Default::default() }
        } else {
            SsmConfig::default()
        },
        ..ModelConfig::new(arch, 37, 16, 2, if ssm { 0 } else { 2 }, 8)
    }
}

/// The summed loss and the gradient of `model` on one micro-batch, its loss made
/// `loss_chunk` rows at a time.
fn loss_and_grads(
    model: &Model,
    params: &Vec<f32>,
    ids: &Vec<u32>,
    targets: &Vec<u32>,
    loss_chunk: usize,
) -> (f64, Vec<f32>) {
    let be = CpuBackend;
    let mut ws = Workspace::with_options(&be, model, MicroBatch { loss_chunk, ..MicroBatch::new(2, 8) }).unwrap();
    let mut grads = be.zeros(params.len());
    model.forward(&be, params, &mut ws, ids);
    let loss = model.loss(&be, params, &mut ws, targets, Some((1.0, &mut grads)));
    model.backward(&be, params, &mut grads, &mut ws, ids);
    (loss, grads)
}

#[test]
fn a_padded_head_trains_like_the_unpadded_one() {
    for arch in [Arch::Llama, Arch::Gpt2, Arch::Mamba2] {
        let cfg = config(arch);
        let plain = Model::new(cfg.clone()).unwrap();
        let padded = Model::part(cfg.clone(), Part::whole(&cfg).with_vocab_align(16)).unwrap();
        assert_eq!(
            padded.num_params() - plain.num_params(),
            (48 - 37) * 16,
            "{arch:?}: one [37, 16] table padded to 48 rows"
        );
        let (p_plain, p_padded) = (plain.layout.init(1), padded.layout.init(1));
        let mut rng = Rng::new(9);
        let ids: Vec<u32> = (0..16).map(|_| rng.below(37) as u32).collect();
        let targets: Vec<u32> = (0..16).map(|_| rng.below(37) as u32).collect();
        let (loss, g_plain) = loss_and_grads(&plain, &p_plain, &ids, &targets, 16);
        let (loss_padded, g_padded) = loss_and_grads(&padded, &p_padded, &ids, &targets, 16);
        assert!((loss - loss_padded).abs() <= 1e-6 * loss, "{arch:?}: loss {loss_padded} padded vs {loss}");

        for info in padded.layout.params() {
            let whole = plain.layout.get(&info.name).unwrap();
            let what = format!("{arch:?} {}", info.name);
            // The real rows, cut back out: the padding must be exactly zero to survive the
            // round trip through the global (checkpoint) tensor.
            let round_trip = |local: &[f32]| {
                let mut global = vec![f32::NAN; whole.len()];
                info.place.insert(local, &mut global);
                (info.place.extract(&global), global)
            };
            let (weights, global) = round_trip(&p_padded[info.range()]);
            assert_eq!(weights, p_padded[info.range()], "{what}: padding of the initial weights");
            assert_eq!(global, p_plain[whole.range()], "{what}: initial weights");
            let (grads, global) = round_trip(&g_padded[info.range()]);
            assert_eq!(grads, g_padded[info.range()], "{what}: the padding's gradient is not zero");
            let worst = ondol_core::gradcheck::max_abs_diff(&global, &g_plain[whole.range()]);
            assert!(worst <= 1e-6, "{what}: gradients differ by {worst:e}");
        }
    }
}

#[test]
fn a_loss_in_chunks_of_rows_equals_the_whole() {
    for arch in [Arch::Llama, Arch::Gpt2, Arch::Mamba2] {
        let cfg = config(arch);
        let model = Model::part(cfg.clone(), Part::whole(&cfg).with_vocab_align(16)).unwrap();
        let params = model.layout.init(1);
        let mut rng = Rng::new(4);
        let ids: Vec<u32> = (0..16).map(|_| rng.below(37) as u32).collect();
        let targets: Vec<u32> = (0..16).map(|_| rng.below(37) as u32).collect();
        let (loss, grads) = loss_and_grads(&model, &params, &ids, &targets, 16);
        let logits = |chunk: usize| {
            let mb = MicroBatch { loss_chunk: chunk, ..MicroBatch::new(2, 8) };
            let mut ws = Workspace::with_options(&CpuBackend, &model, mb).unwrap();
            model.forward(&CpuBackend, &params, &mut ws, &ids);
            model.logits(&CpuBackend, &params, &mut ws)
        };
        let whole = logits(16);
        assert_eq!(whole.len(), 16 * 37, "{arch:?}: logits without the padding");
        let worst = ondol_core::gradcheck::max_abs_diff(&logits(5), &whole);
        assert!(worst <= 1e-5, "{arch:?}: logits in chunks of 5 differ by {worst:e}");
        for chunk in [1, 5, 8] {
            let (chunked, chunked_grads) = loss_and_grads(&model, &params, &ids, &targets, chunk);
            // The same sums, up to the GEMMs' rounding at other shapes.
            assert!(
                (chunked - loss).abs() <= 1e-6 * loss,
                "{arch:?}: loss {chunked} in chunks of {chunk}, {loss} whole"
            );
            let worst = ondol_core::gradcheck::max_abs_diff(&chunked_grads, &grads);
            let scale = grads.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            assert!(worst <= 1e-6 * scale, "{arch:?}: gradients in chunks of {chunk} differ by {worst:e} (of {scale})");
        }
    }
}

/// Shards whose padded heads differ in width (65537 ids over 2 shards: 32769 and 32768 rows,
/// padded to 32832 and 32768) still take the same chunks, as they exchange statistics chunk by
/// chunk: at 16384 rows the narrower one alone would fit 2^29 logits in one.
#[test]
fn every_shard_takes_the_same_chunks() {
    let cfg = ModelConfig { vocab_size: 65537, ..config(Arch::Llama) };
    let shard = |r| Model::part(cfg.clone(), Part::new(&cfg, r, 2, 0..2).with_vocab_align(64)).unwrap();
    let (first, second) = (shard(0), shard(1));
    assert_eq!(first.loss_chunk(16384, 0), 8192);
    for rows in [100, 4096, 16384, 65536, 100_000] {
        assert_eq!(first.loss_chunk(rows, 0), second.loss_chunk(rows, 0), "{rows} rows");
    }
}
