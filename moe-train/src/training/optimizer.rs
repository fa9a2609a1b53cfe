//! AdamW whose update of each parameter is one operation.
//!
//! [`FusedAdamW`] is burn-optim's `AdamW` (Loshchilov and Hutter, 2019; no AMSGrad, no cautious
//! decay) with the update of each parameter done by [`moe_kernels::adamw_update`]: the same
//! formula in the same order, and the same per-parameter state (`AdamWState`), so checkpoints
//! written with either optimizer load into the other. On flex the update is one parallel pass
//! over the parameter instead of a dozen element-wise ops on one core.

use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor};
use moe_kernels::{adamw_update, AdamWStep};

use crate::training::loss_scale::UpdateVeto;

/// AdamW with a fused update; build it with [`FusedAdamW::new`] and turn it into the
/// [`ModuleOptimizer`] the training loop steps with [`FusedAdamW::init`].
#[derive(Debug, Clone)]
pub struct FusedAdamW {
    /// Decay of the first moment, `β₁` (burn-optim's default 0.9).
    pub beta_1: f32,
    /// Decay of the second moment, `β₂` (default 0.999).
    pub beta_2: f32,
    /// `ε` added to `√v̂` (default 1e-5).
    pub epsilon: f32,
    /// Decoupled weight decay `λ`.
    pub weight_decay: f32,
    /// When set, whether each step is applied (mixed precision skips the steps whose scaled
    /// gradients overflowed, [`crate::training::loss_scale`]).
    pub veto: Option<UpdateVeto>,
}

impl FusedAdamW {
    /// burn-optim's `AdamWConfig` defaults with weight decay `weight_decay`.
    pub fn new(weight_decay: f32) -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay,
            veto: None,
        }
    }

    /// Applies a step only where `gate` says so: with a flag of 0 the parameters and the
    /// moments keep their values (the step count still advances, so the bias corrections of
    /// the steps after a skip use one more step than were applied).
    pub fn with_veto(mut self, veto: UpdateVeto) -> Self {
        self.veto = Some(veto);
        self
    }

    /// The optimizer of a whole module.
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (time, moments) = match state {
            Some(state) => (
                state.momentum.time + 1,
                Some((state.momentum.moment_1, state.momentum.moment_2)),
            ),
            None => (1, None),
        };
        let step = AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
        };
        let previous = self
            .veto
            .as_ref()
            .and_then(UpdateVeto::get)
            // The flag lives on the model's device; a replica's parameter may be elsewhere.
            .map(|keep| {
                (
                    keep.to_device(&tensor.device()),
                    tensor.clone(),
                    moments.clone(),
                )
            });
        let (mut tensor, mut moment_1, mut moment_2) = adamw_update(tensor, grad, moments, step);
        if let Some((keep, old, old_moments)) = previous {
            // A select, not a blend: a skipped step's values may be NaN or infinite.
            let skip = keep.equal_elem(0.0).reshape([1; D]).expand(tensor.dims());
            let (old_1, old_2) =
                old_moments.unwrap_or_else(|| (moment_1.zeros_like(), moment_2.zeros_like()));
            tensor = tensor.mask_where(skip.clone(), old);
            moment_1 = moment_1.mask_where(skip.clone(), old_1);
            moment_2 = moment_2.mask_where(skip, old_2);
        }
        let momentum = AdaptiveMomentumState {
            time,
            moment_1,
            moment_2,
            max_moment_2: None,
        };
        (tensor, Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
