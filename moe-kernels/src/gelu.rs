//! The exact GELU as one Burn operation with its own backward pass.
//!
//! `gelu(x) = x Φ(x)`, `Φ(x) = (1 + erf(x / √2)) / 2` (Hendrycks and Gimpel 2016), and
//! `gelu'(x) = Φ(x) + x φ(x)`, `φ(x) = e^{-x²/2} / √(2π)`.
//!
//! Composed from Burn's ops, autodiff records six nodes and keeps their intermediates; this
//! operation records one node, keeps only `x`, and lets a backend replace the forward and the
//! backward with one fused kernel each ([`GeluBackend`]). Burn 0.22's own `activation::gelu`
//! is not a substitute: on ndarray its backward is the tanh approximation's derivative.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use std::f64::consts::{FRAC_1_SQRT_2, PI};

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::tensor::Tensor;

use crate::autodiff::{unary, Saved};

/// The exact GELU of every element of `x`, differentiable.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GeluBackend>::gelu_exact(x.into_dispatch()))
}

/// Backends that run the exact GELU as one operation. The default bodies compose Burn's ops
/// (correct everywhere); flex overrides both with vectorised kernels.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Remote: cfg(feature = "remote"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait GeluBackend: Backend {
    /// `x Φ(x)`, element-wise.
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_gelu::<Self>(x)
    }

    /// `grad (Φ(x) + x φ(x))`, element-wise: the gradient of [`gelu_exact`](Self::gelu_exact) at `x` given
    /// the gradient `grad` of its output.
    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_gelu_backward::<Self>(x, grad)
    }
}

/// [`GeluBackend::gelu_exact`] from Burn's ops.
pub(crate) fn composed_gelu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let cdf = normal_cdf::<B>(x.clone());
    B::float_mul(x, cdf)
}

/// [`GeluBackend::gelu_exact_backward`] from Burn's ops.
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

#[cfg(feature = "ndarray")]
impl GeluBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl GeluBackend for burn::backend::Cube {}

impl<B: Backend + GeluBackend, C: CheckpointStrategy> GeluBackend for Autodiff<B, C> {
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, B::gelu_exact, B::gelu_exact_backward, Saved::Input)
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl GeluBackend for burn::backend::Remote {}
