//! Parallel layouts of configs/bench-cpu.toml on the CPU at one global batch (8 x 256 tokens,
//! 4 micro-batches of 2): tokens/s, memory per rank (weights, gradients, AdamW state,
//! activations), the measured pipeline wait against the ideal bubble, and the expected
//! communication volume per rank and step, against which GPU (NCCL) runs can be checked; and
//! data parallelism with its gradient buckets summed during backward (overlap y) or after it.
//!
//!     cargo bench -p ondol --bench parallel_cpu
//!
//! Ranks are threads of one process sharing the machine's cores, so on a small CPU the
//! figure shows the overhead of the layout, not a speed-up.

use ondol::config::RunConfig;
use ondol::trainer::{Data, Trainer};
use ondol_comm::{Mesh, RankComms};
use ondol_cpu::CpuBackend;
use ondol_parallel::schedule::ideal_bubble;
use std::path::Path;
use std::time::{Duration, Instant};

/// What rank 0 measured.
struct Report {
    tokens_per_s: f64,
    weights_grads: u64,
    adamw: u64,
    activations: u64,
    wait_fraction: f64,
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::set_current_dir(&root).expect("workspace root");
    let (warmup, steps, micro) = (1, 3, 4);
    println!(
        "layout (tp,pp,dp) zero sp overlap  tokens/s  weights+grads  AdamW/rank  activations  wait/ideal bubble  comm/rank/step"
    );
    for ((tp, pp, dp), zero, sp, overlap) in [
        ((1, 1, 1), 0u8, false, false),
        ((1, 1, 2), 0, false, false),
        ((1, 1, 2), 0, false, true),
        ((1, 1, 2), 1, false, false),
        ((1, 1, 2), 1, false, true),
        ((2, 1, 1), 0, false, false),
        ((2, 1, 1), 0, true, false),
        ((1, 2, 1), 0, false, false),
        ((2, 2, 2), 0, false, true),
        ((2, 2, 2), 1, false, false),
        ((2, 2, 2), 1, false, true),
        ((2, 2, 2), 1, true, false),
    ] {
        let overrides = [
            format!("parallelism.tp={tp}"),
            format!("parallelism.pp={pp}"),
            format!("parallelism.dp={dp}"),
            format!("parallelism.zero={zero}"),
            format!("parallelism.sequence_parallel={sp}"),
            format!("parallelism.overlap_grad_sync={overlap}"),
            "parallelism.bucket_mb=1".to_string(),
            format!("training.grad_accum={micro}"),
            format!("training.batch_size={}", 8 / micro / dp),
        ];
        let cfg = RunConfig::load(Path::new("configs/bench-cpu.toml"), &overrides).unwrap_or_else(|e| panic!("{e}"));
        let data = Data::open(&cfg, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let mesh = Mesh::new(tp, pp, dp).unwrap();
        let comms = RankComms::threads(mesh, Duration::from_secs(600)).unwrap();
        let reports: Vec<Report> = std::thread::scope(|s| {
            let ranks: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let (cfg, data) = (cfg.clone(), data.clone());
                    s.spawn(move || {
                        let mut t = Trainer::rank(CpuBackend, cfg, data, c.boxed()).unwrap();
                        for _ in 0..warmup {
                            t.step().unwrap();
                        }
                        let (start, mut wait) = (Instant::now(), 0.0);
                        for _ in 0..steps {
                            wait += t.step().unwrap().pipeline_wait_s;
                        }
                        let secs = start.elapsed().as_secs_f64();
                        let n = t.engine.memory_bytes();
                        let adamw = 4 * t.engine.moment_elems() as u64;
                        let params = t.engine.params_held() as u64;
                        Report {
                            tokens_per_s: (steps * t.tokens_per_step()) as f64 / secs,
                            weights_grads: 8 * params,
                            adamw,
                            activations: n - 8 * params - adamw,
                            wait_fraction: wait / secs,
                        }
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let r = &reports[0];
        let m = &cfg.model;
        let (rows, d, layers) =
            ((cfg.training.batch_size * cfg.training.seq_len) as f64, m.d_model as f64, m.n_layers as f64);
        let params = ondol_model::Model::new(m.clone()).unwrap().num_params() as f64;
        // Bytes per rank and step (f32), ring algorithms, in units of one all-gather or
        // reduce-scatter of a micro-batch's activations, (tp - 1) / tp x rows x d (an
        // all-reduce is two). tp without sp: per layer 2 all-reduces forward, 2 backward, and
        // one each for the embedding and the head: 8L + 4 units. With sp, per block 2 units
        // forward, 3 backward (the norm output is gathered again), 2 for the embedding and 3
        // for the head: 10L + 5. pp: sends of activations and gradients, 1 / tp of them under
        // sp. dp: all-reduce (= ZeRO-1's reduce-scatter + all-gather) of the rank's parameters.
        let mb = micro as f64;
        let unit = rows * d * (tp - 1) as f64 / tp as f64 * 4.0;
        let tp_units = if sp { 10.0 * layers + 5.0 } else { 8.0 * layers + 4.0 };
        let tp_bytes = mb * tp_units * unit;
        let stream = if sp { rows / tp as f64 } else { rows };
        let pp_bytes = if pp > 1 { 2.0 * mb * stream * d * 4.0 } else { 0.0 };
        let dp_bytes = 2.0 * (dp - 1) as f64 / dp as f64 * 4.0 * params / (tp * pp) as f64;
        let mib = |b: f64| b / (1 << 20) as f64;
        println!(
            "({tp},{pp},{dp})           {zero}  {}   {}     {:>8.0}   {:>8.1} MiB  {:>6.1} MiB   {:>7.1} MiB      {:>5.2} / {:.2}      {:.1} MiB (tp {:.1} + pp {:.1} + dp {:.1})",
            if sp { "y" } else { "-" },
            if overlap { "y" } else { "-" },
            r.tokens_per_s,
            mib(r.weights_grads as f64),
            mib(r.adamw as f64),
            mib(r.activations as f64),
            r.wait_fraction,
            if pp > 1 { ideal_bubble(pp, 1, micro) } else { 0.0 },
            mib(tp_bytes + pp_bytes + dp_bytes),
            mib(tp_bytes),
            mib(pp_bytes),
            mib(dp_bytes),
        );
    }
}
