//! The training loop: AdamW, warm-up and cosine schedule, global-norm clipping, gradient
//! accumulation, evaluation, metrics, plots and checkpoints, with exact resumption.
//!
//! Reproducibility: the data sampler's generator is part of every checkpoint, and the
//! device's generator (dropout, gate noise) is re-seeded from the run seed and the step number
//! at every step, so a resumed run continues with exactly the losses of an uninterrupted one
//! (on the CPU backends, which are deterministic).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use moe_core::rng::SplitMix64;

use crate::backend::{self, Precision, SelectedDevice};
use crate::checkpoint::{self, CheckpointParts, TrainingState};
use crate::clip::unscale_and_clip;
use crate::config::{Task as TaskKind, TrainConfig};
use crate::error::{io, Result};
use crate::loss_scale::{LossScaler, UpdateGate, GROWTH_INTERVAL};
use crate::metrics::{self, EvalRow, MetricsLog, Row, TrainRow};
use crate::optimizer::FusedAdamW;
use crate::plots;
use crate::readout::StepReadout;
use crate::schedule::learning_rate;
use crate::tasks::digits::DigitsTask;
use crate::tasks::text::TextTask;
use crate::tasks::{shares, Task};
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
    /// Draw progress bars and print progress lines.
    pub show_progress: bool,
    /// Set (by a Ctrl-C handler) to stop: a checkpoint is saved and the run returns.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Stop after this step as if interrupted (the schedule still spans `run.steps`), e.g. to
    /// train a long schedule in several sessions.
    pub stop_after: Option<usize>,
    /// Called after every step, once it is logged, evaluated and saved as due.
    pub on_step: Option<StepHook>,
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

/// Trains as `config` says, or, with `options.resume`, continues the run in `options.out`
/// from its latest checkpoint (then `config` may differ from the saved one only in its `run`
/// section: more steps, another backend, ...).
pub fn train(config: TrainConfig, options: RunOptions) -> Result<RunSummary> {
    let resume = if options.resume {
        let folder = checkpoint::resolve(&options.out)?;
        let (state, saved) = checkpoint::read_state(&folder)?;
        for (section, same) in [
            ("task", config.task == saved.task),
            ("data", config.data == saved.data),
            ("model", config.model == saved.model),
            ("optim", config.optim == saved.optim),
        ] {
            if !same {
                return Err(crate::error::TrainError::Config(format!(
                    "`--resume` continues the saved run, but the `{section}` settings given differ from the saved ones; only the `run` settings (steps, backend, ...) can change (start a new run with another `--out` to change the rest)"
                )));
            }
        }
        Some((folder, state))
    } else {
        None
    };
    config.validate()?;
    let selected = if options.show_progress {
        backend::select_and_report(config.run.backend, config.run.precision)?
    } else {
        backend::select(config.run.backend, config.run.precision)?
    };
    let device = selected.device.clone().autodiff();
    match config.task {
        TaskKind::Text => {
            let tokenizer = match &resume {
                Some((folder, _)) => {
                    Some(Tokenizer::load(&folder.join(checkpoint::TOKENIZER_FILE))?)
                }
                None => None,
            };
            let task = TextTask::new(&config, tokenizer, &device, options.show_progress)?;
            run(task, config, selected, device, options, resume)
        }
        TaskKind::Caption | TaskKind::TextToImage => {
            if selected.precision != Precision::F32 {
                return Err(crate::error::TrainError::Config(format!(
                    "`--precision {}` trains the text model; the multimodal model trains in f32 (use `--precision f32` with `--task {}`)",
                    selected.precision.name(),
                    if config.task == TaskKind::Caption { "caption" } else { "text-to-image" }
                )));
            }
            let task = DigitsTask::new(&config, &device);
            run(task, config, selected, device, options, resume)
        }
    }
}

/// Trains `task` (the loop behind [`train`]).
pub fn run<T: Task>(
    task: T,
    config: TrainConfig,
    selected: SelectedDevice,
    device: Device,
    options: RunOptions,
    resume: Option<(PathBuf, TrainingState)>,
) -> Result<RunSummary> {
    let out = options.out.as_path();
    std::fs::create_dir_all(out).map_err(io(out))?;
    let seed = config.run.seed;
    device.seed(seed);
    let mut model = task.build_model(&device)?;
    let mut mixed = (selected.precision != Precision::F32).then(|| MixedPrecision::new(&device));
    let mut adamw = FusedAdamW::new(config.optim.weight_decay as f32);
    if let Some(mixed) = &mixed {
        adamw = adamw.with_gate(mixed.gate.clone());
    }
    let mut optimizer = adamw.init();
    let mut state = TrainingState {
        step: 0,
        data_rng: seed ^ DATA_STREAM,
        tokens_seen: 0,
        elapsed_seconds: 0.0,
        loss_scale: None,
    };
    if let Some((folder, saved)) = &resume {
        model = checkpoint::load_model(folder, model)?;
        optimizer = checkpoint::load_optimizer(folder, optimizer)?;
        state = saved.clone();
        if let (Some(mixed), Some(saved_scale)) = (&mut mixed, state.loss_scale) {
            mixed.scaler = LossScaler::restore(&device, saved_scale, GROWTH_INTERVAL);
        }
    }
    let parameters = (model.num_params(), count_active(&config, &model));
    write_config(out, &config)?;
    let mut log = MetricsLog::open(out, resume.as_ref().map(|(_, s)| s.step))?;

    let steps = config.run.steps;
    let bar = progress_bar(options.show_progress, steps as u64, state.step as u64);
    // Without a terminal (a log file, CI) the bar is not drawn: print a line now and then.
    let plain_lines = options.show_progress && !std::io::stderr().is_terminal();
    let line_every = (steps / 20).max(config.run.log_every);
    let say = |line: String| {
        if plain_lines {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    if options.show_progress {
        say(format!("data: {}", task.describe()));
        say(format!(
            "model: {} parameters, {} active per token; {} steps of {} sequences \
             (x {} gradient accumulation)",
            parameters.0, parameters.1, steps, config.optim.batch_size, config.optim.grad_accum
        ));
    }
    let mut rng = SplitMix64(state.data_rng);
    let mut summary = RunSummary {
        device: selected.to_string(),
        data: task.describe(),
        last_step: state.step,
        train_losses: Vec::new(),
        val_losses: Vec::new(),
        checkpoint: PathBuf::new(),
        interrupted: false,
        samples: Vec::new(),
        plots: Vec::new(),
        tokens_per_second: 0.0,
        parameters,
    };
    let started = Instant::now();
    let elapsed_before = state.elapsed_seconds;
    let tokens_before = state.tokens_seen;
    let (mut interval_start, mut interval_tokens) = (Instant::now(), 0usize);
    let mut saved_at = resume.as_ref().map(|(_, s)| s.step);
    let inner = device.clone().without_autodiff();

    for step in state.step + 1..=steps {
        let stop_requested = options.stop_after.is_some_and(|last| step > last);
        if stop_requested
            || options
                .interrupt
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::SeqCst))
        {
            summary.interrupted = true;
            break;
        }
        device.seed(seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut accumulator = GradientsAccumulator::new();
        let mut last = None;
        for _ in 0..config.optim.grad_accum {
            let output = task.step(&model, &mut rng);
            let loss = output
                .loss
                .clone()
                .div_scalar(config.optim.grad_accum as f64);
            let loss = match &mixed {
                Some(mixed) => mixed.scaler.scale_loss(loss),
                None => loss,
            };
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
            interval_tokens += output.tokens;
            state.tokens_seen += output.tokens as u64;
            last = Some(output);
        }
        let lr = learning_rate(step, steps, &config.optim);
        let grad_norm;
        (model, grad_norm) = apply_gradients(
            model,
            accumulator.grads(),
            &mut optimizer,
            mixed.as_mut(),
            lr,
            config.optim.grad_clip,
        );
        state.step = step;
        state.data_rng = rng.0;
        state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
        summary.last_step = step;

        let output = last.expect("at least one micro-batch");
        if step % config.run.log_every == 0 || step == steps {
            let seconds = interval_start.elapsed().as_secs_f64().max(1e-9);
            let scaler = mixed.as_ref().map(|mixed| &mixed.scaler);
            let readout = StepReadout::read(&output, grad_norm.as_ref(), scaler);
            let as_shares = |loads: &[Vec<i64>]| loads.iter().map(|load| shares(load)).collect();
            let multimodal = !output.modality.is_empty();
            let row = TrainRow {
                step,
                loss: readout.loss,
                cross_entropy: readout.cross_entropy,
                aux_loss: readout.aux_loss,
                lr,
                grad_norm: readout.grad_norm.unwrap_or(0.0),
                tokens_per_second: interval_tokens as f64 / seconds,
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
            };
            let mut message = format!(
                "loss {:.3} | {:.0} tok/s | lr {:.1e}",
                row.cross_entropy, row.tokens_per_second, lr
            );
            if let Some((scale, skipped)) = readout.loss_scale {
                message += &format!(" | loss scale {scale} ({skipped} steps skipped)");
            }
            if plain_lines && (step % line_every == 0 || step == steps) {
                eprintln!("step {step:>6}/{steps}: {message}");
            }
            bar.set_message(message);
            summary.train_losses.push((step, row.cross_entropy));
            log.write(&Row::Train(row))?;
            interval_start = Instant::now();
            interval_tokens = 0;
        }
        if step % config.run.eval_every == 0 || step == steps {
            let evaluation = task.evaluate(&model.valid(), &inner);
            let row = EvalRow {
                step,
                val_loss: evaluation.loss,
                val_perplexity: evaluation.loss.exp(),
            };
            if options.show_progress {
                say(format!(
                    "step {step:>6}: validation loss {:.4}, perplexity {:.2}",
                    row.val_loss, row.val_perplexity
                ));
            }
            summary.val_losses.push((step, row.val_loss));
            log.write(&Row::Eval(row))?;
        }
        if step % config.run.checkpoint_every == 0 || step == steps {
            summary.checkpoint = save(
                out,
                &model,
                &optimizer,
                &state,
                mixed.as_ref(),
                &config,
                task.tokenizer(),
            )?;
            saved_at = Some(step);
        }
        bar.inc(1);
        if let Some(hook) = &options.on_step {
            (hook.0)(step);
        }
    }
    bar.finish_and_clear();

    if saved_at != Some(state.step) {
        summary.checkpoint = save(
            out,
            &model,
            &optimizer,
            &state,
            mixed.as_ref(),
            &config,
            task.tokenizer(),
        )?;
    }
    let trained = state.tokens_seen - tokens_before;
    summary.tokens_per_second = trained as f64 / started.elapsed().as_secs_f64().max(1e-9);
    summary.plots = plots::draw(out, &metrics::read(log.path())?);
    if !summary.interrupted && config.run.samples > 0 {
        summary.samples = task.samples(
            &model.valid(),
            config.run.samples,
            config.run.sample_tokens,
            seed,
        );
    }
    Ok(summary)
}

/// Mixed precision's training-loop state: the loss scale and the flag that lets the optimizer
/// skip a step whose gradients overflowed.
struct MixedPrecision {
    scaler: LossScaler,
    gate: UpdateGate,
}

impl MixedPrecision {
    fn new(device: &Device) -> Self {
        Self {
            scaler: LossScaler::new(device, GROWTH_INTERVAL),
            gate: UpdateGate::default(),
        }
    }
}

/// The end of a step, after the backward passes: the gradients unscaled (mixed precision) and
/// clipped in one multiplication, the scale moved and the step skipped if they overflowed, and
/// the optimizer's update. Returns the model and the gradient norm before clipping.
fn apply_gradients<M: Module>(
    model: M,
    mut grads: GradientsParams,
    optimizer: &mut burn::optim::ModuleOptimizer,
    mixed: Option<&mut MixedPrecision>,
    lr: f64,
    max_norm: f64,
) -> (M, Option<Tensor<1>>) {
    let unscale = mixed.as_ref().map(|mixed| mixed.scaler.unscale_factor());
    let norms = unscale_and_clip(&mut grads, &model, unscale, max_norm);
    if let (Some(mixed), Some(norms)) = (mixed, &norms) {
        let keep = mixed.scaler.update(norms.scaled.clone());
        mixed.gate.set(Some(keep));
    }
    let model = optimizer.step(lr, model, grads);
    (model, norms.map(|norms| norms.norm))
}

/// Writes a checkpoint of `state`, with the loss scale read from the device under mixed
/// precision.
fn save<M: Module>(
    out: &Path,
    model: &M,
    optimizer: &burn::optim::ModuleOptimizer,
    state: &TrainingState,
    mixed: Option<&MixedPrecision>,
    config: &TrainConfig,
    tokenizer: Option<&Tokenizer>,
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
            state: &state,
            config,
            tokenizer,
        },
        config.run.keep_checkpoints,
    )
}

fn write_config(out: &Path, config: &TrainConfig) -> Result<()> {
    let path = out.join("config.json");
    let json = serde_json::to_string_pretty(config).expect("a config serialises");
    std::fs::write(&path, json).map_err(io(&path))
}

/// Active parameters per token: all parameters minus the experts a token does not visit.
fn count_active<M: Module>(config: &TrainConfig, model: &M) -> usize {
    let total = model.num_params();
    let m = &config.model;
    if m.dense || m.moe_every == 0 {
        return total;
    }
    let moe = config.moe_config();
    let layers = (0..m.num_layers)
        .filter(|i| (i + 1) % m.moe_every == 0)
        .count();
    total - layers * (moe.num_params() - moe.num_active_params())
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
