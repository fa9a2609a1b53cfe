//! Softmax and log-softmax as single Burn operations with their own backward passes.
//!
//! `y_i = e^{x_i - m} / Σ_j e^{x_j - m}` along one dimension, `m = max_j x_j` (for range only;
//! the result does not depend on it), and `grad_x = y ⊙ (grad_y - Σ_j grad_y_j y_j)`.
//! Log-softmax: `z_i = x_i - m - ln Σ_j e^{x_j - m}`, `grad_x = grad_z - e^z Σ_j grad_z_j`.
//!
//! Composed from Burn's ops each is five passes and five autodiff nodes that keep their
//! intermediates, and flex evaluates `exp` one element at a time through libm; here each is one
//! node that keeps only its output, and flex runs each row in one vectorised pass per direction
//! ([`SoftmaxBackend`]).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, TensorMetadata};
use burn::tensor::{FloatDType, Tensor, TensorData};
use moe_macros::moe_extension;

use crate::autodiff::{unary, Saved};

/// Softmax of `x` along `dim`, differentiable.
///
/// # Panics
///
/// If `dim` is not a dimension of `x`.
pub fn softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    assert!(dim < D, "softmax: dimension {dim} of a rank-{D} tensor");
    if dim + 1 == D {
        return softmax_last(x);
    }
    softmax_last(x.swap_dims(dim, D - 1)).swap_dims(dim, D - 1)
}

/// Softmax along the last dimension.
fn softmax_last<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as SoftmaxBackend>::softmax_last(
        x.into_dispatch(),
    ))
}

/// Causal softmax of attention scores `x: [.., queries, keys]` along the keys: query `i` sees
/// keys `0..=i + offset` (`offset`: the positions before the first query, as with a key/value
/// cache), the later keys get weight 0. The same as masking them with `-∞` and taking
/// [`softmax`] along the last dimension, without the mask tensor or its autodiff node, and with
/// no exponentials computed for the masked keys on flex. Differentiable; the gradient is
/// softmax's (zero at the masked keys).
///
/// # Panics
///
/// If `x` has fewer than two dimensions.
pub fn causal_softmax<const D: usize>(x: Tensor<D>, offset: usize) -> Tensor<D> {
    assert!(D >= 2, "causal_softmax: x must be [.., queries, keys]");
    Tensor::from_dispatch(<Dispatch as SoftmaxBackend>::causal_softmax_last(
        x.into_dispatch(),
        offset,
    ))
}

/// Log-softmax of `x` along `dim` (the log-probabilities of a cross-entropy), differentiable.
///
/// # Panics
///
/// If `dim` is not a dimension of `x`.
pub fn log_softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Tensor<D> {
    assert!(dim < D, "log_softmax: dimension {dim} of a rank-{D} tensor");
    let last = |x: Tensor<D>| {
        Tensor::from_dispatch(<Dispatch as SoftmaxBackend>::log_softmax_last(
            x.into_dispatch(),
        ))
    };
    if dim + 1 == D {
        return last(x);
    }
    last(x.swap_dims(dim, D - 1)).swap_dims(dim, D - 1)
}

/// Backends that run a softmax along the last dimension as one operation. The default bodies
/// compose Burn's ops (correct everywhere); flex overrides both with one pass per row, cube
/// with one launch per direction.
#[moe_extension(fusion)]
pub trait SoftmaxBackend: Backend {
    /// Softmax along the last dimension of `x`.
    #[fusion(dtype = x, shape = x)]
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_softmax::<Self>(x)
    }

    /// `y ⊙ (grad - Σ grad ⊙ y)` along the last dimension: the gradient of
    /// [`softmax_last`](Self::softmax_last) given its output `y` and the gradient `grad` of
    /// that output.
    #[fusion(dtype = y, shape = y)]
    fn softmax_last_backward(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_softmax_backward::<Self>(y, grad)
    }

    /// [`causal_softmax`]: softmax along the last dimension of `x: [.., queries, keys]` with
    /// key `j` of query `i` masked out when `j > i + offset`. Its gradient is
    /// [`softmax_last_backward`](Self::softmax_last_backward) of its output.
    #[fusion(dtype = x, shape = x)]
    fn causal_softmax_last(x: FloatTensor<Self>, offset: usize) -> FloatTensor<Self> {
        composed_causal_softmax::<Self>(x, offset)
    }

    /// Log-softmax along the last dimension of `x`.
    #[fusion(dtype = x, shape = x)]
    fn log_softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_log_softmax::<Self>(x)
    }

    /// `grad - e^z Σ grad` along the last dimension: the gradient of
    /// [`log_softmax_last`](Self::log_softmax_last) given its output `z` and the gradient
    /// `grad` of that output.
    #[fusion(dtype = z, shape = z)]
    fn log_softmax_last_backward(
        z: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_log_softmax_backward::<Self>(z, grad)
    }
}

/// [`SoftmaxBackend::softmax_last`] from Burn's ops.
pub(crate) fn composed_softmax<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let last = x.shape().num_dims() - 1;
    let max = B::float_max_dim(x.clone(), last);
    let exp = B::float_exp(B::float_sub(x, max));
    let sum = B::float_sum_dim(exp.clone(), last);
    B::float_div(exp, sum)
}

/// [`SoftmaxBackend::causal_softmax_last`] from Burn's ops: an additive `[queries, keys]` mask
/// (0 or `-∞`, built on the host: it is small) broadcast over the leading dimensions, then
/// [`composed_softmax`].
pub(crate) fn composed_causal_softmax<B: Backend>(
    x: FloatTensor<B>,
    offset: usize,
) -> FloatTensor<B> {
    let shape = x.shape();
    let rank = shape.num_dims();
    let (queries, keys) = (shape[rank - 2], shape[rank - 1]);
    let mask: Vec<f32> = (0..queries * keys)
        .map(|index| {
            let (query, key) = (index / keys, index % keys);
            if key > query + offset {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mut dims = vec![1; rank];
    dims[rank - 2] = queries;
    dims[rank - 1] = keys;
    let mask = B::float_from_data(TensorData::new(mask, dims), &x.device());
    let mask = B::float_cast(mask, FloatDType::from(x.dtype()));
    composed_softmax::<B>(B::float_add(x, mask))
}

/// [`SoftmaxBackend::softmax_last_backward`] from Burn's ops.
pub(crate) fn composed_softmax_backward<B: Backend>(
    y: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let last = y.shape().num_dims() - 1;
    let dot = B::float_sum_dim(B::float_mul(grad.clone(), y.clone()), last);
    B::float_mul(y, B::float_sub(grad, dot))
}

/// [`SoftmaxBackend::log_softmax_last`] from Burn's ops.
pub(crate) fn composed_log_softmax<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let last = x.shape().num_dims() - 1;
    let max = B::float_max_dim(x.clone(), last);
    let shifted = B::float_sub(x, max);
    let sum = B::float_sum_dim(B::float_exp(shifted.clone()), last);
    B::float_sub(shifted, B::float_log(sum))
}

/// [`SoftmaxBackend::log_softmax_last_backward`] from Burn's ops.
pub(crate) fn composed_log_softmax_backward<B: Backend>(
    z: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let last = z.shape().num_dims() - 1;
    let total = B::float_sum_dim(grad.clone(), last);
    B::float_sub(grad, B::float_mul(B::float_exp(z), total))
}

#[cfg(feature = "ndarray")]
impl SoftmaxBackend for burn::backend::NdArray {}

impl<B: Backend + SoftmaxBackend, C: CheckpointStrategy> SoftmaxBackend for Autodiff<B, C> {
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(x, B::softmax_last, B::softmax_last_backward, Saved::Output)
    }

    fn causal_softmax_last(x: FloatTensor<Self>, offset: usize) -> FloatTensor<Self> {
        unary::<B, C>(
            x,
            |x| B::causal_softmax_last(x, offset),
            B::softmax_last_backward,
            Saved::Output,
        )
    }

    fn log_softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        unary::<B, C>(
            x,
            B::log_softmax_last,
            B::log_softmax_last_backward,
            Saved::Output,
        )
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl SoftmaxBackend for burn::backend::Remote {}
