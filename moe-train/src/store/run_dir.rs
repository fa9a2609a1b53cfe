//! The run folder, owned by one training process at a time.
//!
//! A run folder (`--out`) holds a run's checkpoints, `latest`, `metrics.jsonl`, plots and
//! config. A week of training lives there, and a user's own files may sit where they point
//! `--out`, so a run writes only into a folder it owns:
//!
//! - a new run goes into a folder that does not exist, is empty, or was claimed by a run that
//!   stopped before its first checkpoint ([`MARKER_FILE`]); a folder that holds a run (a
//!   `latest` file or a checkpoint) needs `--resume` or `--overwrite`, and any other folder
//!   (a user's files, a model or corpus folder) is refused, naming a few of its files;
//! - `--overwrite` removes the files a run writes ([`RUN_FILES`], the checkpoints), nothing
//!   else, and only in a folder that holds a run or was claimed by one;
//! - no run goes into a folder inside another run's folder (its checkpoints);
//! - `--resume` refuses a checkpoint folder given in place of its run folder;
//! - a lock (`.lock`, an advisory file lock the system releases when the process dies, even
//!   by SIGKILL) stops a second process from training into the same folder;
//! - staging folders left by a checkpoint write that was killed are removed on claiming.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{io, Result, TrainError};
use crate::store::checkpoint;

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// Written into a folder when a run claims it: the folder is a run folder even before its
/// first checkpoint, so a run that stopped early can be started again in it.
pub const MARKER_FILE: &str = ".burn-moe-run";

/// The files a run writes at the top of its folder, besides `checkpoints/`: what
/// `--overwrite` removes (with the checkpoints), and nothing else.
pub const RUN_FILES: [&str; 8] = [
    "latest",
    "metrics.jsonl",
    checkpoint::CONFIG_FILE,
    "loss.png",
    "expert_load.png",
    "expert_load_image.png",
    "expert_load_text.png",
    "samples.png",
];

/// How many of a refused folder's files its message names.
const NAMED_FILES: usize = 3;

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
        let holds_run = check_claim(path, claim)?;
        std::fs::create_dir_all(path).map_err(io(path))?;
        let lock = lock(path)?;
        let run = Self {
            path: path.to_path_buf(),
            _lock: lock,
        };
        run.remove_partial_writes()?;
        // A new run in a folder a run claimed but left without a checkpoint replaces what
        // that start wrote (its metrics would otherwise be read as this run's).
        if claim == Claim::Overwrite || (claim == Claim::New && !holds_run) {
            run.remove_run_files()?;
        }
        let marker = path.join(MARKER_FILE);
        std::fs::write(&marker, "a burn-moe run folder\n").map_err(io(&marker))?;
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
                if is_staging(&name) {
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

    /// Removes what a run writes ([`RUN_FILES`] and the checkpoints); other files are left
    /// alone.
    fn remove_run_files(&self) -> Result<()> {
        let checkpoints = self.path.join("checkpoints");
        if checkpoints.exists() {
            std::fs::remove_dir_all(&checkpoints).map_err(io(&checkpoints))?;
        }
        for name in RUN_FILES {
            let path = self.path.join(name);
            if path.is_file() {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }
}

/// Checks that `path` may be taken as the run folder for `claim` (see the module docs),
/// without creating or locking anything; whether it holds a run. `compare` checks both of its
/// folders so before either run starts.
pub fn check_claim(path: &Path, claim: Claim) -> Result<bool> {
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
    check_not_inside_a_run(path)?;
    let holds_run = holds_run(path);
    let refuse = |reason: String| {
        Err(TrainError::RunFolder {
            path: path.to_path_buf(),
            reason,
        })
    };
    match claim {
        Claim::New if holds_run => {
            return refuse("already holds a run (checkpoints and metrics); continue it with `--resume`, replace it with `--overwrite`, or choose another `--out`".into());
        }
        Claim::Resume if !holds_run => {
            return refuse("holds no run to resume (no `latest` file and no checkpoint); start the run without `--resume`".into());
        }
        Claim::New | Claim::Overwrite if !holds_run && !is_claimable(path) => {
            return refuse(format!(
                "holds files that are not a burn-moe run ({}); a run writes only into a new or empty folder or its own: choose another `--out`",
                some_files(path)
            ));
        }
        _ => {}
    }
    Ok(holds_run)
}

/// Whether a run may start in `path` without removing anything of someone else's: it does not
/// exist, holds nothing but a lock or a killed write's staging files, or a run claimed it.
fn is_claimable(path: &Path) -> bool {
    claimed_by_a_run(path) || foreign_files(path).is_empty()
}

/// Whether a run claimed `path` ([`MARKER_FILE`]).
fn claimed_by_a_run(path: &Path) -> bool {
    path.join(MARKER_FILE).is_file()
}

/// Whether `name` is the staging file or folder of a write that did not finish
/// (`.NAME.partial`), which claiming a run folder removes.
fn is_staging(name: &str) -> bool {
    name.starts_with('.') && name.contains(".partial")
}

/// The names of the entries of `path` that are not a run's lock or staging files, sorted.
fn foreign_files(path: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .filter(|name| name != LOCK_FILE && !is_staging(name))
        .collect();
    names.sort();
    names
}

/// A few of the files of `path`, for a message: `a, b, c and 4 more`.
fn some_files(path: &Path) -> String {
    let names = foreign_files(path);
    let shown = names
        .iter()
        .take(NAMED_FILES)
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ");
    match names.len().saturating_sub(NAMED_FILES) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// Refuses a folder inside a run folder (its checkpoints, or any folder below it): a run
/// never writes into another run.
fn check_not_inside_a_run(path: &Path) -> Result<()> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for above in absolute.ancestors().skip(1) {
        if holds_run(above) || claimed_by_a_run(above) {
            return Err(TrainError::RunFolder {
                path: path.to_path_buf(),
                reason: format!(
                    "is inside the run folder {}; a run is written into a folder of its own: choose an `--out` outside it",
                    above.display()
                ),
            });
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temporary folder.
    fn scratch(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("run-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        path
    }

    /// A run as the trainer leaves it: `latest`, metrics, config, a plot and a checkpoint.
    fn fake_run(path: &Path) {
        std::fs::create_dir_all(path.join("checkpoints/step-00000004")).unwrap();
        for name in ["latest", "metrics.jsonl", "config.json", "loss.png"] {
            std::fs::write(path.join(name), "run").unwrap();
        }
    }

    fn refusal(result: Result<RunDir>) -> String {
        match result {
            Err(error) => error.to_string(),
            Ok(_) => panic!("the claim was accepted"),
        }
    }

    #[test]
    fn a_new_run_refuses_a_folder_of_someone_elses_files() {
        let path = scratch("foreign");
        for name in ["config.json", "metrics.jsonl", "loss.png", "notes.txt"] {
            std::fs::write(path.join(name), "mine").unwrap();
        }
        for claim in [Claim::New, Claim::Overwrite] {
            let message = refusal(RunDir::claim(&path, claim));
            assert!(message.contains("not a burn-moe run"), "{message}");
            assert!(message.contains("`config.json`, `loss.png`, `metrics.jsonl` and 1 more"));
        }
        for name in ["config.json", "metrics.jsonl", "loss.png", "notes.txt"] {
            assert_eq!(std::fs::read_to_string(path.join(name)).unwrap(), "mine");
        }
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn overwrite_removes_the_run_files_and_nothing_else() {
        let path = scratch("overwrite");
        fake_run(&path);
        std::fs::write(path.join("figure.png"), "mine").unwrap();
        let run = RunDir::claim(&path, Claim::Overwrite).expect("a run folder");
        drop(run);
        assert!(!path.join("checkpoints").exists());
        for name in ["latest", "metrics.jsonl", "config.json", "loss.png"] {
            assert!(!path.join(name).exists(), "{name} stayed");
        }
        assert_eq!(
            std::fs::read_to_string(path.join("figure.png")).unwrap(),
            "mine"
        );
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn a_run_that_stopped_before_its_first_checkpoint_can_start_again() {
        let path = scratch("restart");
        drop(RunDir::claim(&path, Claim::New).expect("an empty folder"));
        // What the first start wrote before it stopped.
        std::fs::write(path.join("metrics.jsonl"), "stale").unwrap();
        std::fs::write(path.join("config.json"), "stale").unwrap();
        drop(RunDir::claim(&path, Claim::New).expect("the folder a run claimed"));
        assert!(!path.join("metrics.jsonl").exists());
        assert!(!path.join("config.json").exists());
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn no_run_goes_inside_another() {
        let path = scratch("nested");
        fake_run(&path);
        for inner in ["checkpoints", "checkpoints/new", "finetune"] {
            let message = refusal(RunDir::claim(&path.join(inner), Claim::New));
            assert!(
                message.contains("inside the run folder"),
                "{inner}: {message}"
            );
        }
        assert!(!path.join("finetune").exists());
        std::fs::remove_dir_all(&path).unwrap();
    }
}
