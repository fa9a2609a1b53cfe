//! One invocation of the training loop ([`Session`]): set-up, the steps, logging, and (in
//! [`finish`]) evaluation, checkpoints and the end of the run.

mod finish;

use finish::write_config;

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Gradients, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use moe_core::rng::{SplitMix64, GOLDEN_GAMMA};
use moe_models::ExpertParallel;

use crate::config::TrainConfig;
use crate::data::tasks::{shares, StepOutput, Task};
use crate::error::Result;
use crate::runtime::backend::{Precision, SelectedDevice};
use crate::store::checkpoint::{self, TrainingState};
use crate::store::metrics::{MetricsLog, Row, TrainRow};
use crate::training::divergence::{Divergence, DivergenceGuard};
use crate::training::divergence::{NonFiniteReport, NonFiniteWatch, OnNonFinite, SpikeDetector};
use crate::training::loss_scale::{LossScaler, UpdateVeto, GROWTH_INTERVAL};
use crate::training::optimizer::FusedAdamW;
use crate::training::parallel::Layout;
use crate::training::readout::StepReadout;
use crate::training::replicas::Replicas;
use crate::training::run::{Resumed, RunOptions, RunSummary, DATA_STREAM};
use crate::training::schedule::learning_rate;
use crate::training::step::{apply_gradients, averaged, Gating, MixedPrecision};

/// One invocation of the training loop: what it trains, and the state that runs from step to
/// step.
pub(super) struct Session<'a, T: Task> {
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
    /// The replicas of the other devices each micro-batch is split over (data parallelism).
    replicas: Option<Replicas<T::Model>>,
    mixed: Option<MixedPrecision>,
    /// The flag the optimizer reads (present under mixed precision or skipping).
    veto: Option<UpdateVeto>,
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
    pub(super) fn start(
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
        let veto = (mixed.is_some() || on_nonfinite == OnNonFinite::Skip).then(UpdateVeto::default);
        let fresh_optimizer = || {
            let adamw = FusedAdamW::new(config.optim.weight_decay as f32);
            match &veto {
                Some(veto) => adamw.with_veto(veto.clone()).init(),
                None => adamw.init(),
            }
        };
        let mut optimizer = fresh_optimizer();
        let mut state = fresh_state(seed);
        if let Some(resumed) = resume {
            model = checkpoint::load_model(&resumed.folder, model)?;
        }
        // Experts are placed after loading: the checkpoint holds them gathered.
        let expert_devices = match config.run.offload_experts {
            true => vec![crate::runtime::backend::offload_device().autodiff()],
            false => layout.expert_devices(),
        };
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
        let data_devices = layout.data_devices();
        let replicas = match data_devices.len() > 1 {
            true => Some(Replicas::new(
                &model,
                &data_devices,
                &optimizer,
                fresh_optimizer,
                config.run.all_reduce,
            )?),
            false => None,
        };
        let parameters = (model.num_params(), count_active(config, &model));
        write_config(out, config)?;
        let log = MetricsLog::open(out, resume.map(|r| r.state.step))?;
        let steps = config.run.steps;
        let mut device_name = match layout.is_multi() {
            true => layout.describe(),
            false => selected.to_string(),
        };
        if config.run.offload_experts {
            device_name += "; every expert in CPU memory (--offload-experts)";
        }
        let summary = RunSummary::starting(device_name, task.describe(), state.step, parameters);
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
            replicas,
            mixed,
            veto,
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
        if config.run.offload_experts {
            self.say(offload_note(config));
        }
        if let Some(lora) = &config.variant.lora {
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
    pub(super) fn train_steps_watched(&mut self) -> Result<Option<Divergence>> {
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
            .seed(seed ^ (step as u64).wrapping_mul(GOLDEN_GAMMA));
        let devices = self.replicas.as_ref().map_or(1, Replicas::devices);
        let mut accumulators: Vec<GradientsAccumulator<T::Model>> =
            (0..devices).map(|_| GradientsAccumulator::new()).collect();
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
            self.accumulate(loss.backward(), &mut accumulators);
            self.interval.1 += output.tokens;
            self.state.tokens_seen += output.tokens as u64;
            last = Some(output);
        }
        let lr = learning_rate(step, config.run.steps, &config.optim);
        let mut grads: Vec<GradientsParams> = accumulators
            .into_iter()
            .map(|mut accumulator| accumulator.grads())
            .collect();
        if let Some(replicas) = &mut self.replicas {
            replicas.all_reduce(
                &mut grads,
                self.model.as_ref().expect("the model is in place"),
            );
        }
        let model_grads = grads.remove(0);
        let model = self
            .model
            .take()
            .expect("the model is in place between steps");
        let (model, norms) = apply_gradients(
            model,
            model_grads,
            &mut self.optimizer,
            Gating {
                mixed: self.mixed.as_mut(),
                watch: &mut self.watch,
                veto: self.veto.as_ref(),
                skip: config.run.on_nonfinite == OnNonFinite::Skip,
                step,
                loss: step_loss.expect("at least one micro-batch"),
            },
            lr,
            config.optim.grad_clip,
        );
        if let Some(replicas) = &mut self.replicas {
            let factor = norms.as_ref().and_then(|norms| norms.factor.as_ref());
            replicas.update(grads, factor, lr, &model);
        }
        let grad_norm = norms.map(|norms| norms.norm);
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
    /// each slice on the replica there ([`Replicas`]); their losses come to the model's device
    /// and are averaged, so one backward pass from the result gives each replica the gradient
    /// of its share (summed over the replicas at the end of the step, as one device's pass
    /// over the whole micro-batch would give). The routing statistics logged are the first
    /// device's slice's.
    fn micro_batch(&mut self) -> StepOutput {
        let devices = self.layout.data_devices();
        let sequences = self.config.optim.batch_size / devices.len();
        let model = self
            .model
            .as_ref()
            .expect("the model is in place between steps");
        let mut outputs = Vec::with_capacity(devices.len());
        for (index, device) in devices.iter().enumerate() {
            let replica = match (&self.replicas, index) {
                (Some(replicas), 1..) => replicas.replica(index),
                _ => model,
            };
            outputs.push(self.task.step(replica, &mut self.rng, sequences, device));
        }
        averaged(outputs, &self.device)
    }

    /// A micro-batch's gradients (`grads`, one backward pass through every replica) added to
    /// each device's accumulator: the model's, then each replica's.
    fn accumulate(
        &self,
        mut grads: Gradients,
        accumulators: &mut [GradientsAccumulator<T::Model>],
    ) {
        let model = self.model();
        let Some(replicas) = &self.replicas else {
            accumulators[0].accumulate(model, GradientsParams::from_grads(grads, model));
            return;
        };
        let per_device = replicas.gradients(&mut grads, model);
        for (index, (accumulator, grads)) in accumulators.iter_mut().zip(per_device).enumerate() {
            match index {
                0 => accumulator.accumulate(model, grads),
                _ => accumulator.accumulate(replicas.replica(index), grads),
            }
        }
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
        if self.plain_lines && (step.is_multiple_of(self.line_every) || step == steps) {
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
}

/// `line` above the progress bar `bar`, or on its own line with `plain_lines` (no terminal).
fn print_line(plain_lines: bool, bar: &ProgressBar, line: String) {
    if plain_lines {
        eprintln!("{line}");
    } else {
        bar.println(line);
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

/// What `--offload-experts` keeps off the run's device, from the shapes: the routed experts'
/// parameters, and in training their gradients and AdamW's two moments (16 bytes each in
/// f32).
fn offload_note(config: &TrainConfig) -> String {
    let decoder = match &config.variant.hf {
        Some(hf) => &hf.config.decoder,
        None => &config.model,
    };
    let moe = &decoder.moe;
    let experts =
        decoder.num_moe_layers() * moe.num_experts * moe.expert.params_per_expert(moe.d_model);
    format!(
        "experts in CPU memory: {experts} parameters in {} MoE layers, {:.0} MB of weights and \
         {:.0} MB with their gradients and AdamW moments kept off the device",
        decoder.num_moe_layers(),
        experts as f64 * 4.0 / 1e6,
        experts as f64 * 16.0 / 1e6
    )
}

/// The state of a run at step 0: its data sampler seeded from the run's seed.
fn fresh_state(seed: u64) -> TrainingState {
    TrainingState {
        step: 0,
        data_rng: seed ^ DATA_STREAM,
        tokens_seen: 0,
        elapsed_seconds: 0.0,
        loss_scale: None,
    }
}

/// Active parameters per token: all parameters minus the experts a token does not visit in
/// each MoE layer of the model's stack (a Hugging Face model's under `--init-hf`).
fn count_active<M: Module>(config: &TrainConfig, model: &M) -> usize {
    let total = model.num_params();
    if config.variant.dense {
        return total;
    }
    let decoder = match &config.variant.hf {
        Some(hf) => hf.config.decoder.clone(),
        None => config.model.clone(),
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
