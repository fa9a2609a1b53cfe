//! One AdamW update of a parameter as one operation.
//!
//! AdamW (Loshchilov and Hutter, *Decoupled Weight Decay Regularization*, 2019) with Adam's
//! moments (Kingma and Ba, 2015), for gradient `g` at step `t` (counted from 1):
//!
//! ```text
//! m ← β₁ m + (1 - β₁) g          v ← β₂ v + (1 - β₂) g²
//! m̂ = m / (1 - β₁ᵗ)              v̂ = v / (1 - β₂ᵗ)
//! θ ← θ (1 - lr λ) - lr m̂ / (√v̂ + ε)
//! ```
//!
//! the same formula, in the same order, as burn-optim's `AdamW`. Composed from Burn's ops it is
//! about a dozen element-wise passes over the parameter, each writing a new tensor (flex runs
//! them on one core); on flex this is one parallel pass that reads `θ, g, m, v` and writes the
//! new `θ, m, v` ([`AdamWBackend`]).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, Dispatch};
use burn::tensor::Tensor;
use moe_macros::moe_extension;

/// The hyper-parameters of one AdamW update, and the step it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate `lr`.
    pub lr: f64,
    /// Decay of the first moment, `β₁`.
    pub beta_1: f32,
    /// Decay of the second moment, `β₂`.
    pub beta_2: f32,
    /// `ε`, added to `√v̂`.
    pub epsilon: f32,
    /// Decoupled weight decay `λ` (the parameter shrinks by `lr λ` of itself).
    pub weight_decay: f32,
    /// The step `t`, from 1: the bias corrections divide by `1 - βᵗ`.
    pub time: usize,
}

impl AdamWStep {
    /// The scalars of the update, as burn-optim's `AdamW` rounds them to `f32`:
    /// `(β₁, 1 - β₁, β₂, 1 - β₂, 1 - β₁ᵗ, 1 - β₂ᵗ, ε, 1 - lr λ, lr)`.
    pub(crate) fn scalars(&self) -> Scalars {
        let time = self.time.min(i32::MAX as usize) as i32;
        Scalars {
            beta_1: self.beta_1,
            one_minus_beta_1: 1.0 - self.beta_1,
            beta_2: self.beta_2,
            one_minus_beta_2: 1.0 - self.beta_2,
            correction_1: 1.0 - self.beta_1.powi(time),
            correction_2: 1.0 - self.beta_2.powi(time),
            epsilon: self.epsilon,
            keep: (1.0 - self.lr * self.weight_decay as f64) as f32,
            lr: self.lr as f32,
        }
    }
}

/// [`AdamWStep`] as the `f32` factors the update multiplies and divides by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scalars {
    pub(crate) beta_1: f32,
    pub(crate) one_minus_beta_1: f32,
    pub(crate) beta_2: f32,
    pub(crate) one_minus_beta_2: f32,
    pub(crate) correction_1: f32,
    pub(crate) correction_2: f32,
    pub(crate) epsilon: f32,
    pub(crate) keep: f32,
    pub(crate) lr: f32,
}

/// One AdamW update: `(θ, m, v)` after the step, from the parameter `param`, its gradient
/// `grad` and the moments before it (`None` before the first step: zeros). Not tracked by
/// autodiff (an optimizer step).
///
/// # Panics
///
/// If the shapes differ, or `step.time` is 0.
pub fn adamw_update<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<(Tensor<D>, Tensor<D>)>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    assert!(step.time >= 1, "adamw_update: steps count from 1");
    assert!(
        param.dims() == grad.dims(),
        "adamw_update: the parameter is {:?} but its gradient {:?}",
        param.dims(),
        grad.dims()
    );
    let (moment_1, moment_2) = moments.unwrap_or_else(|| (grad.zeros_like(), grad.zeros_like()));
    assert!(
        moment_1.dims() == param.dims() && moment_2.dims() == param.dims(),
        "adamw_update: the moments are {:?} and {:?}, the parameter {:?}",
        moment_1.dims(),
        moment_2.dims(),
        param.dims()
    );
    let (param, moment_1, moment_2) = <Dispatch as AdamWBackend>::adamw_update(
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        step,
    );
    (
        Tensor::from_dispatch(param),
        Tensor::from_dispatch(moment_1),
        Tensor::from_dispatch(moment_2),
    )
}

/// Backends that run an AdamW update as one operation. The default body composes Burn's ops
/// (correct everywhere); flex overrides it with one pass, cube with one kernel launch.
#[moe_extension(fusion)]
pub trait AdamWBackend: Backend {
    /// See [`adamw_update`]: `(θ, m, v)` after the step.
    #[fusion(meta = |param, _grad, _moment_1, _moment_2, _step| (param.clone(), param.clone(), param.clone()))]
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed_adamw_update::<Self>(param, grad, moment_1, moment_2, step)
    }
}

/// [`AdamWBackend::adamw_update`] from Burn's ops, in burn-optim's order.
pub(crate) fn composed_adamw_update<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moment_1: FloatTensor<B>,
    moment_2: FloatTensor<B>,
    step: AdamWStep,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let s = step.scalars();
    let moment_1 = B::float_add(
        B::float_mul_scalar(moment_1, s.beta_1.into()),
        B::float_mul_scalar(grad.clone(), s.one_minus_beta_1.into()),
    );
    let moment_2 = B::float_add(
        B::float_mul_scalar(moment_2, s.beta_2.into()),
        B::float_mul_scalar(B::float_mul(grad.clone(), grad), s.one_minus_beta_2.into()),
    );
    let corrected_1 = B::float_div_scalar(moment_1.clone(), s.correction_1.into());
    let corrected_2 = B::float_div_scalar(moment_2.clone(), s.correction_2.into());
    let delta = B::float_div(
        corrected_1,
        B::float_add_scalar(B::float_sqrt(corrected_2), s.epsilon.into()),
    );
    let param = B::float_sub(
        B::float_mul_scalar(param, s.keep.into()),
        B::float_mul_scalar(delta, s.lr.into()),
    );
    (param, moment_1, moment_2)
}

#[cfg(feature = "ndarray")]
impl AdamWBackend for burn::backend::NdArray {}

/// On an autodiff device the update runs on the inner tensors and its results are not tracked.
impl<B: Backend + AdamWBackend, C: CheckpointStrategy> AdamWBackend for Autodiff<B, C> {
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (param, moment_1, moment_2) = B::adamw_update(
            Self::inner(param),
            Self::inner(grad),
            Self::inner(moment_1),
            Self::inner(moment_2),
            step,
        );
        (
            Self::from_inner(param),
            Self::from_inner(moment_1),
            Self::from_inner(moment_2),
        )
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl AdamWBackend for burn::backend::Remote {}
