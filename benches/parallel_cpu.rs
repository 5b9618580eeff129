//! Data-parallel layouts of configs/bench-cpu.toml on the CPU at one global batch (8 x 256):
//! tokens/s, memory per rank (weights, gradients, AdamW state, activations), and the expected
//! communication volume per step, against which GPU (NCCL) runs can be checked.
//!
//!     cargo bench -p ondol --bench parallel_cpu
//!
//! Ranks are threads of one process sharing the machine's cores, so on a small CPU the
//! figure shows the overhead of the layout, not a speed-up.

use ondol::config::RunConfig;
use ondol::trainer::{Data, Trainer};
use ondol_comm::ThreadComm;
use ondol_cpu::CpuBackend;
use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::set_current_dir(&root).expect("workspace root");
    let (warmup, steps) = (2, 5);
    println!("layout         tokens/s   weights+grads   AdamW/rank   activations   comm/rank/step (ring)");
    for (dp, zero) in [(1usize, 0u8), (2, 0), (2, 1)] {
        let overrides = [
            format!("parallelism.dp={dp}"),
            format!("parallelism.zero={zero}"),
            format!("training.batch_size={}", 8 / dp),
        ];
        let cfg = RunConfig::load(Path::new("configs/bench-cpu.toml"), &overrides).unwrap_or_else(|e| panic!("{e}"));
        let data = Data::open(&cfg, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let comms = ThreadComm::group(dp, Duration::from_secs(300));
        let reports: Vec<(f64, u64, u64, u64, usize)> = std::thread::scope(|s| {
            let ranks: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let (cfg, data) = (cfg.clone(), data.clone());
                    s.spawn(move || {
                        let mut t = Trainer::data_parallel_rank(CpuBackend, cfg, data, Box::new(c)).unwrap();
                        for _ in 0..warmup {
                            t.step().unwrap();
                        }
                        let start = Instant::now();
                        for _ in 0..steps {
                            t.step().unwrap();
                        }
                        let tokens_per_s = (steps * t.tokens_per_step()) as f64 / start.elapsed().as_secs_f64();
                        let n = t.model.num_params() as u64;
                        let opt = 8 * t.opt.m.len() as u64;
                        let acts = t.memory_bytes() - 8 * n - opt;
                        (tokens_per_s, 8 * n, opt, acts, t.model.num_params())
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let (tps, wg, opt, acts, n) = reports[0];
        let p = dp as f64;
        // Ring all-reduce moves 2 (p-1)/p of the buffer per rank; ZeRO-1's reduce-scatter plus
        // all-gather move (p-1)/p each: the same total. f32 gradients: 4 bytes per parameter.
        let comm = 2.0 * (p - 1.0) / p * 4.0 * n as f64;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "dp={dp} zero={zero}  {tps:>9.0}   {:>10.1} MiB   {:>7.1} MiB   {:>8.1} MiB   {:>8.1} MiB",
            mib(wg),
            mib(opt),
            mib(acts),
            comm / (1 << 20) as f64
        );
    }
}
