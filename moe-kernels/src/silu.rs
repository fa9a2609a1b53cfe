//! SiLU (swish) as one Burn operation with its own backward pass.
//!
//! `silu(x) = x σ(x)`, `σ(x) = 1 / (1 + e^{-x})` (Elfwing et al. 2018; the gate of SwiGLU,
//! Shazeer 2020), and `silu'(x) = σ(x) (1 + x (1 - σ(x)))`.
//!
//! Composed from Burn's ops it is four autodiff nodes; this is one, fused on flex
//! ([`SiluBackend`]). Burn 0.22's `activation::silu` is not a substitute: its `sigmoid` computes
//! in f32 even on f64 tensors.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::tensor::Tensor;

use crate::autodiff::{unary, Saved};

/// SiLU of every element of `x`, differentiable.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as SiluBackend>::silu_forward(x.into_dispatch()))
}

/// Backends that run SiLU as one operation. The default bodies compose Burn's ops (correct
/// everywhere, in the input's precision); flex overrides both with vectorised kernels.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Remote: cfg(feature = "remote"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait SiluBackend: Backend {
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

/// [`SiluBackend::silu_forward`] from Burn's ops: `x / (1 + e^{-x})`.
pub(crate) fn composed_silu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let denominator = B::float_add_scalar(B::float_exp(B::float_neg(x.clone())), 1.0.into());
    B::float_div(x, denominator)
}

/// [`SiluBackend::silu_backward`] from Burn's ops.
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
impl SiluBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl SiluBackend for burn::backend::Cube {}

impl<B: Backend + SiluBackend, C: CheckpointStrategy> SiluBackend for Autodiff<B, C> {
    fn silu_forward(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, B::silu_forward, B::silu_backward, Saved::Input)
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl SiluBackend for burn::backend::Remote {}
