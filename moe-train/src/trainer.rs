//! The training loop: AdamW, warm-up and cosine schedule, global-norm clipping, gradient
//! accumulation, evaluation, metrics, plots and checkpoints, with exact resumption.
//!
//! Reproducibility: the data sampler's generator is part of every checkpoint, and the
//! device's generator (dropout, gate noise) is re-seeded from the run seed and the step number
//! at every step, so a resumed run continues with exactly the losses of an uninterrupted one
//! (on the CPU backends, which are deterministic).
//!
//! Safety: the run folder is claimed ([`crate::run_dir`]) before anything is written to it, a
//! non-finite loss or gradient stops the run (or skips the step) before it can replace a
//! finite checkpoint ([`crate::divergence`]), and a model and batch that cannot fit in memory
//! are refused before they are allocated ([`crate::memory`]).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use moe_core::placement::ShardedParam;
use moe_core::rng::SplitMix64;
use moe_models::ExpertParallel;

use crate::backend::{self, Precision, SelectedDevice};
use crate::checkpoint::{self, CheckpointParts, DataRecord, TrainingState, Verify};
use crate::clip::unscale_and_clip;
use crate::config::{DataConfig, Task as TaskKind, TrainConfig};
use crate::divergence::{
    NonFiniteReport, NonFiniteWatch, OnNonFinite, SpikeDetector, MAX_SKIPS_IN_A_ROW,
};
use crate::error::{io, Result, TrainError};
use crate::loss_scale::{LossScaler, UpdateGate, GROWTH_INTERVAL};
use crate::memory;
use crate::metrics::{self, EvalRow, MetricsLog, Row, TrainRow};
use crate::optimizer::FusedAdamW;
use crate::parallel::Layout;
use crate::plots;
use crate::readout::StepReadout;
use crate::run_dir::{Claim, RunDir};
use crate::schedule::learning_rate;
use crate::tasks::digits::DigitsTask;
use crate::tasks::text::TextTask;
use crate::tasks::{shares, StepOutput, Task};
use crate::tokenizer::Tokenizer;

/// Keeps the data sampler's stream apart from other uses of the seed.
const DATA_STREAM: u64 = 0xda7a_0000_0000_0002;

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
            let (tokenizer, record) = match (&opened, &config.model.hf) {
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

/// One invocation of the training loop: what it trains, and the state that runs from step to
/// step.
struct Session<'a, T: Task> {
    task: &'a T,
    config: &'a TrainConfig,
    options: &'a RunOptions,
    out: &'a Path,
    /// The device holding the model (with autodiff).
    device: Device,
    /// The devices and how they are used.
    layout: Layout,
    /// The model; out of its place only while the optimizer updates it.
    model: Option<T::Model>,
    optimizer: burn::optim::ModuleOptimizer,
    mixed: Option<MixedPrecision>,
    /// The flag the optimizer reads (present under mixed precision or skipping).
    gate: Option<UpdateGate>,
    state: TrainingState,
    rng: SplitMix64,
    log: MetricsLog,
    summary: RunSummary,
    bar: ProgressBar,
    /// Without a terminal (a log file, CI) the bar is not drawn: a line now and then instead.
    plain_lines: bool,
    line_every: usize,
    started: Instant,
    elapsed_before: f64,
    tokens_before: u64,
    /// Training tokens since the last logged step, and when that interval started.
    interval: (Instant, usize),
    /// Seconds spent evaluating, left out of the training time.
    evaluation_seconds: f64,
    saved_at: Option<usize>,
    /// The newest checkpoint, kept beside the `keep` older ones until a later step shows its
    /// weights give finite values: after a divergence the one before it is still there.
    unconfirmed: Option<usize>,
    watch: NonFiniteWatch,
    guard: DivergenceGuard,
    spikes: SpikeDetector,
}

impl<'a, T: Task> Session<'a, T> {
    /// Builds the model and optimizer (loading the checkpoint when resuming), opens the metrics
    /// log and says what is trained.
    fn start(
        task: &'a T,
        config: &'a TrainConfig,
        selected: &SelectedDevice,
        layout: Layout,
        options: &'a RunOptions,
        resume: Option<&Resumed>,
        out: &'a Path,
    ) -> Result<Self> {
        let device = layout.main().clone().autodiff();
        let seed = config.run.seed;
        device.seed(seed);
        let mut model = task.build_model(&device)?;
        let on_nonfinite = config.run.on_nonfinite;
        let mut mixed =
            (selected.precision != Precision::F32).then(|| MixedPrecision::new(&device));
        let gate = (mixed.is_some() || on_nonfinite == OnNonFinite::Skip).then(UpdateGate::default);
        let mut adamw = FusedAdamW::new(config.optim.weight_decay as f32);
        if let Some(gate) = &gate {
            adamw = adamw.with_gate(gate.clone());
        }
        let mut optimizer = adamw.init();
        let mut state = TrainingState {
            step: 0,
            data_rng: seed ^ DATA_STREAM,
            tokens_seen: 0,
            elapsed_seconds: 0.0,
            loss_scale: None,
        };
        if let Some(resumed) = resume {
            model = checkpoint::load_model(&resumed.folder, model)?;
        }
        // Experts are placed after loading: the checkpoint holds them gathered.
        let expert_devices = layout.expert_devices();
        if !expert_devices.is_empty() {
            model = model.with_expert_placement(&expert_devices)?;
        }
        if let Some(resumed) = resume {
            optimizer =
                checkpoint::load_optimizer(&resumed.folder, optimizer, &model.sharded_params())?;
            state = resumed.state.clone();
            if let (Some(mixed), Some(saved_scale)) = (&mut mixed, state.loss_scale) {
                mixed.scaler = LossScaler::restore(&device, saved_scale, GROWTH_INTERVAL);
            }
        }
        let parameters = (model.num_params(), count_active(config, &model));
        write_config(out, config)?;
        let log = MetricsLog::open(out, resume.map(|r| r.state.step))?;
        let steps = config.run.steps;
        let summary = RunSummary {
            device: match layout.is_multi() {
                true => layout.describe(),
                false => selected.to_string(),
            },
            data: task.describe(),
            last_step: state.step,
            train_losses: Vec::new(),
            val_losses: Vec::new(),
            accuracy: None,
            checkpoint: PathBuf::new(),
            interrupted: false,
            samples: Vec::new(),
            plots: Vec::new(),
            tokens_per_second: 0.0,
            parameters,
        };
        let session = Self {
            task,
            config,
            options,
            out,
            bar: progress_bar(options.show_progress, steps as u64, state.step as u64),
            plain_lines: options.show_progress && !std::io::stderr().is_terminal(),
            line_every: (steps / 20).max(config.run.log_every),
            rng: SplitMix64(state.data_rng),
            started: Instant::now(),
            elapsed_before: state.elapsed_seconds,
            tokens_before: state.tokens_seen,
            interval: (Instant::now(), 0),
            evaluation_seconds: 0.0,
            saved_at: resume.map(|r| r.state.step),
            unconfirmed: None,
            watch: NonFiniteWatch::new(&device),
            guard: DivergenceGuard::new(on_nonfinite),
            spikes: SpikeDetector::new(config.run.explosion),
            device,
            layout,
            model: Some(model),
            optimizer,
            mixed,
            gate,
            state,
            log,
            summary,
        };
        if options.show_progress {
            session.announce();
        }
        Ok(session)
    }

    /// The model being trained.
    fn model(&self) -> &T::Model {
        self.model
            .as_ref()
            .expect("the model is away only during an update")
    }

    /// A line for the user: above the progress bar, or on its own without a terminal.
    fn say(&self, line: String) {
        print_line(self.plain_lines, &self.bar, line);
    }

    /// What is trained: the data, the model's size, the steps (and LoRA's share).
    fn announce(&self) {
        let (config, parameters) = (self.config, self.summary.parameters);
        if self.layout.is_multi() {
            self.say(self.layout.describe());
        }
        self.say(format!("data: {}", self.task.describe()));
        self.say(format!(
            "model: {} parameters, {} active per token; {} steps of {} sequences \
             (x {} gradient accumulation)",
            parameters.0,
            parameters.1,
            config.run.steps,
            config.optim.batch_size,
            config.optim.grad_accum
        ));
        if let Some(lora) = &config.model.lora {
            let trained = moe_core::lora::adapter_params(self.model());
            let targets: Vec<&str> = lora.targets.iter().map(|t| t.name()).collect();
            self.say(format!(
                "LoRA rank {} (scale {}) on {}: {} weights adapted, {trained} parameters \
                 trained ({:.2} % of the model), the rest frozen",
                lora.rank,
                lora.scale(),
                targets.join(", "),
                moe_core::lora::adapter_count(self.model()),
                100.0 * trained as f64 / parameters.0.max(1) as f64
            ));
        }
    }

    /// Runs the steps until the last, an interrupt, `stop_after`, or a divergence (returned).
    fn train_steps(&mut self) -> Result<Option<Divergence>> {
        let steps = self.config.run.steps;
        for step in self.state.step + 1..=steps {
            if self.stop_requested(step) {
                self.summary.interrupted = true;
                break;
            }
            let (output, grad_norm, lr) = self.train_step(step);
            let mut checked = false;
            if step % self.config.run.log_every == 0 || step == steps {
                checked = true;
                if let Some(found) = self.log_step(step, &output, grad_norm.as_ref(), lr)? {
                    return Ok(Some(found));
                }
            }
            let evaluate = step % self.config.run.eval_every == 0 || step == steps;
            let save_now = step % self.config.run.checkpoint_every == 0 || step == steps;
            if (evaluate || save_now) && !checked {
                let report = self.watch.read();
                if let Some(found) = self.confirm_finite(report, step)? {
                    return Ok(Some(found));
                }
            }
            if evaluate {
                if let Some(found) = self.evaluate(step)? {
                    return Ok(Some(found));
                }
            }
            if save_now {
                self.save_checkpoint()?;
                self.unconfirmed = Some(step);
            }
            self.bar.inc(1);
            if let Some(hook) = &self.options.on_step {
                (hook.0)(step);
            }
        }
        Ok(None)
    }

    /// [`Session::train_steps`], with the failure of a remote device turned into an error
    /// that names its server: Burn's remote client panics when a server stops answering (a
    /// read fails at once; nothing waits), and the run stops there, its checkpoints intact.
    fn train_steps_watched(&mut self) -> Result<Option<Divergence>> {
        if self.layout.remote_servers().is_empty() {
            return self.train_steps();
        }
        match crate::error::catch_panic_quietly(|| self.train_steps()) {
            Ok(result) => result,
            Err(message) => {
                self.bar.finish_and_clear();
                let step = self.state.step + 1;
                Err(self.layout.remote_failure(step, &message, self.out))
            }
        }
    }

    /// Whether the run is to stop before `step`: past `stop_after`, or interrupted.
    fn stop_requested(&self, step: usize) -> bool {
        self.options.stop_after.is_some_and(|last| step > last)
            || self
                .options
                .interrupt
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }

    /// One optimizer step: the micro-batches' backward passes, accumulated, then the update
    /// ([`apply_gradients`]). Returns the last micro-batch's output, the gradient norm and the
    /// learning rate.
    fn train_step(&mut self, step: usize) -> (StepOutput, Option<Tensor<1>>, f64) {
        let config = self.config;
        let seed = config.run.seed;
        self.device
            .seed(seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut accumulator = GradientsAccumulator::new();
        let mut last = None;
        let mut step_loss: Option<Tensor<1>> = None;
        for _ in 0..config.optim.grad_accum {
            let output = self.micro_batch();
            let loss = output
                .loss
                .clone()
                .div_scalar(config.optim.grad_accum as f64);
            let loss = match &self.mixed {
                Some(mixed) => mixed.scaler.scale_loss(loss),
                None => loss,
            };
            let detached = output.loss.clone().without_autodiff();
            step_loss = Some(match step_loss {
                Some(sum) => sum + detached,
                None => detached,
            });
            let grads = GradientsParams::from_grads(loss.backward(), self.model());
            accumulator.accumulate(self.model(), grads);
            self.interval.1 += output.tokens;
            self.state.tokens_seen += output.tokens as u64;
            last = Some(output);
        }
        let lr = learning_rate(step, config.run.steps, &config.optim);
        let model = self
            .model
            .take()
            .expect("the model is in place between steps");
        let (model, grad_norm) = apply_gradients(
            model,
            accumulator.grads(),
            &mut self.optimizer,
            Gating {
                mixed: self.mixed.as_mut(),
                watch: &mut self.watch,
                gate: self.gate.as_ref(),
                skip: config.run.on_nonfinite == OnNonFinite::Skip,
                step,
                loss: step_loss.expect("at least one micro-batch"),
            },
            lr,
            config.optim.grad_clip,
        );
        self.model = Some(model);
        self.state.step = step;
        self.state.data_rng = self.rng.0;
        // Training time: evaluations are left out, so runs with other evaluation settings
        // compare by the time their training took.
        self.state.elapsed_seconds =
            self.elapsed_before + self.started.elapsed().as_secs_f64() - self.evaluation_seconds;
        self.summary.last_step = step;
        (last.expect("at least one micro-batch"), grad_norm, lr)
    }

    /// One micro-batch's loss: on the model's device, or split over the data-parallel devices,
    /// each slice on a replica there ([`ExpertParallel::replica_on`]); their losses come to
    /// the model's device and are averaged, so one backward pass from the result averages
    /// their gradients into the model's parameters (as one device's pass over the whole
    /// micro-batch would). The routing statistics logged are the first device's slice's.
    fn micro_batch(&mut self) -> StepOutput {
        let devices = self.layout.data_devices();
        let sequences = self.config.optim.batch_size / devices.len();
        let model = self
            .model
            .as_ref()
            .expect("the model is in place between steps");
        let mut outputs = Vec::with_capacity(devices.len());
        for device in &devices {
            let output = if *device == self.device {
                self.task.step(model, &mut self.rng, sequences, device)
            } else {
                let replica = model.replica_on(device);
                self.task.step(&replica, &mut self.rng, sequences, device)
            };
            outputs.push(output);
        }
        averaged(outputs, &self.device)
    }

    /// Reads the step's figures back (one read of the device), stops on a divergence, logs a
    /// metrics row, updates the bar and warns about a loss spike.
    fn log_step(
        &mut self,
        step: usize,
        output: &StepOutput,
        grad_norm: Option<&Tensor<1>>,
        lr: f64,
    ) -> Result<Option<Divergence>> {
        let steps = self.config.run.steps;
        let seconds = self.interval.0.elapsed().as_secs_f64().max(1e-9);
        let scaler = self.mixed.as_ref().map(|mixed| &mixed.scaler);
        let readout = StepReadout::read(output, grad_norm, scaler, Some(&self.watch));
        if let Some(found) = readout
            .non_finite
            .and_then(|report| self.diverged(report, step))
        {
            return Ok(Some(found));
        }
        self.confirm(step)?;
        let row = train_row(&readout, step, lr, self.interval.1 as f64 / seconds);
        let mut message = format!(
            "loss {:.3} | {:.0} tok/s | lr {:.1e}",
            row.cross_entropy, row.tokens_per_second, lr
        );
        if let Some((scale, skipped)) = readout.loss_scale {
            message += &format!(" | loss scale {scale} ({skipped} steps skipped)");
        }
        if self.plain_lines && (step % self.line_every == 0 || step == steps) {
            eprintln!("step {step:>6}/{steps}: {message}");
        }
        self.bar.set_message(message);
        // A step skipped for a non-finite loss (`--on-nonfinite skip`) logs no row.
        if row.loss.is_finite() && row.cross_entropy.is_finite() {
            let loss = row.cross_entropy;
            let spike = self.spikes.observe(step, loss);
            self.summary.train_losses.push((step, loss));
            self.log.write(&Row::Train(row))?;
            if let Some(spike) = spike {
                let mean = spike.mean;
                if spike.exploded {
                    return Ok(Some(Divergence {
                        step,
                        bad_from: spike.since,
                        what: format!(
                            "the loss exploded: {loss:.4} is {:.1}x its running mean {mean:.4}, after {} logged steps in a row that far above it (since step {}; thresholds: `[run.explosion]`)",
                            loss / mean,
                            spike.in_a_row,
                            spike.since
                        ),
                    }));
                }
                self.say(format!(
                    "warning: step {step}: loss {loss:.4} is {:.1}x its running mean {mean:.4}: a loss spike (if they repeat or grow, lower `--lr` or enable `--grad-clip`)",
                    loss / mean
                ));
            }
        }
        self.interval = (Instant::now(), 0);
        Ok(None)
    }

    /// The divergence `report` (read at `step`) shows, if any ([`DivergenceGuard::check`]).
    /// When the losses logged just before it were already exploding, the trouble began at the
    /// first of them: no checkpoint from then on is kept as good.
    fn diverged(&mut self, report: NonFiniteReport, step: usize) -> Option<Divergence> {
        let (plain_lines, bar) = (self.plain_lines, &self.bar);
        let mut found = self
            .guard
            .check(report, step, &|line| print_line(plain_lines, bar, line))?;
        if let Some(since) = self.spikes.trouble_since() {
            found.bad_from = found.bad_from.min(since);
        }
        Some(found)
    }

    /// Stops on the divergence `report` shows, if any; otherwise the newest checkpoint is
    /// confirmed (the older ones beyond `keep` go).
    fn confirm_finite(
        &mut self,
        report: NonFiniteReport,
        step: usize,
    ) -> Result<Option<Divergence>> {
        if let Some(found) = self.diverged(report, step) {
            return Ok(Some(found));
        }
        self.confirm(step)?;
        Ok(None)
    }

    /// Prunes to `keep` checkpoints once a step after the newest one was found finite.
    fn confirm(&mut self, step: usize) -> Result<()> {
        if self.unconfirmed.is_some_and(|saved| step > saved) {
            checkpoint::prune_run(self.out, self.config.run.keep_checkpoints)?;
            self.unconfirmed = None;
        }
        Ok(())
    }

    /// Validation at `step`: a metrics row and a line; a non-finite loss is a divergence.
    fn evaluate(&mut self, step: usize) -> Result<Option<Divergence>> {
        let started = Instant::now();
        let inner = self.device.clone().without_autodiff();
        let evaluation = self.task.evaluate(&self.model().valid(), &inner);
        self.evaluation_seconds += started.elapsed().as_secs_f64();
        if !evaluation.loss.is_finite() {
            // This step's weights are bad; those of earlier checkpoints are not known to be.
            return Ok(Some(Divergence {
                step,
                bad_from: step + 1,
                what: format!("the validation loss is {}", evaluation.loss),
            }));
        }
        let row = EvalRow {
            step,
            val_loss: evaluation.loss,
            val_perplexity: evaluation.loss.exp(),
            train_seconds: Some(self.state.elapsed_seconds),
            accuracy: evaluation.accuracy,
        };
        if self.options.show_progress {
            let accuracy = row
                .accuracy
                .map(|a| format!(", captions right {:.1} %", 100.0 * a))
                .unwrap_or_default();
            self.say(format!(
                "step {step:>6}: validation loss {:.4}, perplexity {}{accuracy}",
                row.val_loss,
                perplexity(row.val_loss)
            ));
        }
        self.summary.val_losses.push((step, row.val_loss));
        self.summary.accuracy = row.accuracy;
        self.log.write(&Row::Eval(row))?;
        Ok(None)
    }

    /// Writes a checkpoint of the current step: placed experts gathered, and their optimizer
    /// state with them, so that the checkpoint resumes on any number of devices.
    fn save_checkpoint(&mut self) -> Result<()> {
        let saved = (self.task.tokenizer(), self.task.data_record());
        let sharded = self.model().sharded_params();
        let gathered;
        let model = if sharded.is_empty() {
            self.model()
        } else {
            gathered = self.model().clone().gathered();
            &gathered
        };
        self.summary.checkpoint = save(
            self.out,
            model,
            (&self.optimizer, &sharded),
            &self.state,
            self.mixed.as_ref(),
            self.config,
            saved,
        )?;
        self.saved_at = Some(self.state.step);
        Ok(())
    }

    /// After the steps: a checkpoint where an early stop left off (if its weights are finite),
    /// the divergence error, or pruning, plots and samples.
    fn finish(mut self, mut diverged: Option<Divergence>) -> Result<RunSummary> {
        self.bar.finish_and_clear();
        let out = self.out;
        if diverged.is_none() && self.saved_at != Some(self.state.step) {
            // Stopped early (interrupt, `stop_after`): save where it stopped, if that is finite.
            let report = self.watch.read();
            match self.diverged(report, self.state.step) {
                Some(found) => diverged = Some(found),
                None => self.save_checkpoint()?,
            }
        }
        if let Some(found) = diverged {
            plots::draw(out, &metrics::read(self.log.path())?);
            return Err(divergence_error(
                out,
                found,
                self.config.run.keep_checkpoints,
            )?);
        }
        checkpoint::prune_run(out, self.config.run.keep_checkpoints)?;
        let trained = self.state.tokens_seen - self.tokens_before;
        let model = self
            .model
            .take()
            .expect("the model is in place after the steps");
        let mut summary = self.summary;
        summary.tokens_per_second = trained as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        summary.plots = plots::draw(out, &metrics::read(self.log.path())?);
        if !summary.interrupted && self.config.run.samples > 0 {
            let seed = self.config.run.seed;
            let model = model.valid();
            summary.samples = self.task.samples(
                &model,
                self.config.run.samples,
                self.config.run.sample_tokens,
                seed,
            );
            let images = self.task.sample_images(&model, seed);
            if !images.is_empty() {
                let path = out.join("samples.png");
                match plots::digit_grid(&path, &images, self.config.data.image_levels) {
                    Ok(()) => summary.plots.push(path),
                    Err(error) => eprintln!("warning: could not draw {}: {error}", path.display()),
                }
            }
        }
        Ok(summary)
    }
}

/// `line` above the progress bar `bar`, or on its own line with `plain_lines` (no terminal).
fn print_line(plain_lines: bool, bar: &ProgressBar, line: String) {
    if plain_lines {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// The mean of the data-parallel slices' outputs on `home` (each slice holds as many examples):
/// losses averaged, tokens added, the first slice's routing statistics.
fn averaged(mut outputs: Vec<StepOutput>, home: &Device) -> StepOutput {
    if outputs.len() == 1 {
        // One device: its output as it is, with no operation added to the step.
        return outputs.pop().expect("one slice");
    }
    let count = outputs.len() as f64;
    let mean = |get: fn(&StepOutput) -> &Tensor<1>| {
        outputs
            .iter()
            .map(|output| get(output).clone().to_device(home))
            .reduce(|a, b| a + b)
            .expect("at least one slice")
            .div_scalar(count)
    };
    let (loss, cross_entropy, aux_loss) = (
        mean(|o| &o.loss),
        mean(|o| &o.cross_entropy),
        mean(|o| &o.aux_loss),
    );
    let tokens = outputs.iter().map(|output| output.tokens).sum();
    let first = outputs.into_iter().next().expect("at least one slice");
    StepOutput {
        loss,
        cross_entropy,
        aux_loss,
        tokens,
        ..first
    }
}

/// Mixed precision's training-loop state: the loss scale.
struct MixedPrecision {
    scaler: LossScaler,
}

impl MixedPrecision {
    fn new(device: &Device) -> Self {
        Self {
            scaler: LossScaler::new(device, GROWTH_INTERVAL),
        }
    }
}

/// What decides whether a step's update is applied: the loss scale's overflow check (mixed
/// precision) and the non-finite watch (which vetoes a step only under
/// [`OnNonFinite::Skip`]).
struct Gating<'a> {
    mixed: Option<&'a mut MixedPrecision>,
    watch: &'a mut NonFiniteWatch,
    /// The flag the optimizer reads (present under mixed precision or skipping).
    gate: Option<&'a UpdateGate>,
    skip: bool,
    step: usize,
    /// The step's loss summed over its micro-batches, `[1]`, without autodiff.
    loss: Tensor<1>,
}

/// The end of a step, after the backward passes: the gradients unscaled (mixed precision) and
/// clipped in one multiplication, the loss and norm watched for non-finite values, the scale
/// moved and the step skipped if the gradients overflowed (or, when asked, if the loss or norm
/// is not finite), and the optimizer's update. Returns the model and the gradient norm before
/// clipping.
fn apply_gradients<M: Module>(
    model: M,
    mut grads: GradientsParams,
    optimizer: &mut burn::optim::ModuleOptimizer,
    gating: Gating<'_>,
    lr: f64,
    max_norm: f64,
) -> (M, Option<Tensor<1>>) {
    let unscale = gating
        .mixed
        .as_ref()
        .map(|mixed| mixed.scaler.unscale_factor());
    let norms = unscale_and_clip(&mut grads, &model, unscale, max_norm);
    let norm = norms
        .as_ref()
        .map(|norms| norms.norm.clone().without_autodiff())
        .unwrap_or_else(|| gating.loss.zeros_like());
    // Under mixed precision a non-finite gradient is an overflow the loss scale handles.
    let check_norm = gating.mixed.is_none();
    let finite = gating
        .watch
        .observe(gating.step, gating.loss, norm, check_norm);
    let mut keep = gating.skip.then_some(finite);
    if let (Some(mixed), Some(norms)) = (gating.mixed, &norms) {
        let overflow_free = mixed.scaler.update(norms.scaled.clone());
        keep = Some(match keep {
            Some(finite) => finite * overflow_free,
            None => overflow_free,
        });
    }
    if let Some(gate) = gating.gate {
        gate.set(keep);
    }
    let model = optimizer.step(lr, model, grads);
    (model, norms.map(|norms| norms.norm))
}

/// A divergence found: where, and from which step on the weights are suspect.
struct Divergence {
    /// The first step whose values were not finite (or whose evaluation was not).
    step: usize,
    /// Checkpoints of this step minus one and later hold the weights that gave them.
    bad_from: usize,
    /// What was not finite, with its value.
    what: String,
}

/// Turns what [`NonFiniteWatch`] reports into a decision: go on, warn about skipped steps, or
/// stop.
struct DivergenceGuard {
    mode: OnNonFinite,
    skipped_reported: u64,
}

impl DivergenceGuard {
    fn new(mode: OnNonFinite) -> Self {
        Self {
            mode,
            skipped_reported: 0,
        }
    }

    /// `None` to go on; the divergence to stop for otherwise. `step` is the step the report was
    /// read at.
    fn check(
        &mut self,
        report: NonFiniteReport,
        step: usize,
        say: &impl Fn(String),
    ) -> Option<Divergence> {
        let (first, loss, norm) = report.first?;
        let what = describe(loss, norm);
        match self.mode {
            OnNonFinite::Stop => Some(Divergence {
                step: first,
                bad_from: first,
                what,
            }),
            OnNonFinite::Skip if report.streak >= MAX_SKIPS_IN_A_ROW => {
                let streak_start = (step + 1).saturating_sub(report.streak as usize);
                Some(Divergence {
                    step: streak_start,
                    bad_from: streak_start,
                    what: format!(
                        "{what}, and the {} steps from step {streak_start} on were all skipped for non-finite values",
                        report.streak
                    ),
                })
            }
            OnNonFinite::Skip => {
                if report.skipped > self.skipped_reported {
                    say(format!(
                        "warning: {} step(s) skipped so far for a non-finite loss or gradient (the first at step {first}: {what})",
                        report.skipped
                    ));
                    self.skipped_reported = report.skipped;
                }
                None
            }
        }
    }
}

/// [`TrainError::Diverged`] for `found`, after moving aside the checkpoints written with the
/// weights that diverged and pruning to `keep`; names the checkpoint `latest` now points at.
fn divergence_error(out: &Path, found: Divergence, keep: usize) -> Result<TrainError> {
    let moved = checkpoint::set_aside_from(out, found.bad_from)?;
    if out.join("checkpoints").is_dir() {
        checkpoint::prune_run(out, keep)?;
    }
    let mut checkpoint = match checkpoint::resolve(out) {
        Ok(folder) => format!(
            "The last checkpoint saved before the trouble began is {} (`latest` points at it; continue from it with `--resume` and the changes below)",
            folder.display()
        ),
        Err(_) => "No checkpoint was written before it: start again with the changes below".into(),
    };
    if !moved.is_empty() {
        let names: Vec<String> = moved.iter().map(|p| p.display().to_string()).collect();
        checkpoint += &format!(
            "; the checkpoints written with the weights that diverged were moved to {}",
            names.join(", ")
        );
    }
    Ok(TrainError::Diverged {
        step: found.step,
        what: found.what,
        checkpoint,
    })
}

/// "the loss is NaN (gradient norm 3.2)" and the like.
fn describe(loss: f64, norm: f64) -> String {
    if !loss.is_finite() {
        format!("the loss is {loss} (gradient norm {norm})")
    } else {
        format!("the gradient norm is {norm} (loss {loss})")
    }
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

/// The metrics row of a logged step.
fn train_row(readout: &StepReadout, step: usize, lr: f64, tokens_per_second: f64) -> TrainRow {
    let as_shares = |loads: &[Vec<i64>]| loads.iter().map(|load| shares(load)).collect();
    let multimodal = !readout.image_loads.is_empty();
    TrainRow {
        step,
        loss: readout.loss,
        cross_entropy: readout.cross_entropy,
        aux_loss: readout.aux_loss,
        lr,
        grad_norm: readout.grad_norm.unwrap_or(0.0),
        tokens_per_second,
        expert_load: readout
            .layers
            .iter()
            .map(|layer| shares(&signed(&layer.tokens_per_expert)))
            .collect(),
        dropped: readout
            .layers
            .iter()
            .map(|layer| layer.drop_rate())
            .collect(),
        image_expert_load: multimodal.then(|| as_shares(&readout.image_loads)),
        text_expert_load: multimodal.then(|| as_shares(&readout.text_loads)),
        loss_scale: readout.loss_scale.map(|(scale, _)| scale),
        skipped_steps: readout.loss_scale.map(|(_, skipped)| skipped),
        non_finite_skipped: readout
            .non_finite
            .map(|report| report.skipped)
            .filter(|&skipped| skipped > 0),
    }
}

/// Writes a checkpoint of `state`, with the loss scale read from the device under mixed
/// precision, and the text task's tokenizer and data record.
fn save<M: Module>(
    out: &Path,
    model: &M,
    (optimizer, sharded): (&burn::optim::ModuleOptimizer, &[ShardedParam]),
    state: &TrainingState,
    mixed: Option<&MixedPrecision>,
    config: &TrainConfig,
    (tokenizer, data): (Option<&Tokenizer>, Option<&DataRecord>),
) -> Result<PathBuf> {
    let state = TrainingState {
        loss_scale: mixed.map(|mixed| mixed.scaler.state()),
        ..state.clone()
    };
    checkpoint::save(
        out,
        CheckpointParts {
            model,
            optimizer,
            sharded,
            state: &state,
            config,
            tokenizer,
            data,
        },
        // One more than asked: the newest is kept until a later step confirms it.
        config.run.keep_checkpoints + 1,
    )
}

fn write_config(out: &Path, config: &TrainConfig) -> Result<()> {
    let path = out.join("config.json");
    let json = serde_json::to_string_pretty(config).expect("a config serialises");
    std::fs::write(&path, json).map_err(io(&path))
}

/// Active parameters per token: all parameters minus the experts a token does not visit in
/// each MoE layer of the model's stack (a Hugging Face model's under `--init-hf`).
fn count_active<M: Module>(config: &TrainConfig, model: &M) -> usize {
    let total = model.num_params();
    if config.model.dense {
        return total;
    }
    let decoder = match &config.model.hf {
        Some(hf) => hf.config.decoder.clone(),
        None => config.decoder_config(),
    };
    let moe = &decoder.moe;
    total - decoder.num_moe_layers() * (moe.num_params() - moe.num_active_params())
}

fn progress_bar(show: bool, total: u64, position: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "step {pos:>6}/{len} [{bar:30}] {msg} | {elapsed_precise} ETA {eta_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(position);
    bar
}

/// Counts as the signed integers [`shares`] takes.
fn signed(counts: &[u64]) -> Vec<i64> {
    counts.iter().map(|&count| count as i64).collect()
}
