//! The experts' activations, each one Burn operation with its own backward pass.
//!
//! - GELU, exact: `gelu(x) = x Φ(x)`, `Φ(x) = (1 + erf(x / √2)) / 2` (Hendrycks and Gimpel
//!   2016), `gelu'(x) = Φ(x) + x φ(x)`, `φ(x) = e^{-x²/2} / √(2π)`.
//! - SiLU (swish): `silu(x) = x σ(x)`, `σ(x) = 1 / (1 + e^{-x})` (Elfwing et al. 2018; the gate
//!   of SwiGLU, Shazeer 2020), `silu'(x) = σ(x) (1 + x (1 - σ(x)))`.
//!
//! Composed from Burn's ops, autodiff records six nodes for GELU and four for SiLU and keeps
//! their intermediates; each operation here records one node and keeps only `x`, and a backend
//! may replace each forward and backward with one fused kernel ([`ActivationBackend`]; flex
//! does, with the two sharing one kernel shape in `flex/activations.rs`). Burn 0.22's own
//! activations are not substitutes: on ndarray `activation::gelu`'s backward is the tanh
//! approximation's derivative, and `activation::silu`'s `sigmoid` computes in f32 even on f64
//! tensors.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use std::f64::consts::{FRAC_1_SQRT_2, PI};

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch};
use burn::tensor::Tensor;
use moe_macros::moe_extension;

use crate::autodiff::{unary, Saved};

/// The exact GELU of every element of `x`, differentiable.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as ActivationBackend>::gelu_exact(
        x.into_dispatch(),
    ))
}

/// SiLU of every element of `x`, differentiable.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as ActivationBackend>::silu_forward(
        x.into_dispatch(),
    ))
}

/// Backends that run each activation as one operation. The default bodies compose Burn's ops
/// (correct everywhere, in the input's precision); flex overrides all four with vectorised
/// kernels.
#[moe_extension]
pub trait ActivationBackend: Backend {
    /// `x Φ(x)`, element-wise.
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_gelu::<Self>(x)
    }

    /// `grad (Φ(x) + x φ(x))`, element-wise: the gradient of [`gelu_exact`](Self::gelu_exact)
    /// at `x` given the gradient `grad` of its output.
    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_gelu_backward::<Self>(x, grad)
    }

    /// `x σ(x)`, element-wise.
    fn silu_forward(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_silu::<Self>(x)
    }

    /// `grad σ(x) (1 + x (1 - σ(x)))`, element-wise: the gradient of
    /// [`silu_forward`](Self::silu_forward) at `x` given the gradient `grad` of its output.
    fn silu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_silu_backward::<Self>(x, grad)
    }
}

/// [`ActivationBackend::gelu_exact`] from Burn's ops.
pub(crate) fn composed_gelu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let cdf = normal_cdf::<B>(x.clone());
    B::float_mul(x, cdf)
}

/// [`ActivationBackend::gelu_exact_backward`] from Burn's ops.
pub(crate) fn composed_gelu_backward<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let cdf = normal_cdf::<B>(x.clone());
    let square = B::float_mul(x.clone(), x.clone());
    let density = B::float_mul_scalar(
        B::float_exp(B::float_mul_scalar(square, (-0.5).into())),
        (1.0 / (2.0 * PI).sqrt()).into(),
    );
    let slope = B::float_add(cdf, B::float_mul(x, density));
    B::float_mul(grad, slope)
}

/// `Φ(x) = (1 + erf(x / √2)) / 2` from Burn's ops.
fn normal_cdf<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let erf = B::float_erf(B::float_mul_scalar(x, FRAC_1_SQRT_2.into()));
    B::float_mul_scalar(B::float_add_scalar(erf, 1.0.into()), 0.5.into())
}

/// [`ActivationBackend::silu_forward`] from Burn's ops: `x / (1 + e^{-x})`.
pub(crate) fn composed_silu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let denominator = B::float_add_scalar(B::float_exp(B::float_neg(x.clone())), 1.0.into());
    B::float_div(x, denominator)
}

/// [`ActivationBackend::silu_backward`] from Burn's ops.
pub(crate) fn composed_silu_backward<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let denominator = B::float_add_scalar(B::float_exp(B::float_neg(x.clone())), 1.0.into());
    let sigmoid = B::float_recip(denominator);
    // 1 + x (1 - σ)
    let one_minus = B::float_add_scalar(B::float_neg(sigmoid.clone()), 1.0.into());
    let factor = B::float_add_scalar(B::float_mul(x, one_minus), 1.0.into());
    B::float_mul(grad, B::float_mul(sigmoid, factor))
}

#[cfg(feature = "ndarray")]
impl ActivationBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl ActivationBackend for burn::backend::Cube {}

impl<B: Backend + ActivationBackend, C: CheckpointStrategy> ActivationBackend for Autodiff<B, C> {
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, B::gelu_exact, B::gelu_exact_backward, Saved::Input)
    }

    fn silu_forward(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, B::silu_forward, B::silu_backward, Saved::Input)
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed defaults, which the
/// server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl ActivationBackend for burn::backend::Remote {}
