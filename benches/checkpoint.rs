//! Checkpoint cost on configs/bench-cpu.toml: how long a save stalls training (copying the
//! state into a snapshot), how long the background write takes, its size, and how long a
//! verified load takes.
//!
//!     cargo bench -p ondol --bench checkpoint

use ondol::config::RunConfig;
use ondol::trainer::{Data, Trainer};
use ondol_ckpt::checkpoint;
use ondol_cpu::CpuBackend;
use std::path::Path;
use std::time::Instant;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::set_current_dir(&root).expect("workspace root");
    let cfg = RunConfig::load(Path::new("configs/bench-cpu.toml"), &[]).unwrap_or_else(|e| panic!("{e}"));
    let data = Data::open(&cfg, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    let mut trainer = Trainer::new(CpuBackend, cfg, data).unwrap_or_else(|e| panic!("{e}"));
    let step = Instant::now();
    trainer.step().unwrap();
    let step_s = step.elapsed().as_secs_f64();
    let dir = tempfile::tempdir().unwrap();

    let t = Instant::now();
    let snap = trainer.snapshot().unwrap().expect("a single rank leads");
    let snapshot_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let saved = checkpoint::save(dir.path(), &snap).unwrap();
    let save_s = t.elapsed().as_secs_f64();
    let bytes: u64 = walk(&saved);
    let t = Instant::now();
    checkpoint::load(&saved, &trainer.model().cfg, &trainer.model().layout).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1e6;
    println!("checkpoint of {:.2}M parameters: {mb:.1} MB on disk", trainer.model().num_params() as f64 / 1e6);
    println!("training stall (snapshot copy): {:.1} ms, vs {:.0} ms per step", snapshot_s * 1e3, step_s * 1e3);
    println!("background write (fsynced, with SHA-256): {:.0} ms = {:.0} MB/s", save_s * 1e3, mb / save_s);
    println!("verified load (SHA-256 + read): {:.0} ms = {:.0} MB/s", load_s * 1e3, mb / load_s);
}

fn walk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| if e.path().is_dir() { walk(&e.path()) } else { e.metadata().unwrap().len() })
        .sum()
}
