//! Moving token rows into the expert buffer and back: a row gather and a weighted row
//! scatter-add, each one operation with its own backward pass.
//!
//! - [`gather_rows`]: `y[s] = x[index[s]]` (dispatch: slot `s` of the expert buffer receives
//!   token `index[s]`); `grad_x[t] = Σ_{s: index[s] = t} grad_y[s]`.
//! - [`combine_rows`]: `y[t] = Σ_{s: index[s] = t} weight[s] · values[s]` (combine: each token
//!   sums its experts' outputs, weighted by the gate, as in GShard, Lepikhin et al. 2020, eq. 1);
//!   `grad_values[s] = weight[s] · grad_y[index[s]]` and
//!   `grad_weight[s] = grad_y[index[s]] · values[s]` (a dot product over the row).
//!
//! **Padding.** A slot whose index is outside `0..tokens` names no token (the dispatch plan
//! gives its empty slots the index `tokens`): its gathered row is zero, it adds to no token,
//! and its gradients are zero. So a buffer that is mostly padding costs each token only the
//! rows routed to it, on every backend.
//!
//! Composed from Burn's ops, the dispatch is a `select` whose backward pass zero-fills a
//! `[tokens, d]` tensor and scatter-adds into it, and the combine is a broadcast multiply, a
//! zero-fill, a scatter-add and, backward, a `select`, two multiplies and a row sum, each
//! materialising a full `[slots, d]` intermediate. The default bodies below are exactly those
//! ops (ndarray); flex runs each direction as one pass over the rows, and cube (wgpu) runs the
//! scatter-adds as parallel gathers over each token's listed rows (Burn's `select_assign`
//! there runs one thread per column, each walking every index).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, TensorMetadata};
use burn::tensor::ops::IndexingUpdateOp;
use burn::tensor::{Int, Shape, Slice, Tensor};
use moe_macros::moe_extension;

/// `y[s] = x[index[s]]`: the rows of `x: [tokens, d]` that `index: [slots]` names, as
/// `[slots, d]`; differentiable in `x`. A slot whose index is outside `0..tokens` (padding)
/// gets a zero row.
pub fn gather_rows(x: Tensor<2>, index: Tensor<1, Int>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as GatherScatterBackend>::gather_rows(
        x.into_dispatch(),
        index.into_dispatch(),
    ))
}

/// `y[s] = x[index[s]]` where no two slots name the same row of `x: [rows, d]` (some of its
/// rows, reordered, with padding slots between), given the inverse map `inverse: [rows]`:
/// the slot that names row `t`, or any value outside `0..slots` for a row no slot names.
/// Differentiable in `x`, and its backward pass is a gather too: `grad_x[t] =
/// grad_y[inverse[t]]` (zero for a row no slot names), where [`gather_rows`]'s would be a
/// scatter-add. The dispatch plan gathers each slot's gate weight so (each (token, expert)
/// pair has at most one slot).
pub fn permute_rows(x: Tensor<2>, index: Tensor<1, Int>, inverse: Tensor<1, Int>) -> Tensor<2> {
    let [rows, _] = x.dims();
    assert!(
        inverse.dims() == [rows],
        "permute_rows: x is {:?} but the inverse map {:?}; expected [rows, d] and [rows]",
        x.dims(),
        inverse.dims()
    );
    Tensor::from_dispatch(<Dispatch as GatherScatterBackend>::permute_rows(
        x.into_dispatch(),
        index.into_dispatch(),
        inverse.into_dispatch(),
    ))
}

/// `y[t] = Σ_{s: index[s] = t} weight[s] · values[s]` for `values: [slots, d]`,
/// `weight: [slots]`, `index: [slots]`, giving `[tokens, d]` (rows no slot names are zero;
/// slots whose index is outside `0..tokens` are padding and add to no row); differentiable in
/// `values` and `weight`.
///
/// # Panics
///
/// If the sizes disagree.
pub fn combine_rows(
    values: Tensor<2>,
    weight: Tensor<1>,
    index: Tensor<1, Int>,
    tokens: usize,
) -> Tensor<2> {
    let [slots, _] = values.dims();
    assert!(
        weight.dims() == [slots] && index.dims() == [slots],
        "combine_rows: values is {:?}, weight {:?} and index {:?}; expected [slots, d], \
         [slots] and [slots]",
        values.dims(),
        weight.dims(),
        index.dims()
    );
    Tensor::from_dispatch(<Dispatch as GatherScatterBackend>::combine_rows(
        values.into_dispatch(),
        weight.into_dispatch(),
        index.into_dispatch(),
        tokens,
    ))
}

/// Backends that gather and scatter token rows. The default bodies compose Burn's ops
/// (correct everywhere); flex overrides them with one pass over the rows each, and cube
/// overrides the scatter-adds (each token sums its own rows, so no float atomics).
#[moe_extension(fusion)]
pub trait GatherScatterBackend: Backend {
    /// `y[s] = x[index[s]]` (see [`gather_rows`]).
    #[fusion(dtype = x, shape = Shape::new([index[0], x[1]]))]
    fn gather_rows(x: FloatTensor<Self>, index: IntTensor<Self>) -> FloatTensor<Self> {
        composed_gather_rows::<Self>(x, index)
    }

    /// `y[s] = x[index[s]]` for an index naming each row at most once (see [`permute_rows`]);
    /// `inverse` serves its backward pass.
    #[fusion(default)]
    fn permute_rows(
        x: FloatTensor<Self>,
        index: IntTensor<Self>,
        inverse: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let _ = inverse;
        Self::gather_rows(x, index)
    }

    /// `y[t] = Σ_{s: index[s] = t} values[s]`, `[tokens, d]`: the gradient of
    /// [`gather_rows`](Self::gather_rows) with respect to `x`, given `values` = the gradient of
    /// its output.
    #[fusion(dtype = values, shape = Shape::new([*tokens, values[1]]))]
    fn scatter_add_rows(
        values: FloatTensor<Self>,
        index: IntTensor<Self>,
        tokens: usize,
    ) -> FloatTensor<Self> {
        composed_scatter_add_rows::<Self>(values, index, tokens)
    }

    /// `y[t] = Σ_{s: index[s] = t} weight[s] · values[s]` (see [`combine_rows`]).
    #[fusion(dtype = values, shape = Shape::new([*tokens, values[1]]))]
    fn combine_rows(
        values: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        index: IntTensor<Self>,
        tokens: usize,
    ) -> FloatTensor<Self> {
        composed_combine_rows::<Self>(values, weight, index, tokens)
    }

    /// The gradients of [`combine_rows`](Self::combine_rows) given the gradient `grad` of its
    /// output: `(grad_values, grad_weight)`, with `grad_values[s] = weight[s] · grad[index[s]]`
    /// and `grad_weight[s] = grad[index[s]] · values[s]`.
    #[fusion(meta = |_grad, values, weight, _index| (values.clone(), weight.clone()))]
    fn combine_rows_backward(
        grad: FloatTensor<Self>,
        values: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        index: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_combine_rows_backward::<Self>(grad, values, weight, index)
    }
}

/// `index` with every value outside `0..tokens` replaced by `tokens`:
/// `(clamp(index, -1, tokens) + tokens + 1) mod (tokens + 1)`, so that the composed ops can
/// point padding at one extra zero row.
fn padding_to_extra_row<B: Backend>(index: IntTensor<B>, tokens: usize) -> IntTensor<B> {
    let bound = tokens as i64 + 1;
    let clamped = B::int_clamp(index, (-1i64).into(), (tokens as i64).into());
    B::int_remainder_scalar(B::int_add_scalar(clamped, bound.into()), bound.into())
}

/// `x: [tokens, d]` with a zero row after its last, `[tokens + 1, d]`.
fn with_zero_row<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let d = x.shape()[1];
    let zero = B::float_zeros(Shape::new([1, d]), &x.device(), x.dtype().into());
    B::float_cat(vec![x, zero], 0)
}

/// [`GatherScatterBackend::gather_rows`] from Burn's ops: a `select` from `x` with a zero row
/// appended, which the padding slots name.
pub(crate) fn composed_gather_rows<B: Backend>(
    x: FloatTensor<B>,
    index: IntTensor<B>,
) -> FloatTensor<B> {
    let tokens = x.shape()[0];
    B::float_select(
        with_zero_row::<B>(x),
        0,
        padding_to_extra_row::<B>(index, tokens),
    )
}

/// [`GatherScatterBackend::combine_rows`] from Burn's ops: a broadcast multiply, then
/// [`composed_scatter_add_rows`].
pub(crate) fn composed_combine_rows<B: Backend>(
    values: FloatTensor<B>,
    weight: FloatTensor<B>,
    index: IntTensor<B>,
    tokens: usize,
) -> FloatTensor<B> {
    let weighted = B::float_mul(values, column::<B>(weight));
    composed_scatter_add_rows::<B>(weighted, index, tokens)
}

/// [`GatherScatterBackend::combine_rows_backward`] from Burn's ops: a `select` of the
/// gradient rows, a broadcast multiply, and a multiply summed over each row.
pub(crate) fn composed_combine_rows_backward<B: Backend>(
    grad: FloatTensor<B>,
    values: FloatTensor<B>,
    weight: FloatTensor<B>,
    index: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let slots = values.shape()[0];
    let tokens = grad.shape()[0];
    let index = padding_to_extra_row::<B>(index, tokens);
    let grad_of_slot = B::float_select(with_zero_row::<B>(grad), 0, index);
    let grad_values = B::float_mul(grad_of_slot.clone(), column::<B>(weight));
    let grad_weight = B::float_reshape(
        B::float_sum_dim(B::float_mul(grad_of_slot, values), 1),
        Shape::new([slots]),
    );
    (grad_values, grad_weight)
}

/// `[n]` as `[n, 1]`, to broadcast over rows.
fn column<B: Backend>(weight: FloatTensor<B>) -> FloatTensor<B> {
    let slots = weight.shape()[0];
    B::float_reshape(weight, Shape::new([slots, 1]))
}

/// [`GatherScatterBackend::scatter_add_rows`] from Burn's ops: a zero `[tokens + 1, d]` tensor,
/// `select_assign` with `Add` (the padding into the last row), and the first `tokens` rows.
pub(crate) fn composed_scatter_add_rows<B: Backend>(
    values: FloatTensor<B>,
    index: IntTensor<B>,
    tokens: usize,
) -> FloatTensor<B> {
    let d = values.shape()[1];
    let zeros = B::float_zeros(
        Shape::new([tokens + 1, d]),
        &values.device(),
        values.dtype().into(),
    );
    let index = padding_to_extra_row::<B>(index, tokens);
    let sums = B::float_select_assign(zeros, 0, index, values, IndexingUpdateOp::Add);
    B::float_slice(sums, &[Slice::from(0..tokens), Slice::from(..)])
}

#[cfg(feature = "ndarray")]
impl GatherScatterBackend for burn::backend::NdArray {}

/// The backward step of [`gather_rows`]: the index and the number of source rows.
#[derive(Debug)]
struct GatherRowsBackward;

impl<B: Backend + GatherScatterBackend> Backward<B, 1> for GatherRowsBackward {
    type State = (IntTensor<B>, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (index, tokens) = ops.state;
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::scatter_add_rows(grad, index, tokens));
        }
    }
}

/// The backward step of [`permute_rows`]: the inverse map.
#[derive(Debug)]
struct PermuteRowsBackward;

impl<B: Backend + GatherScatterBackend> Backward<B, 1> for PermuteRowsBackward {
    type State = IntTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let inverse = ops.state;
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::gather_rows(grad, inverse));
        }
    }
}

/// The backward step of [`combine_rows`]: both inputs and the index.
#[derive(Debug)]
struct CombineRowsBackward;

impl<B: Backend + GatherScatterBackend> Backward<B, 2> for CombineRowsBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (values, weight, index) = ops.state;
        let [values_node, weight_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (grad_values, grad_weight) = B::combine_rows_backward(grad, values, weight, index);
        if let Some(node) = values_node {
            grads.register::<B>(node.id, grad_values);
        }
        if let Some(node) = weight_node {
            grads.register::<B>(node.id, grad_weight);
        }
    }
}

impl<B: Backend + GatherScatterBackend, C: CheckpointStrategy> GatherScatterBackend
    for Autodiff<B, C>
{
    fn gather_rows(x: FloatTensor<Self>, index: IntTensor<Self>) -> FloatTensor<Self> {
        let tokens = x.shape()[0];
        match GatherRowsBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::gather_rows(x.into_primitive(), index.clone());
                prep.finish((index, tokens), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gather_rows(x.into_primitive(), index)),
        }
    }

    fn permute_rows(
        x: FloatTensor<Self>,
        index: IntTensor<Self>,
        inverse: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match PermuteRowsBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::permute_rows(x.into_primitive(), index, inverse.clone());
                prep.finish(inverse, output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::permute_rows(x.into_primitive(), index, inverse))
            }
        }
    }

    fn combine_rows(
        values: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        index: IntTensor<Self>,
        tokens: usize,
    ) -> FloatTensor<Self> {
        match CombineRowsBackward
            .prepare::<C>([values.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (values, weight) = (values.into_primitive(), weight.into_primitive());
                let output = B::combine_rows(values.clone(), weight.clone(), index.clone(), tokens);
                prep.finish((values, weight, index), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::combine_rows(
                values.into_primitive(),
                weight.into_primitive(),
                index,
                tokens,
            )),
        }
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl GatherScatterBackend for burn::backend::Remote {}
