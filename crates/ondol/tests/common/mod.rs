//! What the integration tests share: running the `ondol` binary as a user would.
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// The outcome of one `ondol` invocation.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ondol ARGS` with `dir` as the working directory.
pub fn ondol(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_ondol")).args(args).current_dir(dir).output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ondol ARGS` in `dir`: (success, stderr), for tests that read only the messages.
pub fn ondol_err(dir: &Path, args: &[&str]) -> (bool, String) {
    let r = ondol(dir, args);
    (r.ok, r.stderr)
}
