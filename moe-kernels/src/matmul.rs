//! Dense matrix products as single operations with their own backward passes: [`matmul`]
//! (`x · w` with a 2D right-hand side, a linear layer's weight), [`batched_matmul`] (one
//! product per batch entry: stacked experts) and [`multi_head_matmul`] (one product per batch
//! entry and head, with the output stored the way the next operation reads it).
//!
//! `y = x · w`, `grad_x = grad_y · wᵀ`, `grad_w = xᵀ · grad_y` (per batch entry). The default
//! bodies are Burn's matmul (ndarray, wgpu); flex calls the same GEMM as its own matmul, but
//! writes each output once (flex's matmul zero-fills its output and copies it to realign before
//! the GEMM writes it) and passes transposed operands as strided views, so the backward
//! products copy nothing. Each gradient of [`multi_head_matmul`] is stored like its operand,
//! so attention's heads are split and merged again without a copy in either direction.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch};
use burn::tensor::Tensor;
use moe_macros::moe_extension;

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

/// How [`multi_head_matmul`] stores its `[B, H, M, N]` output (the values are the same either
/// way; only the backends with their own kernel, flex, follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// Row-major `[B, H, M, N]`: each head's matrix in one piece, as a row-wise softmax over
    /// attention scores reads it.
    Separate,
    /// Stored as `[B, M, H, N]`: the heads of each row side by side, so that
    /// `y.swap_dims(1, 2).reshape([B, M, H * N])` (attention merging its heads) copies nothing.
    Merged,
}

impl HeadLayout {
    /// The dimensions of `[B, H, M, N]` in storage order, outermost first.
    fn storage_order(self) -> [usize; 4] {
        match self {
            HeadLayout::Separate => [0, 1, 2, 3],
            HeadLayout::Merged => [0, 2, 1, 3],
        }
    }
}

/// `y[b, h] = x[b, h] · w[b, h]` for `x: [B, H, M, K]` and `w: [B, H, K, N]`, giving
/// `[B, H, M, N]` stored as `layout` says; differentiable in both. The operands may be any
/// views (attention's `swap_dims` of `[B, L, H, d]` projections): flex reads them through their
/// strides and stores each gradient like its operand.
///
/// # Panics
///
/// If the batch or head counts differ or the inner sizes do not match.
pub fn multi_head_matmul(x: Tensor<4>, w: Tensor<4>, layout: HeadLayout) -> Tensor<4> {
    let ([batch, heads, _, inner], [w_batch, w_heads, w_inner, _]) = (x.dims(), w.dims());
    assert!(
        batch == w_batch && heads == w_heads && inner == w_inner,
        "multi_head_matmul: x is {:?} and w is {:?}; expected [B, H, M, K] and [B, H, K, N]",
        x.dims(),
        w.dims()
    );
    Tensor::from_dispatch(<Dispatch as MatmulBackend>::multi_head_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
        layout.storage_order(),
    ))
}

/// Backends that multiply matrices. The default bodies are Burn's matmul; flex overrides them
/// with GEMM calls that write their output once.
#[moe_extension]
pub trait MatmulBackend: Backend {
    /// `[M, K] x [K, N] -> [M, N]` (see [`matmul`]).
    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }

    /// `[E, M, K] x [E, K, N] -> [E, M, N]` (see [`batched_matmul`]).
    fn batched_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, w)
    }

    /// `[B, H, M, K] x [B, H, K, N] -> [B, H, M, N]` (see [`multi_head_matmul`]), stored with
    /// its dimensions in `order` (outermost first) where the backend can.
    fn multi_head_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        order: [usize; 4],
    ) -> FloatTensor<Self> {
        let _ = order;
        Self::float_matmul(x, w)
    }

    /// The dimensions of a rank-4 `x` in the order its storage holds them, outermost first:
    /// where [`multi_head_matmul`]'s backward pass stores `x`'s gradient. Row-major unless the
    /// backend knows better.
    fn storage_order(x: &FloatTensor<Self>) -> [usize; 4] {
        let _ = x;
        [0, 1, 2, 3]
    }
}

#[cfg(feature = "ndarray")]
impl MatmulBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl MatmulBackend for burn::backend::Cube {}

/// Which of the backend's products an operation is.
#[derive(Debug, Clone, Copy)]
enum Product {
    /// [`MatmulBackend::matmul_2d`].
    Matrix,
    /// [`MatmulBackend::batched_matmul`].
    Batched,
    /// [`MatmulBackend::multi_head_matmul`], with the storage order of `x` and of `w` (where
    /// their gradients go).
    Heads {
        x_order: [usize; 4],
        w_order: [usize; 4],
    },
}

impl Product {
    /// `x · w` on backend `B`, stored in `order` when it is a multi-head product.
    fn run<B: MatmulBackend>(
        self,
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        order: [usize; 4],
    ) -> FloatTensor<B> {
        match self {
            Product::Matrix => B::matmul_2d(x, w),
            Product::Batched => B::batched_matmul(x, w),
            Product::Heads { .. } => B::multi_head_matmul(x, w, order),
        }
    }

    /// Where the gradients of `x` and of `w` are stored (multi-head products only).
    fn gradient_orders(self) -> [[usize; 4]; 2] {
        match self {
            Product::Heads { x_order, w_order } => [x_order, w_order],
            Product::Matrix | Product::Batched => [[0, 1, 2, 3]; 2],
        }
    }
}

/// The backward step of a product `y = x · w`: the same product with transposed operands.
#[derive(Debug)]
struct MatmulBackward {
    product: Product,
}

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
        let [x_order, w_order] = self.product.gradient_orders();
        // `float_transpose` swaps the last two dimensions: per batch entry for batched products.
        if let (Some(node), Some(w)) = (x_node, w) {
            let grad_x = self
                .product
                .run::<B>(grad.clone(), B::float_transpose(w), x_order);
            grads.register::<B>(node.id, grad_x);
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            let grad_w = self.product.run::<B>(B::float_transpose(x), grad, w_order);
            grads.register::<B>(node.id, grad_w);
        }
    }
}

/// Runs `product` on the inner backend (stored in `order` when it is a multi-head product) and,
/// when an operand is tracked, records one node that saves what the other operand's gradient
/// needs.
fn tracked_product<B: Backend + MatmulBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    product: Product,
    order: [usize; 4],
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
            let output = product.run::<B>(x.into_primitive(), w.into_primitive(), order);
            prep.finish((saved_x, saved_w), output)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(product.run::<B>(x.into_primitive(), w.into_primitive(), order))
        }
    }
}

impl<B: Backend + MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn matmul_2d(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked_product::<B, C>(x, w, Product::Matrix, [0, 1, 2, 3])
    }

    fn batched_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked_product::<B, C>(x, w, Product::Batched, [0, 1, 2, 3])
    }

    fn multi_head_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        order: [usize; 4],
    ) -> FloatTensor<Self> {
        let product = Product::Heads {
            x_order: B::storage_order(x.primitive()),
            w_order: B::storage_order(w.primitive()),
        };
        tracked_product::<B, C>(x, w, product, order)
    }

    fn storage_order(x: &FloatTensor<Self>) -> [usize; 4] {
        B::storage_order(x.primitive())
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl MatmulBackend for burn::backend::Remote {}
