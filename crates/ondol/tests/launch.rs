//! `ondol launch` end to end with the hidden `comm-selftest` as the ranks' command: the torchrun
//! environment reaches every rank, output lines carry `[rank K]`, and one failing rank stops the
//! others and fails the launch, naming that rank.

use std::process::Command;
use std::time::{Duration, Instant};

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

/// Runs `ondol ARGS`; returns (success, stdout, stderr, elapsed).
fn ondol(args: &[&str]) -> (bool, String, String, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ondol")).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr), start.elapsed())
}

#[test]
fn two_ranks_rendezvous_exchange_and_pass_a_barrier() {
    let port = free_port();
    let (ok, out, err, _) =
        ondol(&["launch", "--nproc-per-node", "2", "--master-port", &port, "--", "comm-selftest", "--timeout", "20"]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    for rank in 0..2 {
        let p = format!("[rank {rank}] ");
        let mine: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix(&p)).collect();
        assert!(
            mine.contains(&format!("connected to the store at 127.0.0.1:{port} as rank {rank} of 2").as_str()),
            "{out}"
        );
        assert!(mine.contains(&"payload: hello from rank 0 of 2"), "{out}");
        assert!(mine.contains(&"barrier passed"), "{out}");
        assert!(mine.contains(&"all-reduce through the store: [3.0, 6.0] ok"), "{out}");
    }
    assert!(out.lines().all(|l| l.starts_with("[rank 0] ") || l.starts_with("[rank 1] ")), "{out}");
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    let port = free_port();
    // Rank 0 would sleep forever; rank 1 fails right after connecting.
    let (ok, out, err, elapsed) = ondol(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port,
        "--",
        "comm-selftest",
        "--hang-rank",
        "0",
        "--fail-rank",
        "1",
        "--timeout",
        "20",
    ]);
    assert!(!ok, "launch succeeded:\n{out}\n{err}");
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
    assert!(out.contains("[rank 0] hanging as asked"), "{out}");
    assert!(err.contains("[rank 1] error:") && err.contains("fails as asked"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("rank 1 exited with status 1") && last.contains("stopped the other 1 rank"), "{err}");
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank() {
    use std::io::{BufRead, BufReader};
    let port = free_port();
    // Rank 0 sleeps; rank 1 blocks in the store waiting for rank 0. Neither ends by itself.
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_ondol"))
        .args(["launch", "--nproc-per-node", "2", "--master-port", &port, "--grace-period", "30", "--"])
        .args(["comm-selftest", "--hang-rank", "0", "--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(launcher.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !(seen.iter().any(|l: &String| l.starts_with("[rank 0] hanging"))
        && seen.iter().any(|l| l.starts_with("[rank 1] connected")))
    {
        seen.push(lines.next().expect("launcher output ended early").unwrap());
    }
    let start = Instant::now();
    let kill = Command::new("kill").args(["-TERM", &launcher.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = launcher.wait_with_output().unwrap();
    // Well under the 30 s grace period: the ranks got the forwarded SIGTERM, not a SIGKILL later.
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    // Ended as interrupted by the signal, as the ranks were, not as a failure.
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by signal 15 (SIGTERM), which it forwarded to every rank"), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("error:")), "{err}");
}

#[test]
fn launch_options_are_checked() {
    let (ok, _, err, _) = ondol(&["launch", "--nnodes", "2", "--node-rank", "2", "--", "comm-selftest"]);
    assert!(!ok && err.contains("--node-rank 2 must be below --nnodes 2"), "{err}");
    let (ok, _, err, _) = ondol(&["launch", "--nproc-per-node", "2"]);
    assert!(!ok && err.contains("COMMAND"), "{err}");
}
