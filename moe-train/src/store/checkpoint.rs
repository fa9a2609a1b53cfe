//! Checkpoints: everything needed to continue a run exactly, written so that a crash never
//! leaves a broken one.
//!
//! A run folder holds `checkpoints/step-00000500/` folders and a `latest` file naming the
//! newest. Each checkpoint is written into a temporary folder, every file and the folder are
//! synced to disk, and only then is it renamed into place and `latest` replaced (also by
//! rename). The last `keep` checkpoints are kept.
//!
//! Each checkpoint records every file's size and SHA-256 twice: `state.json` holds those of the
//! files written before it, and the manifest written last (`manifest.json`) those of every file,
//! `state.json` included. A file damaged, swapped or deleted afterwards is named when the
//! checkpoint is opened ([`open`]), together with the run's intact older checkpoints, and deleting
//! the manifest does not remove the proof: `state.json` still holds it (deleting `state.json`
//! leaves the checkpoint incomplete). A checkpoint with neither record is refused unless the caller
//! skips the check ([`Verify::Skipped`], `--no-verify`). A text run's checkpoint also records what
//! it trained on ([`DataRecord`]: the corpus's checksum and the validation split), so that
//! evaluating or resuming it refuses a corpus that changed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use moe_core::lora;
use moe_core::placement::ShardedParam;
use serde::{Deserialize, Serialize};

use super::manifest::{checksums_of, file_entry};
pub use super::manifest::{verify, FileEntry, Manifest};
use crate::config::TrainConfig;
use crate::data::tokenizer::Tokenizer;
use crate::error::{catch_panic_quietly, io, Result, TrainError};
use crate::store::sharded_state;
use crate::training::loss_scale::LossScaleState;

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
/// The LoRA adapters of a LoRA run, in place of [`MODEL_FILE`]: the rest of the model is the
/// Hugging Face model the run adapts, read from its folder.
pub const ADAPTERS_FILE: &str = "adapters.bpk";
/// Optimizer state.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// [`TrainingState`].
pub const STATE_FILE: &str = "state.json";
/// The resolved [`TrainConfig`].
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// [`DataRecord`]: what a text run trained on.
pub const DATA_FILE: &str = "data.json";
/// [`Manifest`]: every other file's size and checksum, written last.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What `state.json` holds: the [`TrainingState`] and the checksums of the files written
/// before it (the second record besides the manifest).
#[derive(Serialize)]
struct StateFileOut<'a> {
    #[serde(flatten)]
    state: &'a TrainingState,
    files: &'a BTreeMap<String, FileEntry>,
}

/// Whether opening a checkpoint checks its files against their recorded checksums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Verify {
    /// Every file is checked against both records; a checkpoint with no record of its
    /// checksums is refused.
    #[default]
    Checked,
    /// Nothing is checked (`--no-verify`): for a checkpoint with no checksums whose files the
    /// user vouches for. Damage then shows only where a reader notices it.
    Skipped,
}

/// What a text run trained on: enough to refuse a corpus that changed and to rebuild the
/// same validation split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRecord {
    /// The corpus file or folder, as an absolute path.
    pub source: PathBuf,
    /// Documents in the corpus.
    pub documents: usize,
    /// SHA-256 of the documents' texts ([`crate::data::corpus::Corpus::checksum`]).
    pub sha256: String,
    /// Indices (in source order) of the validation documents.
    pub validation: Vec<usize>,
}

/// Everything a checkpoint holds.
pub struct CheckpointParts<'a, M: Module> {
    /// The model.
    pub model: &'a M,
    /// The optimizer.
    pub optimizer: &'a ModuleOptimizer,
    /// The model's placed expert parameters (empty when none are), whose optimizer state is
    /// saved gathered ([`crate::store::sharded_state`]).
    pub sharded: &'a [ShardedParam],
    /// Step, data position, ...
    pub state: &'a TrainingState,
    /// The run's config.
    pub config: &'a TrainConfig,
    /// The tokenizer (text runs).
    pub tokenizer: Option<&'a Tokenizer>,
    /// What the run trained on (text runs).
    pub data: Option<&'a DataRecord>,
}

/// Writes a checkpoint for `parts.state.step` into `run_dir`, points `latest` at it and
/// removes all but the newest `keep` checkpoints. Returns its folder.
///
/// A save that fails leaves the run as it was (the partial folder removed, `latest` naming
/// the previous checkpoint) and says so in its error, with the cause and how to continue.
pub fn save<M: Module>(
    run_dir: &Path,
    parts: CheckpointParts<'_, M>,
    keep: usize,
) -> Result<PathBuf> {
    let folder = run_dir.join("checkpoints");
    let step = parts.state.step;
    let name = format!("step-{step:08}");
    let target = folder.join(&name);
    let staging = folder.join(format!(".{name}.partial-{}", std::process::id()));
    if let Err(cause) = write_into_place(&staging, &target, parts) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(save_failed(run_dir, step, &target, cause));
    }
    write_latest(run_dir, &name).map_err(|cause| TrainError::Checkpoint {
        path: run_dir.join("latest"),
        reason: format!(
            "the checkpoint of step {step} was saved in {}, but `latest` could not be pointed at it ({cause}); write `checkpoints/{name}` into {} to resume from it",
            target.display(),
            run_dir.join("latest").display()
        ),
    })?;
    prune(&folder, keep.max(1), &name)?;
    Ok(target)
}

/// The error of a save that failed with `cause`: what was being saved, that the run's
/// checkpoints are as they were, and how to continue once the cause is fixed.
fn save_failed(run_dir: &Path, step: usize, target: &Path, cause: TrainError) -> TrainError {
    let previous = std::fs::read_to_string(run_dir.join("latest"))
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty());
    let kept = match previous {
        Some(name) => format!(
            "nothing saved before was touched: `latest` still names {name}, and `burn-moe train --resume --out {}` continues from it once the cause is fixed (free disk space, a writable folder)",
            run_dir.display()
        ),
        None => "the run has no earlier checkpoint; fix the cause (free disk space, a writable folder) and train again".into(),
    };
    TrainError::Checkpoint {
        path: target.to_path_buf(),
        reason: format!("could not save the checkpoint of step {step}: {cause}; {kept}"),
    }
}

/// Writes every file of the checkpoint into `staging`, syncs them, and renames the folder to
/// `target` (replacing a folder of the same step).
fn write_into_place<M: Module>(
    staging: &Path,
    target: &Path,
    parts: CheckpointParts<'_, M>,
) -> Result<()> {
    let folder = target.parent().expect("a checkpoint folder has a parent");
    std::fs::create_dir_all(folder).map_err(io(folder))?;
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(io(staging))?;
    }
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    write_parts(staging, &parts)?;
    write_records(staging, parts.state)?;
    if target.exists() {
        std::fs::remove_dir_all(target).map_err(io(target))?;
    }
    std::fs::rename(staging, target).map_err(io(target))?;
    sync(folder)
}

/// Writes the model (or its adapters), optimizer state, config, tokenizer and data record.
fn write_parts<M: Module>(staging: &Path, parts: &CheckpointParts<'_, M>) -> Result<()> {
    let record_error = |path: &Path, error: burn::store::RecordError| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("could not write: {error}"),
    };
    // A model with LoRA adapters saves them alone: its frozen weights are its base model's.
    let (model_path, record) = if lora::adapter_count(parts.model) > 0 {
        let record = parts.model.clone().into_record_group(lora::adapter_group());
        (staging.join(ADAPTERS_FILE), record)
    } else {
        (staging.join(MODEL_FILE), parts.model.clone().into_record())
    };
    record
        .save(&model_path)
        .map_err(|e| record_error(&model_path, e))?;
    let optimizer_path = staging.join(OPTIMIZER_FILE);
    if parts.sharded.is_empty() {
        parts
            .optimizer
            .save(&optimizer_path)
            .map_err(|e| record_error(&optimizer_path, e))?;
    } else {
        let bytes = parts
            .optimizer
            .into_bytes()
            .map_err(|e| record_error(&optimizer_path, e))?;
        let gathered = sharded_state::gather(bytes, parts.sharded).map_err(|reason| {
            TrainError::Checkpoint {
                path: optimizer_path.clone(),
                reason: format!("could not gather the placed experts' optimizer state: {reason}"),
            }
        })?;
        std::fs::write(&optimizer_path, &gathered[..]).map_err(io(&optimizer_path))?;
    }
    write_json(&staging.join(CONFIG_FILE), parts.config)?;
    if let Some(tokenizer) = parts.tokenizer {
        tokenizer.save(&staging.join(TOKENIZER_FILE))?;
    }
    if let Some(data) = parts.data {
        write_json(&staging.join(DATA_FILE), data)?;
    }
    Ok(())
}

/// Writes `state.json` with the checksums of the files written so far, then the manifest
/// with every file's, `state.json`'s included: the two records [`verify`] checks.
fn write_records(staging: &Path, state: &TrainingState) -> Result<()> {
    let mut files = checksums_of(staging)?;
    let state_path = staging.join(STATE_FILE);
    write_json(
        &state_path,
        &StateFileOut {
            state,
            files: &files,
        },
    )?;
    sync(&state_path)?;
    files.insert(STATE_FILE.to_string(), file_entry(&state_path)?);
    let manifest = Manifest { files };
    let manifest_path = staging.join(MANIFEST_FILE);
    write_json(&manifest_path, &manifest)?;
    sync(&manifest_path)?;
    sync(staging)
}

/// The checkpoint folder for `path`: `path` itself if it is a checkpoint folder, or the one its
/// `latest` file names (a run folder).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    if [MODEL_FILE, ADAPTERS_FILE, MANIFEST_FILE]
        .iter()
        .any(|file| path.join(file).exists())
    {
        return Err(incomplete(path, STATE_FILE));
    }
    let latest = path.join("latest");
    let Ok(name) = std::fs::read_to_string(&latest) else {
        if !intact_checkpoints(path, None).is_empty() {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!(
                    "the run folder's `latest` file is missing{}",
                    alternatives(path, None)
                ),
            });
        }
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: "no checkpoint here (neither a checkpoint folder with state.json nor a run folder with a `latest` file)".into(),
        });
    };
    if name.trim().is_empty() {
        return Err(TrainError::Checkpoint {
            path: latest,
            reason: format!(
                "`latest` is empty, so it names no checkpoint (a write cut short?){}",
                alternatives(path, None)
            ),
        });
    }
    let folder = path.join(name.trim());
    if !folder.is_dir() {
        return Err(TrainError::Checkpoint {
            path: folder,
            reason: format!(
                "`latest` names a checkpoint that is not there{}",
                alternatives(path, None)
            ),
        });
    }
    if !folder.join(STATE_FILE).exists() {
        return Err(incomplete(&folder, STATE_FILE));
    }
    Ok(folder)
}

fn incomplete(folder: &Path, file: &str) -> TrainError {
    TrainError::Checkpoint {
        path: folder.to_path_buf(),
        reason: format!(
            "the checkpoint is incomplete: {file} is missing (deleted after it was written){}",
            alternatives_of(folder)
        ),
    }
}

/// A checkpoint opened for reading: its folder, checked against its manifest, and its state.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The checkpoint folder.
    pub folder: PathBuf,
    /// Its training state.
    pub state: TrainingState,
    /// The run's config.
    pub config: TrainConfig,
    /// What it trained on (text runs written since the record exists).
    pub data: Option<DataRecord>,
}

/// Resolves `path` ([`resolve`]), checks every file against its recorded checksums
/// ([`verify`], unless `check` is [`Verify::Skipped`]) and reads the state, config and data
/// record. Errors name the file at fault and the run's intact older checkpoints.
pub fn open(path: &Path, check: Verify) -> Result<Opened> {
    let folder = resolve(path)?;
    if check == Verify::Checked {
        verify(&folder).map_err(|error| with_alternatives(error, &folder))?;
    }
    let (state, config) = read_state(&folder).map_err(|error| with_alternatives(error, &folder))?;
    let data_path = folder.join(DATA_FILE);
    let data = if data_path.exists() {
        Some(read_json(&data_path).map_err(|error| with_alternatives(error, &folder))?)
    } else {
        None
    };
    Ok(Opened {
        folder,
        state,
        config,
        data,
    })
}

/// The run config of the checkpoint `path` resolves to, read without checking the files
/// against the manifest (what `train --resume` reads before the trainer opens the checkpoint
/// with [`open`], which checks them: hashing a large model once is enough).
pub fn read_config(path: &Path) -> Result<TrainConfig> {
    let folder = resolve(path)?;
    read_run_config(&folder.join(CONFIG_FILE)).map_err(|error| with_alternatives(error, &folder))
}

/// The other checkpoints of the run that `folder` belongs to which pass [`verify`].
pub fn intact_checkpoints(run_dir: &Path, except: Option<&Path>) -> Vec<PathBuf> {
    let folder = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("step-"))
        .map(|entry| entry.path())
        .filter(|path| Some(path.as_path()) != except)
        .filter(|path| path.join(STATE_FILE).exists() && verify(path).is_ok())
        .collect();
    found.sort();
    found.reverse();
    found
}

/// A sentence naming the intact checkpoints of `run_dir` other than `except` (empty if none).
fn alternatives(run_dir: &Path, except: Option<&Path>) -> String {
    let intact = intact_checkpoints(run_dir, except);
    if intact.is_empty() {
        return ". The run has no other intact checkpoint".into();
    }
    let names: Vec<String> = intact.iter().map(|p| p.display().to_string()).collect();
    format!(
        ". Intact checkpoints of this run, newest first: {}; pass one as `--checkpoint`, or name it in `{}` to resume from it",
        names.join(", "),
        run_dir.join("latest").display()
    )
}

/// The intact checkpoints of the run a checkpoint folder (`RUN/checkpoints/step-N`) belongs to,
/// as a sentence that names them for `--checkpoint` (empty when there are none).
pub fn alternatives_of(checkpoint: &Path) -> String {
    match checkpoint.parent().and_then(Path::parent) {
        Some(run_dir) if run_dir.join("checkpoints").is_dir() => {
            alternatives(run_dir, Some(checkpoint))
        }
        _ => String::new(),
    }
}

fn with_alternatives(error: TrainError, folder: &Path) -> TrainError {
    match error {
        TrainError::Checkpoint { path, reason } => TrainError::Checkpoint {
            path,
            reason: format!("{reason}{}", alternatives_of(folder)),
        },
        other => other,
    }
}

/// Reads a checkpoint's state and config.
pub fn read_state(folder: &Path) -> Result<(TrainingState, TrainConfig)> {
    Ok((
        read_json(&folder.join(STATE_FILE))?,
        read_run_config(&folder.join(CONFIG_FILE))?,
    ))
}

/// Loads the model weights of a checkpoint into `model` (built from the checkpoint's config
/// and tokenizer). A model with LoRA adapters (its base weights already loaded) takes the
/// checkpoint's adapters, which must be exactly its own.
pub fn load_model<M: Module>(folder: &Path, model: M) -> Result<M> {
    let adapters = lora::adapter_count(&model);
    let file = if adapters > 0 {
        ADAPTERS_FILE
    } else {
        MODEL_FILE
    };
    let path = folder.join(file);
    if !path.exists() {
        return Err(incomplete(folder, file));
    }
    let read = || -> std::result::Result<M, burn::store::RecordError> {
        let record = ModuleRecord::load(&path)?;
        if adapters == 0 {
            return model.try_load_record(record);
        }
        if record.len() != 2 * adapters {
            return Err(burn::store::RecordError::Validation(format!(
                "it holds {} adapter factors; the model's LoRA settings give {}",
                record.len(),
                2 * adapters
            )));
        }
        model.try_load_record(record.allow_partial(true))
    };
    match catch_reader_panic(read) {
        Ok(Ok(model)) => Ok(model),
        Ok(Err(error)) => Err(TrainError::Checkpoint {
            path,
            reason: format!(
                "does not fit the model that {CONFIG_FILE} and {TOKENIZER_FILE} beside it describe, or is damaged: {error}{}",
                alternatives_of(folder)
            ),
        }),
        Err(message) => Err(TrainError::Checkpoint {
            path,
            reason: format!("damaged ({message}){}", alternatives_of(folder)),
        }),
    }
}

/// Runs a record reader that may panic on damaged input instead of failing (Burn's readers do
/// for some damage), turning the panic into its message, without printing it.
fn catch_reader_panic<T>(read: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_panic_quietly(read).map_err(|text| format!("its reader failed: {text}"))
}

/// Loads the optimizer state of a checkpoint into `optimizer`, the gathered state of placed
/// experts cut into their shards' (`sharded`, empty when no experts are placed).
pub fn load_optimizer(
    folder: &Path,
    optimizer: ModuleOptimizer,
    sharded: &[ShardedParam],
) -> Result<ModuleOptimizer> {
    let path = folder.join(OPTIMIZER_FILE);
    let broken = |reason: String| TrainError::Checkpoint {
        path: path.clone(),
        reason: format!("{reason}{}", alternatives_of(folder)),
    };
    let bytes =
        std::fs::read(&path).map_err(|error| broken(format!("broken optimizer state: {error}")))?;
    let mut bytes = Bytes::from_bytes_vec(bytes);
    if !sharded.is_empty() {
        bytes = sharded_state::split(bytes, sharded)
            .map_err(|reason| broken(format!("broken optimizer state: {reason}")))?;
    }
    match catch_reader_panic(|| optimizer.from_bytes(bytes)) {
        Ok(Ok(optimizer)) => Ok(optimizer),
        Ok(Err(error)) => Err(broken(format!("broken optimizer state: {error}"))),
        Err(message) => Err(broken(format!("damaged optimizer state ({message})"))),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_string_pretty(value).expect("checkpoint parts serialise");
    std::fs::write(path, json).map_err(io(path))
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|error| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot read: {error}"),
    })?;
    serde_json::from_str(&text).map_err(|error| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("broken: {error}"),
    })
}

/// A saved run config, in today's layout or an earlier release's
/// ([`TrainConfig::from_saved`]).
fn read_run_config(path: &Path) -> Result<TrainConfig> {
    TrainConfig::from_saved(read_json(path)?).map_err(|error| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("broken: {error}"),
    })
}

pub(super) fn sync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Removes old `step-*` folders, keeping the newest `keep` and `current`.
fn prune(folder: &Path, keep: usize, current: &str) -> Result<()> {
    let names = checkpoint_names(folder)?;
    let excess = names.len().saturating_sub(keep);
    for name in names.into_iter().take(excess) {
        if name != current {
            let path = folder.join(&name);
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Removes all but the newest `keep` checkpoints of `run_dir`.
pub fn prune_run(run_dir: &Path, keep: usize) -> Result<()> {
    let folder = run_dir.join("checkpoints");
    prune(&folder, keep.max(1), "")
}

/// The `step-*` folder names in `folder`, oldest first.
fn checkpoint_names(folder: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .map_err(io(folder))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with("step-"))
        .collect();
    names.sort();
    Ok(names)
}

/// The step a `step-00000500` folder name stands for.
fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// After a divergence whose first non-finite step is `bad_step`: the checkpoints of steps
/// `bad_step - 1` and later hold the weights that gave the non-finite values, so they are moved
/// to `checkpoints/diverged-step-N` and `latest` points again at the newest one before them.
/// Nothing moves when no older checkpoint is left. Returns the folders moved.
pub fn set_aside_from(run_dir: &Path, bad_step: usize) -> Result<Vec<PathBuf>> {
    let folder = run_dir.join("checkpoints");
    let Ok(names) = checkpoint_names(&folder) else {
        return Ok(Vec::new());
    };
    let (older, suspect): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| step_of(name).is_some_and(|step| step + 1 < bad_step));
    let Some(newest_older) = older.last() else {
        return Ok(Vec::new());
    };
    write_latest(run_dir, newest_older)?;
    let mut moved = Vec::new();
    for name in suspect {
        let from = folder.join(&name);
        let to = folder.join(format!("diverged-{name}"));
        if to.exists() {
            std::fs::remove_dir_all(&to).map_err(io(&to))?;
        }
        std::fs::rename(&from, &to).map_err(io(&to))?;
        moved.push(to);
    }
    sync(&folder)?;
    Ok(moved)
}

/// Points `latest` at `checkpoints/name`, by writing a staging file renamed over it.
fn write_latest(run_dir: &Path, name: &str) -> Result<()> {
    let latest = run_dir.join("latest");
    let latest_staging = run_dir.join(".latest.partial");
    {
        let mut file = File::create(&latest_staging).map_err(io(&latest_staging))?;
        file.write_all(format!("checkpoints/{name}\n").as_bytes())
            .map_err(io(&latest_staging))?;
        file.sync_all().map_err(io(&latest_staging))?;
    }
    std::fs::rename(&latest_staging, &latest).map_err(io(&latest))?;
    sync(run_dir)
}
