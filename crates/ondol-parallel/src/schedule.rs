//! Pipeline schedules: the order in which one pipeline rank runs the forward and backward
//! passes of its micro-batches.
//!
//! A rank holds `v` model chunks (virtual stages; 1 unless interleaved). Virtual stage
//! `c * p + s` is chunk `c` of pipeline rank `s`, so activations go around the ring of ranks `v`
//! times. Every schedule accumulates each chunk's gradients over micro-batches in ascending
//! order, so all schedules give the same bits; they differ in memory (micro-batches in flight)
//! and in the pipeline bubble:
//! - GPipe: every forward, then every backward; `m` micro-batches in flight.
//! - 1F1B (PipeDream-flush): `p - s - 1` warm-up forwards, then one forward and one backward in
//!   turn; at most `p - s` in flight. Same bubble as GPipe, `(p - 1) / (m + p - 1)` of the step.
//! - Interleaved 1F1B (Megatron): `v` chunks per rank cut the bubble by `v`, to
//!   `(p - 1) / (v m + p - 1)`, for `v` times the point-to-point traffic; needs `m % p == 0`.

use ondol_core::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Gpipe,
    #[serde(rename = "1f1b")]
    OneFOneB,
    Interleaved,
}

/// One pass of one micro-batch through one of the rank's chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Forward { chunk: usize, micro: usize },
    Backward { chunk: usize, micro: usize },
}

/// The actions of pipeline rank `stage` of `stages`, with `chunks` chunks per rank and `micro`
/// micro-batches per step. The caller has checked the shape (see [`check`]).
pub fn actions(kind: ScheduleKind, stage: usize, stages: usize, chunks: usize, micro: usize) -> Vec<Action> {
    let (p, v, m) = (stages, chunks, micro);
    // The k-th forward (backward) of this rank: chunks in turn, p micro-batches at a time
    // (with one chunk, simply micro-batch k).
    let forward = |k: usize| Action::Forward { chunk: (k % (p * v)) / p, micro: k / (p * v) * p + k % p };
    let backward = |k: usize| Action::Backward { chunk: v - 1 - (k % (p * v)) / p, micro: k / (p * v) * p + k % p };
    match kind {
        ScheduleKind::Gpipe => (0..m)
            .map(|i| Action::Forward { chunk: 0, micro: i })
            .chain((0..m).map(|i| Action::Backward { chunk: 0, micro: i }))
            .collect(),
        ScheduleKind::OneFOneB | ScheduleKind::Interleaved => {
            let (total, warmup) = if v == 1 {
                (m, (p - stage - 1).min(m))
            } else {
                (m * v, ((p - stage - 1) * 2 + (v - 1) * p).min(m * v))
            };
            let mut out: Vec<Action> = (0..warmup).map(forward).collect();
            for i in 0..total - warmup {
                out.push(forward(warmup + i));
                out.push(backward(i));
            }
            out.extend((total - warmup..total).map(backward));
            out
        }
    }
}

/// Refuses schedule shapes that cannot run, naming the key to change.
pub fn check(kind: ScheduleKind, stages: usize, chunks: usize, micro: usize) -> Result<()> {
    let err = |key: &str, msg: String| Err(Error::config(key, msg));
    match kind {
        ScheduleKind::Interleaved if stages < 2 => {
            err("parallelism.schedule", "\"interleaved\" needs parallelism.pp of at least 2".into())
        }
        ScheduleKind::Interleaved if chunks < 2 => err(
            "parallelism.virtual_stages",
            format!("{chunks}: the interleaved schedule needs at least 2 chunks per rank"),
        ),
        ScheduleKind::Interleaved if !micro.is_multiple_of(stages) => err(
            "training.grad_accum",
            format!("{micro} micro-batches: the interleaved schedule needs a multiple of parallelism.pp = {stages}"),
        ),
        ScheduleKind::Gpipe | ScheduleKind::OneFOneB if chunks != 1 => err(
            "parallelism.virtual_stages",
            format!("{chunks}: only the \"interleaved\" schedule runs several chunks per rank"),
        ),
        _ => Ok(()),
    }
}

/// Per chunk of pipeline rank `stage`, the most micro-batches between their forward and
/// their backward at once (the workspaces the rank keeps for that chunk).
pub fn in_flight(kind: ScheduleKind, stage: usize, stages: usize, chunks: usize, micro: usize) -> Vec<usize> {
    let (mut live, mut peak) = (vec![0usize; chunks], vec![0usize; chunks]);
    for action in actions(kind, stage, stages, chunks, micro) {
        match action {
            Action::Forward { chunk, .. } => {
                live[chunk] += 1;
                peak[chunk] = peak[chunk].max(live[chunk]);
            }
            Action::Backward { chunk, .. } => live[chunk] -= 1,
        }
    }
    peak
}

/// The idle fraction of an ideal pipeline step (equal stage times, free communication).
pub fn ideal_bubble(stages: usize, chunks: usize, micro: usize) -> f64 {
    (stages - 1) as f64 / (chunks * micro + stages - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates the ranks in lock-step (one action per time unit, an action waiting for the
    /// ones it depends on) and returns the number of time units the step takes.
    fn simulate(kind: ScheduleKind, p: usize, v: usize, m: usize) -> usize {
        let plans: Vec<Vec<Action>> = (0..p).map(|s| actions(kind, s, p, v, m)).collect();
        let mut next = vec![0usize; p];
        let mut done_f = std::collections::HashSet::new();
        let mut done_b = std::collections::HashSet::new();
        let last = p * v - 1;
        let mut t = 0;
        while next.iter().zip(&plans).any(|(n, plan)| *n < plan.len()) {
            t += 1;
            assert!(t < 10_000, "the schedule deadlocks");
            let mut finished = Vec::new();
            for s in 0..p {
                let Some(&a) = plans[s].get(next[s]) else { continue };
                let ready = match a {
                    Action::Forward { chunk, micro } => {
                        let vs = chunk * p + s;
                        vs == 0 || done_f.contains(&(vs - 1, micro))
                    }
                    Action::Backward { chunk, micro } => {
                        let vs = chunk * p + s;
                        done_f.contains(&(vs, micro)) && (vs == last || done_b.contains(&(vs + 1, micro)))
                    }
                };
                if ready {
                    finished.push((s, a));
                }
            }
            for (s, a) in finished {
                next[s] += 1;
                match a {
                    Action::Forward { chunk, micro } => done_f.insert((chunk * p + s, micro)),
                    Action::Backward { chunk, micro } => done_b.insert((chunk * p + s, micro)),
                };
            }
        }
        t
    }

    #[test]
    fn every_schedule_runs_each_pass_once_and_finishes() {
        for (kind, p, v, m) in [
            (ScheduleKind::Gpipe, 4, 1, 8),
            (ScheduleKind::OneFOneB, 4, 1, 8),
            (ScheduleKind::OneFOneB, 4, 1, 2),
            (ScheduleKind::Interleaved, 4, 2, 8),
            (ScheduleKind::Interleaved, 2, 3, 4),
        ] {
            for s in 0..p {
                let mut a = actions(kind, s, p, v, m);
                assert_eq!(a.len(), 2 * v * m);
                a.sort_by_key(|x| format!("{x:?}"));
                a.dedup();
                assert_eq!(a.len(), 2 * v * m, "{kind:?} stage {s}: a pass repeats");
            }
            simulate(kind, p, v, m);
        }
    }

    /// With one unit per pass, 1F1B's step takes 2 (m + p - 1) units, and interleaving with v
    /// chunks of 1/v the work shortens the bubble as (p - 1) / (v m + p - 1) says.
    #[test]
    fn bubbles_match_their_formulas() {
        let (p, m) = (4, 8);
        assert_eq!(simulate(ScheduleKind::OneFOneB, p, 1, m), 2 * (m + p - 1));
        assert_eq!(simulate(ScheduleKind::Gpipe, p, 1, m), 2 * (m + p - 1));
        let v = 2;
        let units = simulate(ScheduleKind::Interleaved, p, v, m) as f64 / v as f64; // chunk passes are 1/v long
        let bubble = 1.0 - (2 * m) as f64 / units;
        assert!(bubble <= ideal_bubble(p, v, m) + 0.03, "bubble {bubble} vs {}", ideal_bubble(p, v, m));
        assert!(bubble < ideal_bubble(p, 1, m));
    }

    #[test]
    fn micro_batches_in_flight_per_schedule() {
        let (p, m) = (4, 8);
        for s in 0..p {
            assert_eq!(in_flight(ScheduleKind::OneFOneB, s, p, 1, m), [p - s], "1F1B stage {s}");
            assert_eq!(in_flight(ScheduleKind::Gpipe, s, p, 1, m), [m], "GPipe stage {s}");
        }
        assert_eq!(in_flight(ScheduleKind::OneFOneB, 0, 1, 1, m), [1]);
        assert_eq!(in_flight(ScheduleKind::OneFOneB, 0, p, 1, 2), [2], "fewer micro-batches than stages");
        // Interleaved, first rank: 10 warm-up forwards (micro-batches 0-3 of chunk 0, 0-3 of
        // chunk 1, 4-5 of chunk 0), then forwards of chunk 0 (6, 7) while the backwards of
        // chunk 1 begin: chunk 0 holds all 8 before its first backward, chunk 1 at most 4.
        assert_eq!(in_flight(ScheduleKind::Interleaved, 0, p, 2, m), [8, 4]);
        // The last rank warms up with (v - 1) p = 4 forwards of chunk 0 only.
        assert_eq!(in_flight(ScheduleKind::Interleaved, p - 1, p, 2, m), [5, 1]);
    }
}
