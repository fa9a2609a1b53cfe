//! The session's evaluations, checkpoints and end: what is saved, when, and what a
//! divergence leaves behind.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use moe_core::placement::ShardedParam;
use moe_models::ExpertParallel;

use crate::config::TrainConfig;
use crate::data::tasks::Task;
use crate::data::tokenizer::Tokenizer;
use crate::error::{io, Result};
use crate::store::checkpoint::{self, CheckpointParts, DataRecord, TrainingState};
use crate::store::metrics::{self, EvalRow, Row};
use crate::store::plots;
use crate::training::divergence::{divergence_error, Divergence};
use crate::training::run::{perplexity, RunSummary};
use crate::training::session::Session;
use crate::training::step::MixedPrecision;

impl<'a, T: Task> Session<'a, T> {
    /// Validation at `step`: a metrics row and a line; a non-finite loss is a divergence.
    pub(super) fn evaluate(&mut self, step: usize) -> Result<Option<Divergence>> {
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
    pub(super) fn save_checkpoint(&mut self) -> Result<()> {
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
    pub(in crate::training) fn finish(
        mut self,
        mut diverged: Option<Divergence>,
    ) -> Result<RunSummary> {
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
        let compare = self.options.compare_replicas;
        summary.data_parallel = self
            .replicas
            .as_ref()
            .map(|replicas| replicas.report(&model, compare));
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

pub(super) fn write_config(out: &Path, config: &TrainConfig) -> Result<()> {
    let path = out.join("config.json");
    let json = serde_json::to_string_pretty(config).expect("a config serialises");
    std::fs::write(&path, json).map_err(io(&path))
}
