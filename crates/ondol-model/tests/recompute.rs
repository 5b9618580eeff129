//! Activation checkpointing changes memory, not results: the loss and every gradient are
//! bit-identical whether blocks keep their activations or recompute them in backward.

use ondol_core::{Backend, Rng};
use ondol_cpu::CpuBackend;
use ondol_model::{Arch, MicroBatch, Model, ModelConfig, SsmConfig, Workspace, scratch_elems};

fn run(model: &Model, recompute_every: usize) -> (u64, Vec<u32>) {
    let be = CpuBackend;
    let (batch, seq) = (2, 11);
    let mut rng = Rng::new(5);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(31) as u32).collect();
    let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(31) as u32).collect();
    let params = model.layout.init(2);
    let mut ws =
        Workspace::with_options(&be, model, MicroBatch { recompute_every, ..MicroBatch::new(batch, seq) }).unwrap();
    let mut grads = be.zeros(params.len());
    model.forward(&be, &params, &mut ws, &ids);
    let loss = model.loss(&be, &params, &mut ws, &targets, Some((0.1, &mut grads)));
    model.backward(&be, &params, &mut grads, &mut ws, &ids);
    (loss.to_bits(), grads.iter().map(|g| g.to_bits()).collect())
}

#[test]
fn recomputed_blocks_give_identical_losses_and_gradients() {
    for arch in [Arch::Llama, Arch::Gpt2, Arch::Mamba, Arch::Mamba2, Arch::Hybrid] {
        let ssm_only = matches!(arch, Arch::Mamba | Arch::Mamba2);
        let model = Model::new(ModelConfig {
            n_kv_heads: if matches!(arch, Arch::Llama | Arch::Hybrid) { Some(2) } else { None },
            ffn_hidden: (!ssm_only).then_some(24),
            init_std: 0.2,
            pattern: (arch == Arch::Hybrid).then(|| "M*-M".to_string()),
            ssm: if arch == Arch::Llama || arch == Arch::Gpt2 {
                SsmConfig::default()
            } else {
                let ssm = SsmConfig { state_size: Some(4), chunk_size: 4, ..Default::default() };
                if arch == Arch::Mamba { ssm } else { SsmConfig { head_dim: 8, ..ssm } }
            },
            ..ModelConfig::new(arch, 31, 16, 4, if ssm_only { 0 } else { 4 }, 16)
        })
        .unwrap();
        let (loss, grads) = run(&model, 0);
        assert!(grads.iter().any(|g| *g != 0));
        for every in [1, 2, 3] {
            let (l, g) = run(&model, every);
            assert_eq!(l, loss, "{arch:?}: loss changed with recompute every {every}");
            assert!(g == grads, "{arch:?}: gradients changed with recompute every {every}");
        }
        // Recomputed blocks run in the scratch, which every micro-batch in flight shares.
        let mb = |k| MicroBatch { recompute_every: k, ..MicroBatch::new(2, 11) };
        let (every, none) = (model.activation_elems(mb(1)).bytes(4), model.activation_elems(mb(0)).bytes(4));
        let scratch = |k| scratch_elems(&[&model], mb(k)).bytes(4);
        assert!(every < none && scratch(1) > scratch(0), "{every} + {} vs {none} + {}", scratch(1), scratch(0));
        assert!(every + scratch(1) < none + scratch(0));
    }
}
