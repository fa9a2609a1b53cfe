//! RMSNorm (Zhang and Sennrich 2019) as one operation with its own backward pass.
//!
//! Along the last dimension of length `n`: `r = 1 / √(mean(x²) + ε)`, `y = γ ⊙ x r`. With
//! `x̂ = x r` and the output's gradient `g`:
//!
//! `grad_x = r (g ⊙ γ - x̂ mean(g ⊙ γ ⊙ x̂))`, `grad_γ = Σ_rows g ⊙ x̂`.
//!
//! Burn's `RmsNorm` composes it from six ops (square, mean, add, sqrt, divide, multiply), each
//! an autodiff node, most of them keeping a `[rows, n]` tensor; here one node keeps `x` and `γ`
//! and the backward pass recomputes `r`. flex runs each direction as one pass over the rows
//! ([`RmsNormBackend`]).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, TensorMetadata};
use burn::tensor::{Shape, Tensor};
use moe_macros::moe_extension;

/// RMSNorm of `x` along its last dimension with the scale `gamma` (`[n]`), differentiable in
/// both.
///
/// # Panics
///
/// If the last dimension of `x` is not `gamma`'s length.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, epsilon: f64) -> Tensor<D> {
    let dims = x.dims();
    assert!(
        D >= 1 && dims[D - 1] == gamma.dims()[0],
        "rms_norm: x is {dims:?} and gamma {:?}; expected [.., n] and [n]",
        gamma.dims()
    );
    Tensor::from_dispatch(<Dispatch as RmsNormBackend>::rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        epsilon,
    ))
}

/// Backends that run RMSNorm as one operation. The default bodies compose Burn's ops (correct
/// everywhere); flex overrides both with one pass over the rows, cube with one launch forward
/// and two backward.
#[moe_extension(fusion)]
pub trait RmsNormBackend: Backend {
    /// `γ ⊙ x / √(mean(x²) + ε)` along the last dimension of `x`.
    #[fusion(dtype = x, shape = x)]
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        composed_rms_norm::<Self>(x, gamma, epsilon)
    }

    /// `(grad_x, grad_γ)` of [`rms_norm`](Self::rms_norm) given its inputs and the gradient
    /// `grad` of its output.
    #[fusion(meta = |x, gamma, _grad, _epsilon| (x.clone(), gamma.clone()))]
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_rms_norm_backward::<Self>(x, gamma, grad, epsilon)
    }
}

/// `r = 1 / √(mean(x²) + ε)` of each row, `[.., 1]`.
fn inverse_rms<B: Backend>(x: FloatTensor<B>, epsilon: f64) -> FloatTensor<B> {
    let last = x.shape().num_dims() - 1;
    let mean_square = B::float_mean_dim(B::float_mul(x.clone(), x), last);
    B::float_recip(B::float_sqrt(B::float_add_scalar(
        mean_square,
        epsilon.into(),
    )))
}

/// `gamma: [n]` as `[1, .., 1, n]`, of the rank of `shape`, to broadcast over the rows.
fn broadcast_row<B: Backend>(gamma: FloatTensor<B>, shape: &Shape) -> FloatTensor<B> {
    let rank = shape.num_dims();
    let mut dims = vec![1; rank];
    dims[rank - 1] = shape[rank - 1];
    B::float_reshape(gamma, Shape::from(dims))
}

/// [`RmsNormBackend::rms_norm`] from Burn's ops.
pub(crate) fn composed_rms_norm<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
) -> FloatTensor<B> {
    let gamma = broadcast_row::<B>(gamma, &x.shape());
    let r = inverse_rms::<B>(x.clone(), epsilon);
    B::float_mul(B::float_mul(x, r), gamma)
}

/// [`RmsNormBackend::rms_norm_backward`] from Burn's ops.
pub(crate) fn composed_rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    grad: FloatTensor<B>,
    epsilon: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let last = shape.num_dims() - 1;
    let n = shape[last];
    let r = inverse_rms::<B>(x.clone(), epsilon);
    let normed = B::float_mul(x, r.clone());
    let scaled_grad = B::float_mul(grad.clone(), broadcast_row::<B>(gamma, &shape));
    let mean = B::float_mean_dim(B::float_mul(scaled_grad.clone(), normed.clone()), last);
    let grad_x = B::float_mul(
        r,
        B::float_sub(scaled_grad, B::float_mul(normed.clone(), mean)),
    );
    let rows = shape.num_elements() / n.max(1);
    let flat = |t: FloatTensor<B>| B::float_reshape(t, Shape::new([rows, n]));
    let grad_gamma = B::float_reshape(
        B::float_sum_dim(B::float_mul(flat(grad), flat(normed)), 0),
        Shape::new([n]),
    );
    (grad_x, grad_gamma)
}

#[cfg(feature = "ndarray")]
impl RmsNormBackend for burn::backend::NdArray {}

/// The backward step of [`rms_norm`], from its saved inputs.
#[derive(Debug)]
struct RmsNormBackward;

impl<B: Backend + RmsNormBackend> Backward<B, 2> for RmsNormBackward {
    /// `(x, γ, ε)`.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, gamma, epsilon) = ops.state;
        let [x_node, gamma_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (grad_x, grad_gamma) = B::rms_norm_backward(x, gamma, grad, epsilon);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, grad_x);
        }
        if let Some(node) = gamma_node {
            grads.register::<B>(node.id, grad_gamma);
        }
    }
}

impl<B: Backend + RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        match RmsNormBackward
            .prepare::<C>([x.node(), gamma.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
                let output = B::rms_norm(x.clone(), gamma.clone(), epsilon);
                prep.finish((x, gamma, epsilon), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                epsilon,
            )),
        }
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl RmsNormBackend for burn::backend::Remote {}
