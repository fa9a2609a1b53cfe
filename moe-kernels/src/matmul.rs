//! Dense matrix products as single operations with their own backward passes: [`matmul`]
//! (`x · w` with a 2D right-hand side, a linear layer's weight) and [`batched_matmul`] (one
//! product per batch entry: attention heads, stacked experts).
//!
//! `y = x · w`, `grad_x = grad_y · wᵀ`, `grad_w = xᵀ · grad_y` (per batch entry). The default
//! bodies are Burn's matmul (ndarray, wgpu); flex calls the same GEMM as its own matmul, but
//! writes each output once (flex's matmul zero-fills its output and copies it to realign before
//! the GEMM writes it) and passes transposed operands as strided views, so the backward
//! products copy nothing.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch};
use burn::tensor::Tensor;

/// `y = x · w` for `x: [..., K]` and `w: [K, N]`, giving `[..., N]`; differentiable in both.
///
/// # Panics
///
/// If the last dimension of `x` is not the first of `w`.
pub fn matmul<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let [inner, columns] = w.dims();
    assert_eq!(
        dims[D - 1],
        inner,
        "matmul: x is {dims:?} and w is {:?}; expected [..., K] and [K, N]",
        w.dims()
    );
    let rows = dims[..D - 1].iter().product::<usize>();
    let x = x.reshape([rows, inner]);
    let product: Tensor<2> = Tensor::from_dispatch(<Dispatch as MatmulBackend>::matmul_2d(
        x.into_dispatch(),
        w.into_dispatch(),
    ));
    let mut out_dims = dims;
    out_dims[D - 1] = columns;
    product.reshape(out_dims)
}

/// `y[e] = x[e] · w[e]` for `x: [E, M, K]` and `w: [E, K, N]`, giving `[E, M, N]`;
/// differentiable in both.
///
/// # Panics
///
/// If the batch sizes differ or the inner sizes do not match.
pub fn batched_matmul(x: Tensor<3>, w: Tensor<3>) -> Tensor<3> {
    let ([batch, _, inner], [w_batch, w_inner, _]) = (x.dims(), w.dims());
    assert!(
        batch == w_batch && inner == w_inner,
        "batched_matmul: x is {:?} and w is {:?}; expected [E, M, K] and [E, K, N]",
        x.dims(),
        w.dims()
    );
    Tensor::from_dispatch(<Dispatch as MatmulBackend>::batched_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// Backends that multiply matrices. The default bodies are Burn's matmul; flex overrides them
/// with GEMM calls that write their output once.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait MatmulBackend: Backend {
    /// `[M, K] x [K, N] -> [M, N]` (see [`matmul`]).
    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }

    /// `[E, M, K] x [E, K, N] -> [E, M, N]` (see [`batched_matmul`]).
    fn batched_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }
}

#[cfg(feature = "ndarray")]
impl MatmulBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl MatmulBackend for burn::backend::Cube {}

/// A product of two tensors on the inner backend (`matmul_2d` or `batched_matmul`).
type Product<B> = fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>;

/// The backward step of a product `y = x · w`: the same product with transposed operands.
#[derive(Debug)]
struct MatmulBackward<B: Backend> {
    product: Product<B>,
}

/// Saved by the forward pass: `x` when `w` needs a gradient, `w` when `x` does.
type SavedOperands<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

impl<B: Backend> Backward<B, 2> for MatmulBackward<B> {
    type State = SavedOperands<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, w) = ops.state;
        let [x_node, w_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        // `float_transpose` swaps the last two dimensions: per batch entry for batched products.
        if let (Some(node), Some(w)) = (x_node, w) {
            let grad_x = (self.product)(grad.clone(), B::float_transpose(w));
            grads.register::<B>(node.id, grad_x);
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            let grad_w = (self.product)(B::float_transpose(x), grad);
            grads.register::<B>(node.id, grad_w);
        }
    }
}

/// Runs `product` on the inner backend and, when an operand is tracked, records one node that
/// saves what the other operand's gradient needs.
fn tracked_product<B: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    product: Product<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    match (MatmulBackward { product })
        .prepare::<C>([x.node(), w.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let saved_x = w_tracked.then(|| x.primitive().clone());
            let saved_w = x_tracked.then(|| w.primitive().clone());
            let output = product(x.into_primitive(), w.into_primitive());
            prep.finish((saved_x, saved_w), output)
        }
        OpsKind::UnTracked(prep) => prep.finish(product(x.into_primitive(), w.into_primitive())),
    }
}

impl<B: Backend + MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked_product::<B, C>(x, w, B::matmul_2d)
    }

    fn batched_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked_product::<B, C>(x, w, B::batched_matmul)
    }
}
