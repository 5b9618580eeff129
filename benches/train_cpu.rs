//! CPU training throughput of configs/bench-cpu.toml: full optimizer steps (forward, loss,
//! backward, clipping, AdamW), after warm-up, on the same data the `train` command reads.
//!
//!     cargo bench -p ondol --bench train_cpu -- [--steps N] [--warmup N] [--config PATH]
//!
//! Prints a human line per phase and, last, one JSON object that benches/cpu-vs-pytorch.sh
//! compares with the PyTorch peer's. Run it on an idle machine: a build beside it skews
//! the figure several times over.

use ondol::config::RunConfig;
use ondol::trainer::{Data, Trainer};
use ondol_cpu::CpuBackend;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::set_current_dir(&root).expect("workspace root");
    let config = arg(&args, "--config").map_or(PathBuf::from("configs/bench-cpu.toml"), PathBuf::from);
    let steps: u64 = arg(&args, "--steps").map_or(10, |s| s.parse().expect("--steps N"));
    let warmup: u64 = arg(&args, "--warmup").map_or(3, |s| s.parse().expect("--warmup N"));

    let mut cfg = RunConfig::load(&config, &[]).unwrap_or_else(|e| panic!("{e}"));
    cfg.training.steps = steps + warmup;
    let threads = rayon::current_num_threads();
    let data = Data::open(&cfg, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    let mut trainer = Trainer::new(CpuBackend, cfg, data).unwrap_or_else(|e| panic!("{e}"));
    let flops_per_token = trainer.model().flops_per_token(trainer.cfg.training.seq_len) as f64;
    let tokens = trainer.tokens_per_step() as f64;

    for _ in 0..warmup {
        trainer.step().unwrap();
    }
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = trainer.step().unwrap().loss;
    }
    let secs = start.elapsed().as_secs_f64() / steps as f64;
    let tokens_per_s = tokens / secs;
    let gflops = tokens_per_s * flops_per_token / 1e9;
    let peak = ondol_cpu::measure_gemm_peak() / 1e9;
    println!(
        "ondol cpu, {threads} threads: {:.1} ms/step, {tokens_per_s:.0} tokens/s, {gflops:.1} GFLOP/s",
        secs * 1e3
    );
    println!("sgemm 1024^3 peak on this machine: {peak:.1} GFLOP/s -> {:.0}% of peak", 100.0 * gflops / peak);
    println!(
        "{{\"impl\": \"ondol\", \"threads\": {threads}, \"tokens_per_s\": {tokens_per_s:.1}, \"gflops\": {gflops:.2}, \
         \"step_ms\": {:.2}, \"flops_per_token\": {flops_per_token}, \"gemm_peak_gflops\": {peak:.1}, \"loss_last\": {loss:.5}}}",
        secs * 1e3
    );
}
