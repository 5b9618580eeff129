//! [`DirLock`]: one writer at a time in a run directory or a `data prepare` output.
//!
//! Two runs writing one directory (a job requeued while its first copy still runs, or the
//! same command started twice) would clear each other's unfinished checkpoints, interleave
//! their checkpoints and overwrite each other's `ondol.toml` and `metrics.jsonl`; two
//! `data prepare`s into one `--out` (runs of a sweep started together, sharing a `[data]
//! prepare` table) would mix their shards under one manifest. Rank 0 of a run, and each
//! `data prepare`, holds an exclusive lock on `<dir>/.lock` while it writes there; a second
//! run is refused, naming the holder, and a second prepare waits for the first. The lock is
//! the kernel's (`flock`): it goes with the process, however the process ends, so a killed
//! writer never leaves the directory locked.

use ondol_core::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The lock file of a directory.
const LOCK_FILE: &str = ".lock";

/// What a directory is taken for, for messages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Purpose {
    /// A training run, in its run directory (`--run-dir`).
    Run,
    /// `data prepare`, in its output directory (`--out`, or `data.prepare.out`).
    Prepare,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Prepare => "`data prepare`",
        }
    }

    /// The option that names another directory.
    fn flag(self) -> &'static str {
        match self {
            Self::Run => "--run-dir",
            Self::Prepare => "--out",
        }
    }
}

/// Exclusive use of a directory until dropped. A writer refused before it wrote anything
/// leaves no directory behind: dropping the lock removes the directories it made, where the
/// writer left them empty (besides the lock file).
pub struct DirLock {
    file: File,
    path: PathBuf,
    /// The directories made for the lock, outermost first.
    made: Vec<PathBuf>,
}

impl DirLock {
    /// Takes `dir` (making it where it does not exist), or says which process has it.
    /// Where the file system cannot lock files, warns that nothing keeps a second writer out.
    pub fn take(dir: &Path, purpose: Purpose) -> Result<Self> {
        Self::acquire(dir, purpose, false)
    }

    /// Takes `dir` once the writer that has it lets go (saying which process that is).
    pub fn wait(dir: &Path, purpose: Purpose) -> Result<Self> {
        Self::acquire(dir, purpose, true)
    }

    fn acquire(dir: &Path, purpose: Purpose, wait: bool) -> Result<Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Input(format!("{}: a file, not a directory; give a directory", dir.display())));
        }
        let made = missing_ancestors(dir);
        let path = dir.join(LOCK_FILE);
        let mut said_waiting = false;
        loop {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
            let locked = match file.try_lock() {
                Err(TryLockError::WouldBlock) if wait => {
                    if !std::mem::replace(&mut said_waiting, true) {
                        ondol_core::say!("waiting for {} to finish with {}", holder(&path), dir.display());
                    }
                    file.lock().map_err(TryLockError::Error)
                }
                other => other,
            };
            match locked {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(in_use(dir, &path, purpose)),
                Err(TryLockError::Error(e)) if cannot_lock(&e) => {
                    ondol_core::say!(
                        "warning: {}: this file system does not lock files ({e}); nothing keeps a second {} out of {}",
                        path.display(),
                        purpose.name(),
                        dir.display()
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

    /// Writes who holds the lock into its file, for the message of a writer refused.
    fn record_holder(&self) -> Result<()> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!("pid {} on {}\n", std::process::id(), host.trim());
        let mut file = &self.file;
        file.set_len(0)
            .and_then(|()| file.write_all(holder.as_bytes()))
            .map_err(|e| Error::io(format!("cannot write {}", self.path.display()), e))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Directories this lock made that the writer left holding only the lock file go
        // again. (A writer that opened the file meanwhile and then locks it sees that the path
        // no longer names it, and starts over.)
        let Some(dir) = self.made.last() else { return };
        let only_the_lock =
            std::fs::read_dir(dir).is_ok_and(|entries| entries.flatten().all(|e| e.file_name() == LOCK_FILE));
        if only_the_lock {
            let _ = std::fs::remove_file(&self.path);
            // remove_dir takes empty directories only: an ancestor another run filled stays.
            for dir in self.made.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// The process the lock file `path` names ("pid 12 on node3"), or "another process".
fn holder(path: &Path) -> String {
    let holder = std::fs::read_to_string(path).unwrap_or_default();
    match holder.trim() {
        "" => "another process".into(),
        holder => holder.into(),
    }
}

/// The refusal of a directory whose lock another process holds, naming it.
fn in_use(dir: &Path, path: &Path, purpose: Purpose) -> Error {
    let (name, flag) = (purpose.name(), purpose.flag());
    Error::Input(format!(
        "{} is in use by another {name} ({}), which holds {}: wait for it to end, or give this {name} another {flag}",
        dir.display(),
        holder(path),
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
        let first = DirLock::take(&run, Purpose::Run).unwrap();
        // A second open file description, as another process would have.
        let err = DirLock::take(&run, Purpose::Run).err().unwrap().to_string();
        let pid = format!("pid {}", std::process::id());
        assert!(err.contains("is in use by another run") && err.contains(&pid) && err.contains(".lock"), "{err}");
        drop(first);
        // Nothing was written: the directories the lock made are gone.
        assert!(!dir.path().join("runs").exists());
        let again = DirLock::take(&run, Purpose::Run).unwrap();
        std::fs::write(run.join("ondol.toml"), "").unwrap();
        drop(again);
        // A run that wrote something keeps its directory.
        assert!(run.join("ondol.toml").is_file());
        let _third = DirLock::take(&run, Purpose::Run).unwrap();
    }

    /// A writer that waits gets the directory once the one holding it lets go.
    #[test]
    fn a_waiting_writer_takes_the_directory_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("shards");
        let first = DirLock::take(&out, Purpose::Prepare).unwrap();
        std::fs::write(out.join("manifest.json"), "{}").unwrap();
        let err = DirLock::take(&out, Purpose::Prepare).err().unwrap().to_string();
        assert!(err.contains("in use by another `data prepare`") && err.contains("--out"), "{err}");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _second = DirLock::wait(&out, Purpose::Prepare).unwrap();
                tx.send(()).unwrap();
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(rx.try_recv().is_err(), "the second writer did not wait");
            drop(first);
            rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the second writer never got the directory");
        });
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
