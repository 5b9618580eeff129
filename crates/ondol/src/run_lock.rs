//! [`RunLock`]: one run at a time in a run directory.
//!
//! Two runs writing one directory (a job requeued while its first copy still runs, or the
//! same command started twice) would clear each other's unfinished checkpoints, interleave
//! their checkpoints and overwrite each other's `ondol.toml` and `metrics.jsonl`. Rank 0
//! holds an exclusive lock on `<run>/.lock` for the whole run, and a second run is refused,
//! naming the holder. The lock is the kernel's (`flock`): it goes with the process, however
//! the process ends, so a killed run never leaves the directory locked.

use ondol_core::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The lock file of a run directory.
const LOCK_FILE: &str = ".lock";

/// Exclusive use of a run directory until dropped. A run refused before it wrote anything
/// leaves no directory behind: dropping the lock removes the directories it made, where the
/// run left them empty (besides the lock file).
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// The directories made for the lock, outermost first.
    made: Vec<PathBuf>,
}

impl RunLock {
    /// Takes `run_dir` (making it where it does not exist), or says which process has it.
    pub fn take(run_dir: &Path) -> Result<Self> {
        let made = missing_ancestors(run_dir);
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(format!("cannot create {}", run_dir.display()), e))?;
        let path = run_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let holder = if holder.is_empty() { String::new() } else { format!(" ({holder})") };
                return Err(Error::Input(format!(
                    "{} is in use by another run{holder}, which holds {}: wait for it to end, or give this run \
                     another --run-dir",
                    run_dir.display(),
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(format!("cannot lock {}", path.display()), e)),
        }
        let lock = Self { file, path, made };
        lock.record_holder()?;
        Ok(lock)
    }

    /// Writes who holds the lock into its file, for the message of a run refused.
    fn record_holder(&self) -> Result<()> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!("pid {} on {}\n", std::process::id(), host.trim());
        let mut file = &self.file;
        file.set_len(0)
            .and_then(|()| file.write_all(holder.as_bytes()))
            .map_err(|e| Error::io(format!("cannot write {}", self.path.display()), e))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Directories this lock made that the run left holding only the lock file go again.
        // (A file unlinked while locked: a run that opened it meanwhile was refused already.)
        let Some(run_dir) = self.made.last() else { return };
        let only_the_lock =
            std::fs::read_dir(run_dir).is_ok_and(|entries| entries.flatten().all(|e| e.file_name() == LOCK_FILE));
        if only_the_lock {
            let _ = std::fs::remove_file(&self.path);
            // remove_dir takes empty directories only: an ancestor another run filled stays.
            for dir in self.made.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// The ancestors of `dir` (itself included) that do not exist, outermost first.
fn missing_ancestors(dir: &Path) -> Vec<PathBuf> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .take_while(|a| !a.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_the_first_is_free_again_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("runs/a");
        let first = RunLock::take(&run).unwrap();
        // A second open file description, as another process would have.
        let err = RunLock::take(&run).err().unwrap().to_string();
        let pid = format!("pid {}", std::process::id());
        assert!(err.contains("is in use by another run") && err.contains(&pid) && err.contains(".lock"), "{err}");
        drop(first);
        // Nothing was written: the directories the lock made are gone.
        assert!(!dir.path().join("runs").exists());
        let again = RunLock::take(&run).unwrap();
        std::fs::write(run.join("ondol.toml"), "").unwrap();
        drop(again);
        // A run that wrote something keeps its directory.
        assert!(run.join("ondol.toml").is_file());
        let _third = RunLock::take(&run).unwrap();
    }
}
