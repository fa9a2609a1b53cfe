//! A dense matrix product `x · w` with a 2D right-hand side (a linear layer's weight), as one
//! operation with its own backward pass.
//!
//! `y = x · w` for `x: [..., K]` (leading dimensions flattened into `M` rows) and `w: [K, N]`;
//! `grad_x = grad_y · wᵀ`, `grad_w = xᵀ · grad_y`. The default body is Burn's matmul (ndarray,
//! wgpu); flex calls the same GEMM as its own matmul, but writes each output once (flex's matmul
//! zero-fills its output and copies it to realign before the GEMM writes it) and passes
//! transposed operands as strided views, so the backward products copy nothing.

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

/// Backends that multiply `[M, K] x [K, N]` matrices. The default body is Burn's matmul; flex
/// overrides it with one GEMM call that writes its output once.
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
}

#[cfg(feature = "ndarray")]
impl MatmulBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl MatmulBackend for burn::backend::Cube {}

/// The backward step of [`matmul`].
#[derive(Debug)]
struct MatmulBackward;

/// Saved by the forward pass: `x` when `w` needs a gradient, `w` when `x` does.
type SavedOperands<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

impl<B: Backend + MatmulBackend> Backward<B, 2> for MatmulBackward {
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
        if let (Some(node), Some(w)) = (x_node, w) {
            let grad_x = B::matmul_2d(grad.clone(), B::float_transpose(w));
            grads.register::<B>(node.id, grad_x);
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            grads.register::<B>(node.id, B::matmul_2d(B::float_transpose(x), grad));
        }
    }
}

impl<B: Backend + MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
        match MatmulBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let saved_x = w_tracked.then(|| x.primitive().clone());
                let saved_w = x_tracked.then(|| w.primitive().clone());
                let output = B::matmul_2d(x.into_primitive(), w.into_primitive());
                prep.finish((saved_x, saved_w), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::matmul_2d(x.into_primitive(), w.into_primitive()))
            }
        }
    }
}
