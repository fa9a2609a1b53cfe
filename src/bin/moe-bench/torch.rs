//! W4: runs `bench/torch_moe.py` (PyTorch eager, same shapes, threads and dtype) and reads its
//! JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// One PyTorch W1 row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchLayerRow {
    /// "loop", "sorted" or "dense".
    pub form: String,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// "dropless", "capacity 1.25" or "-".
    pub capacity: String,
    /// Median seconds.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_second: f64,
}

/// One PyTorch W2 row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchStepRow {
    /// Preset.
    pub preset: String,
    /// Median seconds per step.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_second: f64,
    /// Parameters of the PyTorch model.
    pub parameters: usize,
}

/// The script's output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchResults {
    /// torch version.
    pub torch: String,
    /// Threads torch used.
    pub threads: usize,
    /// W1 rows.
    pub w1: Vec<TorchLayerRow>,
    /// W2 rows.
    pub w2: Vec<TorchStepRow>,
}

/// The Python of `bench/.venv` if it exists.
pub fn default_python(root: &Path) -> Option<PathBuf> {
    let python = root.join("bench/.venv/bin/python");
    python.exists().then_some(python)
}

/// Runs the script; `Err` says why there are no PyTorch figures.
pub fn run(
    python: &Path,
    script: &Path,
    threads: usize,
    experts: &[usize],
    quick: bool,
) -> Result<TorchResults, String> {
    let output_file =
        std::env::temp_dir().join(format!("moe-bench-torch-{}.json", std::process::id()));
    let mut command = Command::new(python);
    command
        .arg(script)
        .args(["--threads", &threads.to_string(), "--json"])
        .arg(&output_file)
        .arg("--experts")
        .args(experts.iter().map(|e| e.to_string()));
    if quick {
        command.args(["--warmup", "1", "--repeats", "1", "--presets", "tiny"]);
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !status.success() {
        return Err(format!(
            "{} {} failed ({status})",
            python.display(),
            script.display()
        ));
    }
    let text = std::fs::read_to_string(&output_file).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&output_file);
    serde_json::from_str(&text).map_err(|e| format!("unreadable output of the script: {e}"))
}
