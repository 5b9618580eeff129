//! What a run reports: `metrics.jsonl` (one JSON object per logged step or evaluation),
//! a progress bar on a terminal, plain log lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use ondol_core::{Error, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;

/// One training row of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct StepRow {
    pub step: u64,
    /// The mean training loss of the steps since the previous row.
    pub loss: f64,
    /// The learning rate and gradient norm of `step` itself.
    pub lr: f32,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub mem_bytes: u64,
}

#[derive(Serialize)]
struct EvalRow {
    step: u64,
    val_loss: f64,
}

pub struct Metrics {
    /// None for a silent reporter (data-parallel ranks other than 0).
    file: Option<BufWriter<File>>,
    bar: Option<ProgressBar>,
    /// The device's peak FLOP/s, the denominator of MFU.
    pub peak_flops: f64,
    /// Whether an MFU above 100 % was explained already.
    past_peak_noted: bool,
}

impl Metrics {
    /// Starts `<run_dir>/metrics.jsonl`: afresh, or, when resuming from `resumed_step`,
    /// keeping the rows up to that step (but its evaluation, which the run makes again as it
    /// starts) so the file reads as one uninterrupted run. Shows a
    /// progress bar if stderr is a terminal.
    pub fn create(run_dir: &Path, total_steps: u64, peak_flops: f64, resumed_step: Option<u64>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: Vec<String> = match resumed_step {
            None => {
                keep_an_earlier_runs_rows(&path)?;
                Vec::new()
            }
            Some(step) => std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    // The evaluation at the resumed step is made again as the run starts.
                    let row: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
                    let at = row.get("step").and_then(|s| s.as_u64());
                    at.is_some_and(|s| s < step || (s == step && row.get("val_loss").is_none()))
                })
                .map(str::to_string)
                .collect(),
        };
        // The kept rows replace the file whole (a crash meanwhile leaves the old one).
        let tmp = run_dir.join(".metrics.jsonl.tmp");
        let written = File::create(&tmp).and_then(|mut f| {
            kept.iter().try_for_each(|line| writeln!(f, "{line}"))?;
            f.sync_all()
        });
        written
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            let style = ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .expect("valid template");
            bar.set_style(style);
            bar
        });
        Ok(Self { file: Some(BufWriter::new(file)), bar, peak_flops, past_peak_noted: false })
    }

    /// A reporter that writes and prints nothing.
    pub fn silent(peak_flops: f64) -> Self {
        Self { file: None, bar: None, peak_flops, past_peak_noted: false }
    }

    fn write(&mut self, row: &impl Serialize) -> Result<()> {
        let Some(file) = &mut self.file else { return Ok(()) };
        let line = serde_json::to_string(row).expect("rows serialize");
        writeln!(file, "{line}").and_then(|_| file.flush()).map_err(|e| Error::io("cannot write metrics.jsonl", e))
    }

    fn say(&self, line: String) {
        match (&self.bar, &self.file) {
            (Some(bar), _) => bar.println(line),
            (None, Some(_)) => ondol_core::say!("{line}"),
            (None, None) => {}
        }
    }

    /// A logged training step: a metrics row, and a log line (or the bar's message).
    pub fn step(&mut self, row: StepRow) -> Result<()> {
        let text = format!(
            "step {:>6} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {:.0} tok/s | mfu {:.1}%",
            row.step,
            row.loss,
            row.lr,
            row.grad_norm,
            row.tokens_per_s,
            100.0 * row.mfu
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(row.step);
                bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", row.loss, row.lr, row.tokens_per_s));
            }
            None => self.say(text),
        }
        if let Some(note) = self.past_peak_note(row.mfu) {
            self.say(note);
        }
        self.write(&row)
    }

    /// What the first MFU above 100 % means, once.
    fn past_peak_note(&mut self, mfu: f64) -> Option<String> {
        if mfu <= 1.0 || self.past_peak_noted {
            return None;
        }
        self.past_peak_noted = true;
        Some(format!(
            "note: MFU above 100 %: the peak it divides by, {:.0} GFLOP/s, is below what training achieves; a CPU's \
             is measured at start-up, and reads low when the machine was busy then",
            self.peak_flops / 1e9
        ))
    }

    /// A step that is not logged: only the progress bar moves.
    pub fn tick(&self, step: u64, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
        }
    }

    /// A line for the user (above the progress bar, if there is one).
    pub fn note(&self, line: String) {
        self.say(line);
    }

    pub fn eval(&mut self, step: u64, val_loss: f64) -> Result<()> {
        self.say(format!("step {step:>6} | val loss {val_loss:.4} | val ppl {:.2}", val_loss.exp()));
        self.write(&EvalRow { step, val_loss })
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A run that starts afresh where an earlier one left rows but no checkpoint (it was stopped
/// before its first, or ran with `checkpoint.at_end = false`) adds them to
/// `metrics.earlier.jsonl`, saying so, rather than writing over them.
fn keep_an_earlier_runs_rows(path: &Path) -> Result<()> {
    let rows = std::fs::read_to_string(path).unwrap_or_default();
    if rows.is_empty() {
        return Ok(());
    }
    let earlier = path.with_file_name("metrics.earlier.jsonl");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&earlier)
        .and_then(|mut f| f.write_all(rows.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(|e| {
            Error::io(format!("cannot keep the earlier rows of {} in {}", path.display(), earlier.display()), e)
        })?;
    ondol_core::say!(
        "note: {} held {} rows of an earlier run in this directory, which left no checkpoint: added to {}",
        path.display(),
        rows.lines().count(),
        earlier.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mfu_past_the_peak_is_explained_once() {
        let mut m = Metrics::silent(60e9);
        assert_eq!(m.past_peak_note(0.9), None);
        let note = m.past_peak_note(1.2).unwrap();
        assert!(note.contains("above 100 %") && note.contains("60 GFLOP/s"), "{note}");
        assert_eq!(m.past_peak_note(1.3), None);
    }
}
