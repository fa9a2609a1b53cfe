//! The metrics log: one JSON object per line in `metrics.jsonl` of the run folder.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io, Result};

/// A training row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRow {
    /// Optimizer step.
    pub step: usize,
    /// Cross-entropy plus auxiliary loss.
    pub loss: f64,
    /// Cross-entropy.
    pub cross_entropy: f64,
    /// Auxiliary loss (summed over MoE layers).
    pub aux_loss: f64,
    /// Learning rate.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training throughput since the previous row.
    pub tokens_per_second: f64,
    /// Share of each expert's processed assignments, per MoE layer (`[layer][expert]`, rows sum
    /// to 1).
    pub expert_load: Vec<Vec<f64>>,
    /// Share of assignments dropped by capacity, per MoE layer.
    pub dropped: Vec<f64>,
    /// Expert load of image positions only (multimodal runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_expert_load: Option<Vec<Vec<f64>>>,
    /// Expert load of text positions only (multimodal runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_expert_load: Option<Vec<Vec<f64>>>,
    /// The loss scale after this step (mixed precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Steps skipped so far for a gradient that overflowed (mixed precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
    /// Steps skipped so far for a non-finite loss or gradient (`--on-nonfinite skip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub non_finite_skipped: Option<u64>,
}

/// An evaluation row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    /// Optimizer step.
    pub step: usize,
    /// Validation cross-entropy.
    pub val_loss: f64,
    /// `exp(val_loss)`.
    pub val_perplexity: f64,
    /// Training seconds up to this step (evaluations left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
    /// Share of validation images captioned right (captioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Row {
    /// Training progress.
    Train(TrainRow),
    /// Validation.
    Eval(EvalRow),
}

impl Row {
    /// The row's step.
    pub fn step(&self) -> usize {
        match self {
            Row::Train(row) => row.step,
            Row::Eval(row) => row.step,
        }
    }
}

/// Appends rows to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log of `run_dir` for appending. A new run (`resume_step` `None`) starts an
    /// empty log. A resumed run keeps the rows up to `resume_step` and drops those after it
    /// (what the interrupted run logged after its last checkpoint, which the resumed run logs
    /// again); that rewrite goes to a staging file renamed over the log, so a process killed
    /// meanwhile leaves the old log or the new one, never a truncated one.
    pub fn open(run_dir: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        match resume_step {
            None => {
                File::create(&path).map_err(io(&path))?;
            }
            Some(step) => {
                let text = match std::fs::read(&path) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Err(_) => String::new(),
                };
                let lines: Vec<&str> = text.lines().collect();
                let keep = |line: &&str| {
                    serde_json::from_str::<Row>(line).is_ok_and(|row| row.step() <= step)
                };
                let kept: Vec<&str> = lines.iter().copied().filter(keep).collect();
                // Rewrite when rows go, or when the last line was cut short by a kill (appending
                // to it would spoil the next row).
                if kept.len() != lines.len() || !(text.is_empty() || text.ends_with('\n')) {
                    let staging = run_dir.join(".metrics.jsonl.partial");
                    let mut file = File::create(&staging).map_err(io(&staging))?;
                    for line in kept {
                        writeln!(file, "{line}").map_err(io(&staging))?;
                    }
                    file.sync_all().map_err(io(&staging))?;
                    std::fs::rename(&staging, &path).map_err(io(&path))?;
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Self { path, file })
    }

    /// Appends a row.
    pub fn write(&mut self, row: &Row) -> Result<()> {
        writeln!(
            self.file,
            "{}",
            serde_json::to_string(row).expect("rows serialise")
        )
        .map_err(io(&self.path))
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a metrics log (missing file: no rows; unreadable lines are skipped).
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let Ok(file) = File::open(path) else {
        return Ok(Vec::new());
    };
    Ok(BufReader::new(file)
        .lines()
        .map_while(|line| line.ok())
        .filter_map(|line| serde_json::from_str(&line).ok())
        .collect())
}
