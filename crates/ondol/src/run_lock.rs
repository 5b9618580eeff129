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
    /// Where the file system cannot lock files, warns that nothing keeps a second run out.
    pub fn take(run_dir: &Path) -> Result<Self> {
        let made = missing_ancestors(run_dir);
        let path = run_dir.join(LOCK_FILE);
        loop {
            std::fs::create_dir_all(run_dir)
                .map_err(|e| Error::io(format!("cannot create {}", run_dir.display()), e))?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(in_use(run_dir, &path)),
                Err(TryLockError::Error(e)) if cannot_lock(&e) => {
                    eprintln!(
                        "warning: {}: this file system does not lock files ({e}); nothing keeps a second run out of {}",
                        path.display(),
                        run_dir.display()
                    );
                    return Ok(Self { file, path, made });
                }
                Err(TryLockError::Error(e)) => return Err(Error::io(format!("cannot lock {}", path.display()), e)),
            }
            // A run that ended between our open and our lock may have removed the file we
            // locked (see Drop): the lock counts only on the file the path still names.
            if is_same_file(&file, &path) {
                let lock = Self { file, path, made };
                lock.record_holder()?;
                return Ok(lock);
            }
        }
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
        // (A run that opened the file meanwhile and then locks it sees that the path no longer
        // names it, and starts over.)
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

/// The refusal of a run directory whose lock another process holds, naming it.
fn in_use(run_dir: &Path, path: &Path) -> Error {
    let holder = std::fs::read_to_string(path).unwrap_or_default();
    let holder = holder.trim();
    let holder = if holder.is_empty() { String::new() } else { format!(" ({holder})") };
    Error::Input(format!(
        "{} is in use by another run{holder}, which holds {}: wait for it to end, or give this run another --run-dir",
        run_dir.display(),
        path.display()
    ))
}

/// Whether `e` says the file system has no locks (Linux: ENOSYS or EOPNOTSUPP, which Rust
/// reads as Unsupported; ENOLCK, an NFS mount without its lock daemon).
fn cannot_lock(e: &std::io::Error) -> bool {
    const ENOLCK: i32 = 37;
    e.kind() == std::io::ErrorKind::Unsupported || e.raw_os_error() == Some(ENOLCK)
}

/// Whether `path` names the open `file` (the same inode of the same device).
fn is_same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
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

    /// A lock counts on the file its path names: one unlinked (by a run that ended) and made
    /// again is another file.
    #[test]
    fn a_file_unlinked_and_made_again_is_not_the_file_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let file = File::create(&path).unwrap();
        assert!(is_same_file(&file, &path));
        std::fs::remove_file(&path).unwrap();
        assert!(!is_same_file(&file, &path));
        File::create(&path).unwrap();
        assert!(!is_same_file(&file, &path));
    }
}
