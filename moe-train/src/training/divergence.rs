//! Divergence: a loss or gradient that stops being a finite number, and loss spikes.
//!
//! A run whose loss turns NaN keeps running and produces nothing of value; worse, its
//! checkpoints replace the finite ones. [`NonFiniteWatch`] notices the first step whose loss or
//! gradient norm is not finite, without reading anything back on the steps that are not logged
//! (a training step does no host read; `tests/host_reads.rs`): it keeps on the device the first such step
//! and its values, and the training loop reads them with the logged step's values and before
//! every evaluation and checkpoint. Then the run stops ([`OnNonFinite::Stop`], the default) or,
//! if the user asked, such steps are skipped ([`OnNonFinite::Skip`]: the optimizer leaves
//! parameters and moments as they were, through the same gate mixed precision uses), up to
//! [`MAX_SKIPS_IN_A_ROW`] in a row.
//!
//! [`SpikeDetector`] warns when a logged loss is far above its running mean (1.5 times and a
//! nat above it): the usual sign that a learning rate is too high, often some hundred steps
//! before the loss overflows. A loss that stays that far above for several logged steps in a
//! row ([`ExplosionRule`], settable in the config's `[run.explosion]`) is a divergence too,
//! though still finite: the run stops, and the trouble began at the first of those steps, so
//! a checkpoint saved from then on is never the one named as the last good one (nor is it for
//! a loss that turns NaN during such a streak).

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData, Transaction};
use serde::{Deserialize, Serialize};

use std::path::Path;

use crate::error::{Result, TrainError};
use crate::store::checkpoint;

/// What training does at a step whose loss or gradient norm is NaN or infinite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop with an error naming the step and the value; the checkpoints written before it
    /// are kept (the default).
    #[default]
    Stop,
    /// Skip the step (parameters and optimizer state unchanged) and go on; stop after
    /// [`MAX_SKIPS_IN_A_ROW`] skipped steps in a row.
    Skip,
}

/// Skipped steps in a row after which [`OnNonFinite::Skip`] gives up: the model no longer
/// produces finite losses at all.
pub const MAX_SKIPS_IN_A_ROW: u64 = 20;

/// The first non-finite step and the skip counts, kept as `[1]` tensors on the device.
#[derive(Debug, Clone)]
pub struct NonFiniteWatch {
    /// The first step with a non-finite loss or norm (0: none yet).
    first_step: Tensor<1>,
    /// Its loss.
    first_loss: Tensor<1>,
    /// Its gradient norm.
    first_norm: Tensor<1>,
    /// Steps skipped so far (under [`OnNonFinite::Skip`]).
    skipped: Tensor<1>,
    /// Non-finite steps in a row up to the latest.
    streak: Tensor<1>,
}

/// What a [`NonFiniteWatch`] holds, on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFiniteReport {
    /// The first non-finite step: `(step, loss, gradient norm)`.
    pub first: Option<(usize, f64, f64)>,
    /// Steps skipped so far.
    pub skipped: u64,
    /// Non-finite steps in a row up to the latest observed.
    pub streak: u64,
}

impl NonFiniteWatch {
    /// A watch that has seen nothing, on `device` (without autodiff).
    pub fn new(device: &Device) -> Self {
        let device = device.clone().without_autodiff();
        let zero = || Tensor::zeros([1], &device);
        Self {
            first_step: zero(),
            first_loss: zero(),
            first_norm: zero(),
            skipped: zero(),
            streak: zero(),
        }
    }

    /// Observes `step`'s `loss` and gradient `norm` (`[1]` each, no autodiff); returns whether
    /// the step is finite (`[1]`, 1 or 0), the flag [`OnNonFinite::Skip`] gives the optimizer.
    /// With `check_norm` false only the loss counts (mixed precision, where a non-finite
    /// gradient is an overflow the loss scale already handles).
    pub fn observe(
        &mut self,
        step: usize,
        loss: Tensor<1>,
        norm: Tensor<1>,
        check_norm: bool,
    ) -> Tensor<1> {
        let mut finite = loss.clone().is_finite();
        if check_norm {
            finite = finite.bool_and(norm.clone().is_finite());
        }
        let keep = finite.float();
        let bad = keep.clone().neg().add_scalar(1.0);
        let first = self
            .first_step
            .clone()
            .equal_elem(0.0)
            .bool_and(bad.clone().greater_elem(0.5));
        let step_value = Tensor::<1>::full([1], step as f32, &keep.device());
        self.first_step = self
            .first_step
            .clone()
            .mask_where(first.clone(), step_value);
        self.first_loss = self.first_loss.clone().mask_where(first.clone(), loss);
        self.first_norm = self.first_norm.clone().mask_where(first, norm);
        self.skipped = self.skipped.clone() + bad.clone();
        self.streak = (self.streak.clone() + 1.0) * bad;
        keep
    }

    /// Adds the watch's values to `transaction`, as one `[5]` tensor (one read on wgpu); read
    /// them back with [`Self::report_from`].
    pub fn register(&self, transaction: Transaction) -> Transaction {
        let values = Tensor::cat(
            vec![
                self.first_step.clone(),
                self.first_loss.clone(),
                self.first_norm.clone(),
                self.skipped.clone(),
                self.streak.clone(),
            ],
            0,
        );
        transaction.register(values)
    }

    /// The report from the values [`Self::register`] added, the next item of `data`.
    pub fn report_from(data: &mut impl Iterator<Item = TensorData>) -> NonFiniteReport {
        let values: Vec<f64> = data
            .next()
            .map(|data| data.iter::<f64>().collect())
            .unwrap_or_default();
        let value = |i: usize| values.get(i).copied().unwrap_or(f64::NAN);
        let (step, loss, norm, skipped, streak) =
            (value(0), value(1), value(2), value(3), value(4));
        NonFiniteReport {
            first: (step > 0.0).then_some((step as usize, loss, norm)),
            skipped: skipped.max(0.0) as u64,
            streak: streak.max(0.0) as u64,
        }
    }

    /// Reads the watch alone (one synchronisation).
    pub fn read(&self) -> NonFiniteReport {
        let data = self.register(Transaction::default()).execute();
        Self::report_from(&mut data.into_iter())
    }
}

/// When a finite loss counts as exploding: a logged loss more than `ratio` times its running
/// mean and `nats` above it is a spike (a warning); `logged_steps` spikes in a row are a
/// divergence. The running mean starts after [`SPIKE_WARM_UP`] logged losses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExplosionRule {
    /// A spike is more than this many times the running mean...
    pub ratio: f64,
    /// ... and this many nats above it (small losses of small batches jump by 1.5x as noise:
    /// a captioning loss of 0.3 at 0.5).
    pub nats: f64,
    /// Spikes in a row (logged steps) that stop the run.
    pub logged_steps: usize,
}

impl ExplosionRule {
    /// Whether `loss` is far above `reference` by this rule: more than `ratio` times it and
    /// `nats` above it.
    pub fn is_far_above(&self, loss: f64, reference: f64) -> bool {
        loss > self.ratio * reference && loss > reference + self.nats
    }
}

impl Default for ExplosionRule {
    fn default() -> Self {
        Self {
            ratio: 1.5,
            nats: 1.0,
            logged_steps: 3,
        }
    }
}

/// Warns when a logged loss is far above its running mean, and tells a streak of such losses
/// (see [`ExplosionRule`]).
#[derive(Debug, Clone, Default)]
pub struct SpikeDetector {
    rule: ExplosionRule,
    mean: Option<f64>,
    seen: usize,
    /// The first step of the current streak of spikes, and its length.
    streak: Option<(usize, usize)>,
}

/// A logged loss found far above its running mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spike {
    /// The running mean it is compared with.
    pub mean: f64,
    /// The first step of the streak of spikes it belongs to.
    pub since: usize,
    /// Spikes in the streak, this one included.
    pub in_a_row: usize,
    /// Whether the streak is long enough to stop the run ([`ExplosionRule::logged_steps`]).
    pub exploded: bool,
}

/// Logged losses averaged before spikes are looked for (the first steps fall fast).
pub const SPIKE_WARM_UP: usize = 5;
/// Weight of the newest loss in the running mean.
const SPIKE_DECAY: f64 = 0.1;

impl SpikeDetector {
    /// A detector with `rule`'s thresholds.
    pub fn new(rule: ExplosionRule) -> Self {
        Self {
            rule,
            ..Self::default()
        }
    }

    /// Adds the finite logged loss of `step`; returns the spike it is, if it is one.
    pub fn observe(&mut self, step: usize, loss: f64) -> Option<Spike> {
        if !loss.is_finite() {
            return None;
        }
        let rule = self.rule;
        let spike = match self.mean {
            Some(mean) if self.seen >= SPIKE_WARM_UP && rule.is_far_above(loss, mean) => {
                let (since, in_a_row) = self.streak.map_or((step, 1), |(since, n)| (since, n + 1));
                self.streak = Some((since, in_a_row));
                Some(Spike {
                    mean,
                    since,
                    in_a_row,
                    exploded: in_a_row >= rule.logged_steps.max(1),
                })
            }
            _ => {
                self.streak = None;
                None
            }
        };
        self.seen += 1;
        self.mean = Some(match self.mean {
            // A spike enters the mean damped, so one spike does not hide the next.
            Some(mean) => mean + SPIKE_DECAY * (loss.min(2.0 * mean) - mean),
            None => loss,
        });
        spike
    }

    /// The first step of the streak of spikes the latest logged loss belongs to, if it was
    /// one: where the trouble a following NaN ends began.
    pub fn trouble_since(&self) -> Option<usize> {
        self.streak.map(|(since, _)| since)
    }
}

/// Counts each parameter's non-finite values, keeping the parameter's path.
struct CountNonFinite {
    path: Vec<String>,
    counts: Vec<(String, Tensor<1>)>,
}

impl ModuleVisitor for CountNonFinite {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let bad = value
            .is_finite()
            .bool_not()
            .float()
            .sum()
            .without_autodiff();
        self.counts.push((self.path.join("."), bad));
    }
}

/// The parameters of `model` that hold NaN or infinite values: `(path, count)` of each, in the
/// model's order (one read).
pub fn non_finite_parameters<M: Module>(model: &M) -> Vec<(String, usize)> {
    let mut visitor = CountNonFinite {
        path: Vec::new(),
        counts: Vec::new(),
    };
    model.visit(&mut visitor);
    if visitor.counts.is_empty() {
        return Vec::new();
    }
    // One tensor of all the counts: one read.
    let counts = Tensor::cat(
        visitor
            .counts
            .iter()
            .map(|(_, count)| count.clone())
            .collect(),
        0,
    );
    let values: Vec<f64> = counts.into_data().iter::<f64>().collect();
    visitor
        .counts
        .into_iter()
        .zip(values)
        .filter_map(|((path, _), count)| (count > 0.0).then_some((path, count as usize)))
        .collect()
}

/// A divergence found: where, and from which step on the weights are suspect.
pub(crate) struct Divergence {
    /// The first step whose values were not finite (or whose evaluation was not).
    pub(crate) step: usize,
    /// Checkpoints of this step minus one and later hold the weights that gave them.
    pub(crate) bad_from: usize,
    /// What was not finite, with its value.
    pub(crate) what: String,
}

/// Turns what [`NonFiniteWatch`] reports into a decision: go on, warn about skipped steps, or
/// stop.
pub(crate) struct DivergenceGuard {
    pub(crate) mode: OnNonFinite,
    pub(crate) skipped_reported: u64,
}

impl DivergenceGuard {
    pub(crate) fn new(mode: OnNonFinite) -> Self {
        Self {
            mode,
            skipped_reported: 0,
        }
    }

    /// `None` to go on; the divergence to stop for otherwise. `step` is the step the report was
    /// read at.
    pub(crate) fn check(
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
pub(crate) fn divergence_error(out: &Path, found: Divergence, keep: usize) -> Result<TrainError> {
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
pub(crate) fn describe(loss: f64, norm: f64) -> String {
    if !loss.is_finite() {
        format!("the loss is {loss} (gradient norm {norm})")
    } else {
        format!("the gradient norm is {norm} (loss {loss})")
    }
}
