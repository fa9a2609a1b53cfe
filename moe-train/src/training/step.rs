//! The end of a training step: data-parallel outputs averaged, gradients unscaled, clipped,
//! watched and applied (or vetoed).

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};

use crate::data::tasks::StepOutput;
use crate::training::clip::{unscale_and_clip, GradientNorms};
use crate::training::divergence::NonFiniteWatch;
use crate::training::loss_scale::{LossScaler, UpdateVeto, GROWTH_INTERVAL};

/// The mean of the data-parallel slices' outputs on `home` (each slice holds as many examples):
/// losses averaged, tokens added, the first slice's routing statistics.
pub(super) fn averaged(mut outputs: Vec<StepOutput>, home: &Device) -> StepOutput {
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
pub(super) struct MixedPrecision {
    pub(super) scaler: LossScaler,
}

impl MixedPrecision {
    pub(super) fn new(device: &Device) -> Self {
        Self {
            scaler: LossScaler::new(device, GROWTH_INTERVAL),
        }
    }
}

/// What decides whether a step's update is applied: the loss scale's overflow check (mixed
/// precision) and the non-finite watch (which vetoes a step only under
/// [`OnNonFinite::Skip`]).
pub(super) struct Gating<'a> {
    pub(super) mixed: Option<&'a mut MixedPrecision>,
    pub(super) watch: &'a mut NonFiniteWatch,
    /// The flag the optimizer reads (present under mixed precision or skipping).
    pub(super) veto: Option<&'a UpdateVeto>,
    pub(super) skip: bool,
    pub(super) step: usize,
    /// The step's loss summed over its micro-batches, `[1]`, without autodiff.
    pub(super) loss: Tensor<1>,
}

/// The end of a step, after the backward passes: the gradients unscaled (mixed precision) and
/// clipped in one multiplication, the loss and norm watched for non-finite values, the scale
/// moved and the step skipped if the gradients overflowed (or, when asked, if the loss or norm
/// is not finite), and the optimizer's update. Returns the model and the norms (with the factor
/// the gradients were multiplied by, for the data-parallel replicas).
pub(super) fn apply_gradients<M: Module>(
    model: M,
    mut grads: GradientsParams,
    optimizer: &mut burn::optim::ModuleOptimizer,
    gating: Gating<'_>,
    lr: f64,
    max_norm: f64,
) -> (M, Option<GradientNorms>) {
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
    if let Some(veto) = gating.veto {
        veto.set(keep);
    }
    let model = optimizer.step(lr, model, grads);
    (model, norms)
}
