//! Checkpoints: everything needed to continue a run exactly, written so that a crash never
//! leaves a broken one.
//!
//! A run folder holds `checkpoints/step-00000500/` folders and a `latest` file naming the
//! newest. Each checkpoint is written into a temporary folder, every file and the folder are
//! synced to disk, and only then is it renamed into place and `latest` replaced (also by
//! rename). The last `keep` checkpoints are kept.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{io, Result, TrainError};
use crate::loss_scale::LossScaleState;
use crate::tokenizer::Tokenizer;

/// The training state besides model and optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps done.
    pub step: usize,
    /// State of the data sampler's generator (the data position).
    pub data_rng: u64,
    /// Tokens trained on so far.
    pub tokens_seen: u64,
    /// Training seconds so far.
    pub elapsed_seconds: f64,
    /// The dynamic loss scale of a mixed-precision run (absent in f32 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScaleState>,
}

/// File names inside a checkpoint folder.
pub const MODEL_FILE: &str = "model.bpk";
/// Optimizer state.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// [`TrainingState`].
pub const STATE_FILE: &str = "state.json";
/// The resolved [`TrainConfig`].
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Everything a checkpoint holds.
pub struct CheckpointParts<'a, M: Module> {
    /// The model.
    pub model: &'a M,
    /// The optimizer.
    pub optimizer: &'a ModuleOptimizer,
    /// Step, data position, ...
    pub state: &'a TrainingState,
    /// The run's config.
    pub config: &'a TrainConfig,
    /// The tokenizer (text runs).
    pub tokenizer: Option<&'a Tokenizer>,
}

/// Writes a checkpoint for `parts.state.step` into `run_dir`, points `latest` at it and
/// removes all but the newest `keep` checkpoints. Returns its folder.
pub fn save<M: Module>(
    run_dir: &Path,
    parts: CheckpointParts<'_, M>,
    keep: usize,
) -> Result<PathBuf> {
    let folder = run_dir.join("checkpoints");
    std::fs::create_dir_all(&folder).map_err(io(&folder))?;
    let name = format!("step-{:08}", parts.state.step);
    let target = folder.join(&name);
    let staging = folder.join(format!(".{name}.partial-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;

    let record_error = |path: &Path, error: burn::store::RecordError| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("could not write: {error}"),
    };
    let model_path = staging.join(MODEL_FILE);
    parts
        .model
        .clone()
        .save_file(&model_path)
        .map_err(|e| record_error(&model_path, e))?;
    let optimizer_path = staging.join(OPTIMIZER_FILE);
    parts
        .optimizer
        .save(&optimizer_path)
        .map_err(|e| record_error(&optimizer_path, e))?;
    write_json(&staging.join(STATE_FILE), parts.state)?;
    write_json(&staging.join(CONFIG_FILE), parts.config)?;
    if let Some(tokenizer) = parts.tokenizer {
        tokenizer.save(&staging.join(TOKENIZER_FILE))?;
    }
    for entry in std::fs::read_dir(&staging).map_err(io(&staging))? {
        let path = entry.map_err(io(&staging))?.path();
        sync(&path)?;
    }
    sync(&staging)?;

    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io(&target))?;
    }
    std::fs::rename(&staging, &target).map_err(io(&target))?;
    sync(&folder)?;

    let latest = run_dir.join("latest");
    let latest_staging = run_dir.join(".latest.partial");
    {
        let mut file = File::create(&latest_staging).map_err(io(&latest_staging))?;
        file.write_all(format!("checkpoints/{name}\n").as_bytes())
            .map_err(io(&latest_staging))?;
        file.sync_all().map_err(io(&latest_staging))?;
    }
    std::fs::rename(&latest_staging, &latest).map_err(io(&latest))?;
    sync(run_dir)?;

    prune(&folder, keep.max(1), &name)?;
    Ok(target)
}

/// The checkpoint folder for `path`: `path` itself if it holds a checkpoint, or the one its
/// `latest` file names (a run folder).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("latest");
    let missing = || {
        TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: "no checkpoint here (neither a checkpoint folder with state.json nor a run folder with a `latest` file)".into(),
    }
    };
    let name = std::fs::read_to_string(&latest).map_err(|_| missing())?;
    let folder = path.join(name.trim());
    if !folder.join(STATE_FILE).exists() {
        return Err(TrainError::Checkpoint {
            path: folder,
            reason: "`latest` names a checkpoint that is not there".into(),
        });
    }
    Ok(folder)
}

/// Reads a checkpoint's state and config.
pub fn read_state(folder: &Path) -> Result<(TrainingState, TrainConfig)> {
    Ok((
        read_json(&folder.join(STATE_FILE))?,
        read_json(&folder.join(CONFIG_FILE))?,
    ))
}

/// Loads the model weights of a checkpoint into `model`.
pub fn load_model<M: Module>(folder: &Path, model: M) -> Result<M> {
    let path = folder.join(MODEL_FILE);
    if !path.exists() {
        return Err(TrainError::Checkpoint {
            path,
            reason: "missing".into(),
        });
    }
    model
        .try_load_file(&path)
        .map_err(|error| TrainError::Checkpoint {
            path,
            reason: format!("broken or from another model: {error}"),
        })
}

/// Loads the optimizer state of a checkpoint into `optimizer`.
pub fn load_optimizer(folder: &Path, optimizer: ModuleOptimizer) -> Result<ModuleOptimizer> {
    let path = folder.join(OPTIMIZER_FILE);
    optimizer
        .load(&path)
        .map_err(|error| TrainError::Checkpoint {
            path,
            reason: format!("broken optimizer state: {error}"),
        })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(value).expect("checkpoint parts serialise");
    std::fs::write(path, json).map_err(io(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|error| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot read: {error}"),
    })?;
    serde_json::from_str(&text).map_err(|error| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("broken: {error}"),
    })
}

fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Removes old `step-*` folders, keeping the newest `keep` and `current`.
fn prune(folder: &Path, keep: usize, current: &str) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .map_err(io(folder))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with("step-"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for name in names.into_iter().take(excess) {
        if name != current {
            let path = folder.join(&name);
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}
