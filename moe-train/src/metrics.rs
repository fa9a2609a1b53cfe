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
    /// Opens the log of `run_dir`, dropping rows after `resume_step` (a resumed run rewrites
    /// what the interrupted one logged after its last checkpoint); `None` starts afresh.
    pub fn open(run_dir: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let kept: Vec<Row> = match resume_step {
            Some(step) => read(&path)?
                .into_iter()
                .filter(|row| row.step() <= step)
                .collect(),
            None => Vec::new(),
        };
        let mut file = File::create(&path).map_err(io(&path))?;
        for row in &kept {
            writeln!(
                file,
                "{}",
                serde_json::to_string(row).expect("rows serialise")
            )
            .map_err(io(&path))?;
        }
        drop(file);
        let file = OpenOptions::new()
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
