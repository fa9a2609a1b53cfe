//! The training loop: AdamW, warm-up and cosine schedule, global-norm clipping, gradient
//! accumulation, evaluation, metrics, plots and checkpoints, with exact resumption.
//!
//! Reproducibility: the data sampler's generator is part of every checkpoint, and the
//! device's generator (dropout, gate noise) is re-seeded from the run seed and the step number
//! at every step, so a resumed run continues with exactly the losses of an uninterrupted one
//! (on the CPU backends, which are deterministic).
//!
//! Safety: the run folder is claimed ([`crate::store::run_dir`]) before anything is written to it,
//! a non-finite loss or gradient stops the run (or skips the step) before it can replace a finite
//! checkpoint ([`crate::training::divergence`]), and a model and batch that cannot fit in memory
//! are refused before they are allocated ([`crate::runtime::memory`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::{DataConfig, TaskKind, TrainConfig};
use crate::data::tasks::digits::DigitsTask;
use crate::data::tasks::text::TextTask;
use crate::data::tasks::Task;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Result, TrainError};
use crate::runtime::backend::{self, Precision, SelectedDevice};
use crate::runtime::memory;
use crate::store::checkpoint::{self, DataRecord, TrainingState, Verify};
use crate::store::run_dir::{Claim, RunDir};
use crate::training::parallel::Layout;
use crate::training::replicas::DataParallelReport;
use crate::training::session::Session;

/// Keeps the data sampler's stream apart from other uses of the seed.
pub(super) const DATA_STREAM: u64 = 0xda7a_0000_0000_0002;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run folder (checkpoints, metrics, plots, config).
    pub out: PathBuf,
    /// Continue from the run folder's latest checkpoint.
    pub resume: bool,
    /// Start a new run in a folder that holds one, replacing it (without this, such a folder
    /// is refused).
    pub overwrite: bool,
    /// Draw progress bars and print progress lines.
    pub show_progress: bool,
    /// Set (by a Ctrl-C handler) to stop: a checkpoint is saved and the run returns.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Stop after this step as if interrupted (the schedule still spans `run.steps`), e.g. to
    /// train a long schedule in several sessions.
    pub stop_after: Option<usize>,
    /// Called after every step, once it is logged, evaluated and saved as due.
    pub on_step: Option<StepHook>,
    /// The credential `ws://` devices ask for (`burn-moe serve --token`); never saved.
    pub remote_token: Option<String>,
    /// Whether `resume` checks the checkpoint's files against their checksums.
    pub verify: Verify,
    /// At the end of a data-parallel run, read every replica's weights back and compare them
    /// with the first device's ([`DataParallelReport::replica_gap`]): a check for tests, which
    /// moves the replicated weights once more.
    pub compare_replicas: bool,
}

impl RunOptions {
    /// A new run into `out`, without progress output, interrupt or hook.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            overwrite: false,
            show_progress: false,
            interrupt: None,
            stop_after: None,
            on_step: None,
            remote_token: None,
            verify: Verify::Checked,
            compare_replicas: false,
        }
    }
}

/// A function the training loop calls after every step with the step's number: progress
/// reporting of one's own, or a test watching what each step does.
#[derive(Clone)]
pub struct StepHook(pub Arc<dyn Fn(usize) + Send + Sync>);

impl std::fmt::Debug for StepHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepHook")
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The device it ran on.
    pub device: String,
    /// One line about the data.
    pub data: String,
    /// The last optimizer step done.
    pub last_step: usize,
    /// `(step, cross-entropy)` of every logged step of this invocation.
    pub train_losses: Vec<(usize, f64)>,
    /// `(step, validation loss)` of every evaluation of this invocation.
    pub val_losses: Vec<(usize, f64)>,
    /// Share of validation images captioned right at the last evaluation (captioning).
    pub accuracy: Option<f64>,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// Stopped by the interrupt flag.
    pub interrupted: bool,
    /// Samples generated at the end (none when interrupted).
    pub samples: Vec<String>,
    /// Plots written.
    pub plots: Vec<PathBuf>,
    /// Training throughput over the whole invocation.
    pub tokens_per_second: f64,
    /// Parameters: total and active per token.
    pub parameters: (usize, usize),
    /// What the data-parallel replicas did (when each micro-batch was split over devices).
    pub data_parallel: Option<DataParallelReport>,
}

impl RunSummary {
    /// The summary of a run about to train on `device` from `last_step`, before anything is
    /// logged.
    pub(super) fn starting(
        device: String,
        data: String,
        last_step: usize,
        parameters: (usize, usize),
    ) -> Self {
        Self {
            device,
            data,
            last_step,
            train_losses: Vec::new(),
            val_losses: Vec::new(),
            accuracy: None,
            checkpoint: PathBuf::new(),
            interrupted: false,
            samples: Vec::new(),
            plots: Vec::new(),
            tokens_per_second: 0.0,
            parameters,
            data_parallel: None,
        }
    }
}

/// A checkpoint a run continues from.
pub struct Resumed {
    /// Its folder.
    pub folder: PathBuf,
    /// Its training state.
    pub state: TrainingState,
}

/// Trains as `config` says, or, with `options.resume`, continues the run in `options.out`
/// from its latest checkpoint (then `config` may differ from the saved one only in its `run`
/// section and in the learning rate and clipping).
pub fn train(mut config: TrainConfig, options: RunOptions) -> Result<RunSummary> {
    config.validate()?;
    let claim = match (options.resume, options.overwrite) {
        (true, _) => Claim::Resume,
        (false, true) => Claim::Overwrite,
        (false, false) => Claim::New,
    };
    let run_dir = RunDir::claim(&options.out, claim)?;
    config.data.make_paths_absolute()?;
    let opened = if options.resume {
        let opened = checkpoint::open(&options.out, options.verify)?;
        check_resumable(
            &config,
            &opened.config,
            opened.data.as_ref(),
            opened.state.step,
            options.show_progress,
        )?;
        check_corpus_is_there(&config)?;
        Some(opened)
    } else {
        None
    };
    let selected = if options.show_progress {
        backend::select_and_report(config.run.backend, config.run.precision)?
    } else {
        backend::select(config.run.backend, config.run.precision)?
    };
    let layout = Layout::open(
        &config.run.devices,
        config.run.parallel,
        &selected,
        options.remote_token.as_deref(),
    )?;
    let resumed = opened.as_ref().map(|opened| Resumed {
        folder: opened.folder.clone(),
        state: opened.state.clone(),
    });
    match config.task {
        TaskKind::Text => {
            let (tokenizer, record) = match (&opened, &config.variant.hf) {
                (Some(opened), _) => (
                    Some(Tokenizer::load(
                        &opened.folder.join(checkpoint::TOKENIZER_FILE),
                    )?),
                    opened.data.clone(),
                ),
                (None, Some(hf)) => {
                    let (_, _, json) = moe_models::hf::read_config(&hf.dir)?;
                    (Some(Tokenizer::load_hf(&hf.dir, &json)?), None)
                }
                (None, None) => (None, None),
            };
            // A new run from a Hugging Face model starts from its weights; a resumed one
            // from its checkpoint's.
            let task = TextTask::new(&config, tokenizer, record.as_ref(), options.show_progress)?
                .with_hf_weights(opened.is_none());
            let model = config.text_model_config(task.vocab_size());
            memory::check(&config, &model, selected.backend)?;
            if let Some(limits) = &selected.limits {
                memory::check_adapter(&config, &model, &selected.adapter, limits)?;
            }
            run(task, config, selected, layout, options, resumed, run_dir)
        }
        TaskKind::Caption | TaskKind::TextToImage => {
            if selected.precision != Precision::F32 {
                return Err(TrainError::Config(format!(
                    "`--precision {}` trains the text model; the multimodal model trains in f32 (use `--precision f32` with `--task {}`)",
                    selected.precision.name(),
                    if config.task == TaskKind::Caption { "caption" } else { "text-to-image" }
                )));
            }
            // The text model of the same shape stands in for the multimodal one's estimate.
            let vocab = moe_models::digits::TEXT_VOCAB.len() + config.data.image_levels;
            let model = config.text_model_config(vocab);
            memory::check(&config, &model, selected.backend)?;
            if let Some(limits) = &selected.limits {
                memory::check_adapter(&config, &model, &selected.adapter, limits)?;
            }
            let task = DigitsTask::new(&config, options.show_progress)?;
            run(task, config, selected, layout, options, resumed, run_dir)
        }
    }
}

/// Refuses to resume with settings that would make the run another one: a different task,
/// data, model or optimizer (except the learning rate and clipping, which a user may lower
/// after a divergence), or a step count the run has already reached.
fn check_resumable(
    config: &TrainConfig,
    saved: &TrainConfig,
    record: Option<&DataRecord>,
    step: usize,
    show_progress: bool,
) -> Result<()> {
    let fixed = |optim: &crate::config::OptimConfig| crate::config::OptimConfig {
        lr: 0.0,
        min_lr: 0.0,
        grad_clip: 0.0,
        ..optim.clone()
    };
    for (section, same) in [
        ("task", config.task == saved.task),
        (
            "data",
            same_data(&config.data, &saved.data, record.is_some()),
        ),
        ("model", config.model == saved.model),
        ("optim", fixed(&config.optim) == fixed(&saved.optim)),
    ] {
        if !same {
            return Err(TrainError::Config(format!(
                "`--resume` continues the saved run, but the `{section}` settings given differ from the saved ones; only the `run` settings (steps, backend, ...), the learning rate and clipping can change (start a new run with another `--out` to change the rest)"
            )));
        }
    }
    if show_progress {
        for (name, now, before) in [
            ("optim.lr", config.optim.lr, saved.optim.lr),
            ("optim.min_lr", config.optim.min_lr, saved.optim.min_lr),
            (
                "optim.grad_clip",
                config.optim.grad_clip,
                saved.optim.grad_clip,
            ),
        ] {
            if now != before {
                eprintln!("warning: resuming with `{name}` {now} instead of {before}: the run will no longer repeat an uninterrupted one");
            }
        }
    }
    if config.run.steps <= step {
        return Err(TrainError::Config(format!(
            "the run is already at step {step} and `--steps` is {}: give more steps to train further (`--steps` counts from the start of the run)",
            config.run.steps
        )));
    }
    Ok(())
}

/// Whether a resumed run's data settings are the saved ones. With a record of what the run
/// trained on (its corpus's checksum, checked when the corpus is read), the corpus file may
/// have moved: `--text` or `--jsonl` may name another path for the same content.
fn same_data(given: &DataConfig, saved: &DataConfig, recorded: bool) -> bool {
    let moved = recorded
        && given.text.is_some() == saved.text.is_some()
        && given.jsonl.is_some() == saved.jsonl.is_some();
    if !moved {
        return given == saved;
    }
    let at_saved_paths = DataConfig {
        text: saved.text.clone(),
        jsonl: saved.jsonl.clone(),
        ..given.clone()
    };
    &at_saved_paths == saved
}

/// Refuses a resumed run whose corpus file is gone, saying how to give its new place.
fn check_corpus_is_there(config: &TrainConfig) -> Result<()> {
    let data = &config.data;
    for (path, flag) in [(&data.text, "--text"), (&data.jsonl, "--jsonl")] {
        let Some(path) = path else { continue };
        if !path.exists() {
            return Err(TrainError::Config(format!(
                "the run's corpus {} is not there any more; if it moved, give its new place with `{flag}` (its content is checked against the checksum the run saved)",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Trains `task` (the loop behind [`train`]) in the claimed `run_dir`: sets up the model,
/// optimizer and state (`Session::start`), runs the steps (`Session::train_steps`), then
/// saves, prunes, plots and samples (`Session::finish`).
pub fn run<T: Task>(
    task: T,
    config: TrainConfig,
    selected: SelectedDevice,
    layout: Layout,
    options: RunOptions,
    resume: Option<Resumed>,
    run_dir: RunDir,
) -> Result<RunSummary> {
    let mut session = Session::start(
        &task,
        &config,
        &selected,
        layout,
        &options,
        resume.as_ref(),
        run_dir.path(),
    )?;
    let diverged = session.train_steps_watched()?;
    session.finish(diverged)
}

/// A loss as `eval` and `train` print it: six significant digits (`3.10740`, `0.0123457`),
/// enough to compare with another tool's figure; non-finite values as Rust writes them.
pub fn loss_digits(loss: f64) -> String {
    if !loss.is_finite() || loss == 0.0 {
        return format!("{loss}");
    }
    let magnitude = loss.abs().log10().floor() as i32;
    let decimals = (5 - magnitude).max(0) as usize;
    format!("{loss:.decimals$}")
}

/// `exp(loss)` for people: two decimals, or powers of ten once it is huge.
pub fn perplexity(loss: f64) -> String {
    let value = loss.exp();
    if value < 1e6 {
        format!("{value:.2}")
    } else {
        format!("{value:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::loss_digits;

    #[test]
    fn losses_print_with_six_significant_digits() {
        assert_eq!(loss_digits(3.107_432_1), "3.10743");
        assert_eq!(loss_digits(0.012_345_678), "0.0123457");
        assert_eq!(loss_digits(12.345_678_9), "12.3457");
        assert_eq!(loss_digits(123_456.7), "123457");
        assert_eq!(loss_digits(f64::NAN), "NaN");
    }
}
