//! The run folder, owned by one training process at a time.
//!
//! A run folder (`--out`) holds a run's checkpoints, `latest`, `metrics.jsonl`, plots and
//! config. A week of training lives there, so nothing touches it by accident:
//!
//! - a new run refuses a folder that already holds one (a `latest` file or a checkpoint)
//!   unless asked to `--overwrite` it, and `--resume` refuses a folder without one;
//! - `--resume` refuses a checkpoint folder given in place of its run folder;
//! - a lock (`.lock`, an advisory file lock the system releases when the process dies, even
//!   by SIGKILL) stops a second process from training into the same folder;
//! - staging folders left by a checkpoint write that was killed are removed on claiming.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::error::{io, Result, TrainError};

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// How a training process means to use its run folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A new run: the folder must not hold a run.
    New,
    /// A new run replacing the one the folder holds (its checkpoints, metrics and plots are
    /// removed).
    Overwrite,
    /// Continue the run the folder holds.
    Resume,
}

/// A run folder held by this process (the lock is released when it is dropped).
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Takes `path` as the run folder for `claim`: checks it is what the claim needs, locks
    /// it, and cleans what interrupted writes left behind.
    pub fn claim(path: &Path, claim: Claim) -> Result<Self> {
        check_is_folder(path)?;
        if path.join(checkpoint::STATE_FILE).exists() {
            return Err(TrainError::RunFolder {
                path: path.to_path_buf(),
                reason: format!(
                    "is a checkpoint folder, not a run folder; give the run folder that holds it{}",
                    run_folder_above(path)
                        .map(|run| format!(" (`--out {}`)", run.display()))
                        .unwrap_or_default()
                ),
            });
        }
        let holds_run = holds_run(path);
        match claim {
            Claim::New if holds_run => {
                return Err(TrainError::RunFolder {
                    path: path.to_path_buf(),
                    reason: "already holds a run (checkpoints and metrics); continue it with `--resume`, replace it with `--overwrite`, or choose another `--out`".into(),
                })
            }
            Claim::Resume if !holds_run => {
                return Err(TrainError::RunFolder {
                    path: path.to_path_buf(),
                    reason: "holds no run to resume (no `latest` file and no checkpoint); start the run without `--resume`".into(),
                })
            }
            _ => {}
        }
        std::fs::create_dir_all(path).map_err(io(path))?;
        let lock = lock(path)?;
        let run = Self {
            path: path.to_path_buf(),
            _lock: lock,
        };
        run.remove_partial_writes()?;
        if claim == Claim::Overwrite {
            run.remove_run_files()?;
        }
        Ok(run)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes staging folders and files of writes that never finished (a process killed while
    /// writing a checkpoint, `latest` or the metrics).
    fn remove_partial_writes(&self) -> Result<()> {
        let checkpoints = self.path.join("checkpoints");
        for folder in [&self.path, &checkpoints] {
            let Ok(entries) = std::fs::read_dir(folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with('.') && name.contains(".partial") {
                    let path = entry.path();
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.map_err(io(&path))?;
                }
            }
        }
        Ok(())
    }

    /// Removes what a run writes (for `--overwrite`); other files are left alone.
    fn remove_run_files(&self) -> Result<()> {
        let checkpoints = self.path.join("checkpoints");
        if checkpoints.exists() {
            std::fs::remove_dir_all(&checkpoints).map_err(io(&checkpoints))?;
        }
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name == "latest"
                || name == "metrics.jsonl"
                || name == checkpoint::CONFIG_FILE
                || name.ends_with(".png")
            {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }
}

/// Refuses an `--out` that is a file.
pub fn check_is_folder(path: &Path) -> Result<()> {
    if path.exists() && !path.is_dir() {
        return Err(TrainError::RunFolder {
            path: path.to_path_buf(),
            reason: "is a file, not a folder; `--out` names the folder a run is written to".into(),
        });
    }
    Ok(())
}

/// Whether `path` holds a run: a `latest` file or a checkpoint.
pub fn holds_run(path: &Path) -> bool {
    if path.join("latest").exists() {
        return true;
    }
    std::fs::read_dir(path.join("checkpoints"))
        .map(|entries| {
            entries
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().starts_with("step-"))
        })
        .unwrap_or(false)
}

/// The run folder two levels above a checkpoint folder (`RUN/checkpoints/step-N`), if that is
/// one.
fn run_folder_above(checkpoint: &Path) -> Option<PathBuf> {
    let run = checkpoint.parent()?.parent()?;
    holds_run(run).then(|| run.to_path_buf())
}

/// Locks `run/.lock` for this process, writing its id into it; a lock another process holds
/// is refused with that process's id.
fn lock(run: &Path) -> Result<File> {
    let path = run.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(TrainError::RunFolder {
                path: run.to_path_buf(),
                reason: format!(
                    "another burn-moe process{} is training into this folder; wait for it to finish, stop it, or choose another `--out`",
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    }
                ),
            });
        }
        Err(std::fs::TryLockError::Error(error)) => return Err(io(&path)(error)),
    }
    file.set_len(0).map_err(io(&path))?;
    file.rewind().map_err(io(&path))?;
    write!(file, "{}", std::process::id()).map_err(io(&path))?;
    Ok(file)
}
