//! Which kernels of kernels/*.cu the tests never ran on the emulator: reads the launch logs
//! that ONDOL_EMU_LAUNCH_LOG made (.ci/run sets it for the tests), prints each kernel not in
//! them, and exits 1 if there is one.
//!
//! `cargo run --release -p ondol-cuda --example kernel_coverage -- LOG...`

use std::collections::BTreeSet;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut launched = BTreeSet::new();
    for path in std::env::args().skip(1) {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        launched.extend(text.lines().map(str::to_owned));
    }
    let all = ondol_cuda::kernel_names();
    let untested: Vec<&String> = all.iter().filter(|k| !launched.contains(*k)).collect();
    for k in &untested {
        println!("untested: {k}");
    }
    println!("{} of {} kernels ran on the emulator", all.len() - untested.len(), all.len());
    if untested.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
