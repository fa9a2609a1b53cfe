//! Grouped matrix multiplication: one matmul per expert, each over only the rows that expert
//! filled.
//!
//! An MoE layer runs its experts on a padded buffer `[E, C, K]`: expert `e` received `rows[e]`
//! tokens, stored in its first `rows[e]` slots, and the other `C - rows[e]` slots are padding
//! (C is the busiest expert's load when dropless, or the capacity). A batched matmul multiplies
//! the padding too, which costs `C * E / sum(rows)` times the useful work: about 1.4x at 64
//! experts. This operation computes only the filled rows ("grouped GEMM", as MegaBlocks calls
//! its block-sparse form and Tutel its ragged one):
//!
//! `y[e, r] = x[e, r] · w[e]` for `r < rows[e]`, and `y[e, r] = 0` for `r >= rows[e]`.
//!
//! Its gradients are the same two products restricted to the same rows:
//! `grad_x[e, r] = grad_y[e, r] · w[e]ᵀ` (zero beyond `rows[e]`) and
//! `grad_w[e] = Σ_{r < rows[e]} x[e, r]ᵀ grad_y[e, r]` ([`GroupedMatmulBackend::grouped_weight_grad`]).
//!
//! The default bodies compose Burn's batched matmul with a row mask (right on every backend,
//! no faster than the batched matmul); flex overrides both with one GEMM call per expert on its
//! filled rows, reading `rows` from host memory (flex tensors live there, so nothing waits).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{backend_extension, get_device_settings, Backend, Dispatch, TensorMetadata};
use burn::tensor::{Int, IntDType, Shape, Tensor};

/// `y[e, r] = x[e, r] · w[e]` for `r < rows[e]`, zero for the rows beyond, differentiable in
/// `x` and `w`.
///
/// Shapes: `x: [E, C, K]`, `w: [E, K, N]`, `rows: [E]` (values above `C` count as `C`,
/// negative ones as 0), output `[E, C, N]`.
///
/// # Panics
///
/// If the shapes do not match as above.
pub fn grouped_matmul(x: Tensor<3>, w: Tensor<3>, rows: Tensor<1, Int>) -> Tensor<3> {
    let [experts, _, inner] = x.dims();
    let [w_experts, w_inner, _] = w.dims();
    let [row_counts] = rows.dims();
    assert!(
        experts == w_experts && experts == row_counts && inner == w_inner,
        "grouped_matmul: x is {:?}, w is {:?} and rows is {:?}; expected [E, C, K], [E, K, N] \
         and [E]",
        x.dims(),
        w.dims(),
        rows.dims()
    );
    Tensor::from_dispatch(<Dispatch as GroupedMatmulBackend>::grouped_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
        rows.into_dispatch(),
    ))
}

/// Backends that multiply only the filled rows of each expert. The default bodies compose
/// Burn's ops (correct everywhere); flex overrides both with one GEMM per expert.
#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "wgpu")
)]
pub trait GroupedMatmulBackend: Backend {
    /// `[E, C, K] x [E, K, N] -> [E, C, N]` over the first `rows[e]` rows of each expert,
    /// zero beyond (see [`grouped_matmul`]).
    fn grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rows: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_grouped_matmul::<Self>(x, w, rows)
    }

    /// `Σ_{r < rows[e]} x[e, r]ᵀ g[e, r]` for `x: [E, C, K]`, `g: [E, C, N]`, giving
    /// `[E, K, N]`: the gradient of [`grouped_matmul`](Self::grouped_matmul) with respect to
    /// `w`, given the gradient `g` of its output.
    fn grouped_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        rows: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_grouped_weight_grad::<Self>(x, grad, rows)
    }
}

/// [`GroupedMatmulBackend::grouped_matmul`] from Burn's ops: the batched matmul, then the rows
/// beyond each expert's count set to zero.
pub(crate) fn composed_grouped_matmul<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    rows: IntTensor<B>,
) -> FloatTensor<B> {
    let product = B::float_matmul(x, w);
    let beyond = rows_beyond::<B>(rows, &product.shape());
    B::float_mask_fill(product, beyond, 0.0.into())
}

/// [`GroupedMatmulBackend::grouped_weight_grad`] from Burn's ops: the rows of `x` and `g`
/// beyond each expert's count set to zero (so that nothing there, not even a NaN, reaches the
/// sum), then `xᵀ g` as a batched matmul.
pub(crate) fn composed_grouped_weight_grad<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
    rows: IntTensor<B>,
) -> FloatTensor<B> {
    let x_beyond = rows_beyond::<B>(rows.clone(), &x.shape());
    let grad_beyond = rows_beyond::<B>(rows, &grad.shape());
    let x = B::float_mask_fill(x, x_beyond, 0.0.into());
    let grad = B::float_mask_fill(grad, grad_beyond, 0.0.into());
    B::float_matmul(B::float_transpose(x), grad)
}

/// `true` at `[e, r, ..]` of a `[E, C, N]` tensor where `r >= rows[e]`.
fn rows_beyond<B: Backend>(rows: IntTensor<B>, shape: &Shape) -> BoolTensor<B> {
    let (experts, slots) = (shape[0], shape[1]);
    let device = rows.device();
    let int_dtype = IntDType::from(rows.dtype());
    let bool_dtype = get_device_settings::<B>(&device).bool_dtype;
    let positions = B::int_expand(
        B::int_reshape(
            B::int_arange(0..slots as i64, &device, int_dtype),
            Shape::new([1, slots]),
        ),
        Shape::new([experts, slots]),
    );
    let limits = B::int_expand(
        B::int_reshape(rows, Shape::new([experts, 1])),
        Shape::new([experts, slots]),
    );
    let beyond = B::int_greater_equal(positions, limits, bool_dtype);
    B::bool_expand(
        B::bool_reshape(beyond, Shape::new([experts, slots, 1])),
        shape.clone(),
    )
}

#[cfg(feature = "ndarray")]
impl GroupedMatmulBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl GroupedMatmulBackend for burn::backend::Cube {}

/// The backward step of [`grouped_matmul`]: what it needs of the forward pass.
#[derive(Debug)]
struct GroupedMatmulBackward;

/// Saved by the forward pass: `x` when `w` needs a gradient, `w` when `x` does, and `rows`.
type SavedInputs<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>, IntTensor<B>);

impl<B: Backend + GroupedMatmulBackend> Backward<B, 2> for GroupedMatmulBackward {
    type State = SavedInputs<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, w, rows) = ops.state;
        let [x_node, w_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let (Some(node), Some(w)) = (x_node, w) {
            let grad_x = B::grouped_matmul(grad.clone(), B::float_transpose(w), rows.clone());
            grads.register::<B>(node.id, grad_x);
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            grads.register::<B>(node.id, B::grouped_weight_grad(x, grad, rows));
        }
    }
}

impl<B: Backend + GroupedMatmulBackend, C: CheckpointStrategy> GroupedMatmulBackend
    for Autodiff<B, C>
{
    fn grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rows: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
        match GroupedMatmulBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let saved_x = w_tracked.then(|| x.primitive().clone());
                let saved_w = x_tracked.then(|| w.primitive().clone());
                let output =
                    B::grouped_matmul(x.into_primitive(), w.into_primitive(), rows.clone());
                prep.finish((saved_x, saved_w, rows), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::grouped_matmul(
                x.into_primitive(),
                w.into_primitive(),
                rows,
            )),
        }
    }
}
