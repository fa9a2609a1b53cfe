//! Inverted dropout with a mask drawn in one pass (Srivastava et al. 2014):
//! `y = x · m`, `m = 1 / (1 - p)` with probability `1 - p`, else `0`; `grad_x = grad_y · m`.
//!
//! Burn's `Dropout` draws its mask element by element through a general-purpose sampler
//! (ChaCha, one call per element), which takes a tenth of a training step of our `small`
//! model on flex. Here the mask is one operation ([`DropoutBackend::dropout_mask`]): flex
//! fills it with [`crate::counter_rng`] draws keyed by two numbers taken from Burn's own
//! random stream, so `device.seed(..)` still makes a run reproducible; the default body (other
//! backends) draws a Bernoulli tensor with Burn's sampler, as `Dropout` does.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, Backend, Dispatch, TensorMetadata};
use burn::tensor::{Distribution, Tensor};
use moe_macros::moe_extension;

/// `x` with each element zeroed with probability `prob` and the others scaled by
/// `1 / (1 - prob)`, differentiable in `x` (the mask is a constant).
///
/// Applies dropout whatever the device: callers decide when they are training (moe-models
/// does as Burn's `Dropout`: on autodiff devices only).
///
/// # Panics
///
/// If `prob` is not in `[0, 1)`.
pub fn dropout<const D: usize>(x: Tensor<D>, prob: f64) -> Tensor<D> {
    assert!(
        (0.0..1.0).contains(&prob),
        "dropout: the probability must be in [0, 1), got {prob}"
    );
    if prob == 0.0 {
        return x;
    }
    let key = Tensor::<1>::random([2], Distribution::Default, &x.device());
    let mask = Tensor::<D>::from_dispatch(<Dispatch as DropoutBackend>::dropout_mask(
        x.clone().into_dispatch(),
        key.into_dispatch(),
        prob,
    ));
    x * mask
}

/// Backends that draw a dropout mask as one operation.
#[moe_extension]
pub trait DropoutBackend: Backend {
    /// A mask of `x`'s shape and dtype: `1 / (1 - prob)` with probability `1 - prob`, else
    /// `0`, each element independently. `key` (two uniform numbers in `[0, 1)`, drawn from
    /// Burn's random stream) may seed the draw; the default body ignores it and draws from
    /// Burn's sampler.
    fn dropout_mask(x: FloatTensor<Self>, key: FloatTensor<Self>, prob: f64) -> FloatTensor<Self> {
        let _ = key;
        let keep = 1.0 - prob;
        let mask = Self::float_random(
            x.shape(),
            Distribution::Bernoulli(keep),
            &x.device(),
            x.dtype().into(),
        );
        Self::float_mul_scalar(mask, (1.0 / keep).into())
    }
}

#[cfg(feature = "ndarray")]
impl DropoutBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl DropoutBackend for burn::backend::Cube {}

impl<B: Backend + DropoutBackend, C: CheckpointStrategy> DropoutBackend for Autodiff<B, C> {
    fn dropout_mask(x: FloatTensor<Self>, key: FloatTensor<Self>, prob: f64) -> FloatTensor<Self> {
        // The mask is a constant of the graph: a fresh, untracked tensor.
        let mask = B::dropout_mask(x.primitive().clone(), key.into_primitive(), prob);
        <Self as AutodiffBackend>::from_inner(mask)
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl DropoutBackend for burn::backend::Remote {}
