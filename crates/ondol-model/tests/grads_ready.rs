//! Backward tells its tensor-parallel hook when each block's, the head's and the embeddings'
//! gradients are final: the ranges come in descending order, never overlap, cover every
//! parameter of the part once, and no parameter's gradient changes after its range was
//! reported (what lets data parallelism reduce them while backward goes on).

use ondol_core::{Backend, Result, Rng};
use ondol_cpu::CpuBackend;
use ondol_model::{Arch, Model, ModelConfig, Part, SsmConfig, TensorParallel, Workspace};
use std::ops::Range;

/// The whole-model hook, recording each reported range and the gradients it held then.
#[derive(Default)]
struct Recorder(Vec<(Range<usize>, Vec<f32>)>);

impl TensorParallel<CpuBackend> for Recorder {
    fn all_reduce(&mut self, _: &CpuBackend, _: &mut Vec<f32>) -> Result<()> {
        Ok(())
    }
    fn all_gather(&mut self, part: &[f32]) -> Result<Vec<f32>> {
        Ok(part.to_vec())
    }
    fn all_gather_rows(&mut self, _: &CpuBackend, part: &Vec<f32>, whole: &mut Vec<f32>) -> Result<()> {
        whole.copy_from_slice(part);
        Ok(())
    }
    fn reduce_scatter_rows(&mut self, _: &CpuBackend, whole: &Vec<f32>, part: &mut Vec<f32>) -> Result<()> {
        part.copy_from_slice(whole);
        Ok(())
    }
    fn grads_ready(&mut self, _: &CpuBackend, grads: &Vec<f32>, range: Range<usize>) -> Result<()> {
        self.0.push((range.clone(), grads[range].to_vec()));
        Ok(())
    }
}

fn config(arch: Arch, tie: bool) -> ModelConfig {
    let ssm_only = matches!(arch, Arch::Mamba | Arch::Mamba2);
    ModelConfig {
        n_kv_heads: matches!(arch, Arch::Llama | Arch::Hybrid).then_some(2),
        ffn_hidden: (!ssm_only).then_some(24),
        tie_embeddings: Some(tie),
        init_std: 0.2,
        pattern: (arch == Arch::Hybrid).then(|| "M*-M".to_string()),
        ssm: if ssm_only || arch == Arch::Hybrid {
            let ssm = SsmConfig { state_size: Some(4), chunk_size: 4, ..Default::default() };
            if arch == Arch::Mamba { ssm } else { SsmConfig { head_dim: 4, ..ssm } }
        } else {
            SsmConfig::default()
        },
        ..ModelConfig::new(arch, 31, 16, if arch == Arch::Hybrid { 4 } else { 3 }, if ssm_only { 0 } else { 4 }, 16)
    }
}

#[test]
fn finished_gradients_are_reported_once_each_in_descending_order() {
    let be = CpuBackend;
    let cases = [
        (Arch::Llama, false, None),
        (Arch::Llama, true, None),
        (Arch::Gpt2, true, None),
        (Arch::Mamba, false, None),
        (Arch::Mamba2, false, None),
        (Arch::Hybrid, false, None),
        // A middle pipeline stage (no embedding, no head) and a last one with a tied copy.
        (Arch::Llama, false, Some(1..2)),
        (Arch::Gpt2, true, Some(2..3)),
    ];
    for (arch, tie, layers) in cases {
        let cfg = config(arch, tie);
        let part = match layers.clone() {
            None => Part::whole(&cfg),
            Some(l) => Part::new(&cfg, 0, 1, l),
        };
        let model = Model::part(cfg.clone(), part).unwrap();
        let (batch, seq) = (2, 5);
        let mut rng = Rng::new(3);
        let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(31) as u32).collect();
        let targets: Vec<u32> = (0..batch * seq).map(|_| rng.below(31) as u32).collect();
        let params = model.layout.init(1);
        let mut ws = Workspace::new(&be, &model, batch, seq).unwrap();
        let mut grads = be.zeros(params.len());
        let mut hook = Recorder::default();
        model.forward_stage(&be, &params, &mut ws, &be.upload_ids(&ids), &mut hook).unwrap();
        if model.part.last {
            model.loss_stage(&be, &params, &mut ws, &targets, Some((0.1, &mut grads)), &mut hook).unwrap();
        } else {
            be.fill(ws.output_grad_mut(), 0.5);
        }
        model.backward_stage(&be, &params, &mut grads, &mut ws, &ids, &mut hook).unwrap();
        let case = format!("{arch:?} tied={tie} layers={layers:?}");
        let ranges: Vec<Range<usize>> = hook.0.iter().map(|(r, _)| r.clone()).filter(|r| !r.is_empty()).collect();
        for w in ranges.windows(2) {
            assert_eq!(w[1].end, w[0].start, "{case}: {:?} then {:?}", w[0], w[1]);
        }
        assert_eq!((ranges.last().unwrap().start, ranges[0].end), (0, model.num_params()), "{case}: {ranges:?}");
        for (range, seen) in &hook.0 {
            assert_eq!(
                &grads[range.clone()],
                &seen[..],
                "{case}: gradients of {range:?} changed after they were reported"
            );
        }
    }
}
