//! Grouped matrix multiplication over a ragged layout: the rows of one matrix split into
//! consecutive groups, each multiplied by its own weight.
//!
//! An MoE layer lays the rows routed to its experts out sorted by expert and contiguous
//! (MegaBlocks, Gale et al. 2022; Tutel's ragged layout): expert `e` owns rows
//! `offsets[e]..offsets[e + 1]` of the buffer `x: [S, K]`, and the rows from `offsets[E]` to
//! `S` are padding (a buffer sized for the most rows a pass can route, `tokens x top_k`, or the
//! capacity `E x C`). Every buffer then holds the routed rows and nothing else, however
//! unevenly the router spreads them, and no expert pays for another's load:
//!
//! `y[s] = x[s] · w[e]` for `offsets[e] <= s < offsets[e + 1]`, `y[s] = 0` for the padding.
//!
//! The gradients are the same products over the same groups:
//! `grad_x[s] = grad_y[s] · w[e]ᵀ` and `grad_w[e] = Σ_{s in group e} x[s]ᵀ grad_y[s]`
//! ([`GroupedMatmulBackend::grouped_weight_grad`]). [`grouped_bias`] adds a per-group bias
//! row; its gradient is the per-group row sum ([`GroupedMatmulBackend::grouped_row_sum`]).
//!
//! **Offsets** are `[E + 1]` integers. They are read as the groups
//! `start_e = clamp(offsets[e], end_{e-1}, S)`, `end_e = clamp(offsets[e + 1], start_e, S)`
//! (with `end_{-1} = 0`): any offsets give disjoint groups in order, and rows no group covers
//! are padding. The dispatch plan's offsets (an exclusive prefix sum of the expert loads) are
//! already of that form.
//!
//! The default bodies read the offsets to the host and run one Burn matmul per group (right on
//! every backend; the read costs nothing on the CPU backends, whose tensors live in host
//! memory). flex runs one GEMM per group on the group's rows in place; wgpu (cube) runs tiled
//! CubeCL kernels that find each tile's group on the device, so nothing is read back.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{AutodiffBackend, Backend, Dispatch, TensorMetadata};
use burn::tensor::{Int, Shape, Slice, Tensor, TensorData};
use moe_macros::moe_extension;

/// `y[s] = x[s] · w[e]` for the rows `s` of group `e` (see the [module docs](self) for how
/// `offsets` delimit the groups), zero for the rows no group covers; differentiable in `x`
/// and `w`.
///
/// Shapes: `x: [S, K]`, `w: [E, K, N]`, `offsets: [E + 1]`, output `[S, N]`.
///
/// # Panics
///
/// If the shapes do not match as above.
pub fn grouped_matmul(x: Tensor<2>, w: Tensor<3>, offsets: Tensor<1, Int>) -> Tensor<2> {
    let [_, inner] = x.dims();
    let [experts, w_inner, _] = w.dims();
    let [bounds] = offsets.dims();
    assert!(
        inner == w_inner && bounds == experts + 1,
        "grouped_matmul: x is {:?}, w is {:?} and offsets is {:?}; expected [S, K], [E, K, N] \
         and [E + 1]",
        x.dims(),
        w.dims(),
        offsets.dims()
    );
    Tensor::from_dispatch(<Dispatch as GroupedMatmulBackend>::grouped_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
        offsets.into_dispatch(),
    ))
}

/// [`grouped_matmul`] with `w` read in the type of `x` where it is held in another (bf16, or
/// quantized: [`crate::dequantize()`]). A frozen weight (one that takes no gradient) under
/// autodiff goes through [`crate::frozen_grouped_matmul`], which keeps no converted copy for
/// the backward pass. For inference on flex, when at most half the experts received rows,
/// only those are converted (decoding a token converts the top-k of E experts' weights, not
/// all E); otherwise the whole stack is converted, then multiplied. Shapes and panics as
/// [`grouped_matmul`].
pub fn grouped_matmul_held(x: Tensor<2>, w: Tensor<3>, offsets: Tensor<1, Int>) -> Tensor<2> {
    let dtype = x.dtype();
    if w.dtype() == dtype {
        return grouped_matmul(x, w, offsets);
    }
    let device = x.device();
    if device.is_autodiff() && crate::frozen::is_frozen(&w) {
        return crate::frozen_grouped_matmul(x, w, offsets);
    }
    if !device.is_autodiff() && crate::dequantize::on_flex(&x) {
        let [rows, _] = x.dims();
        let bounds = offsets
            .clone()
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap_or_default();
        let (experts, compact) = active_groups(&bounds, rows);
        // Picking the experts copies them once more: worth it when at most half have rows.
        if 2 * experts.len() <= w.dims()[0] {
            let w = crate::dequantize_experts(w, &experts, dtype);
            let count = compact.len();
            let offsets = Tensor::from_data(TensorData::new(compact, [count]), &device);
            return grouped_matmul(x, w, offsets);
        }
    }
    grouped_matmul(x, crate::in_dtype(w, dtype), offsets)
}

/// The groups of `offsets` (see the [module docs](self)) over `rows` rows that hold rows, and
/// the offsets of those groups alone. Each group starts where the one before it ends (the
/// first where the first offset says), so leaving the empty ones out moves no row to another
/// group.
fn active_groups(offsets: &[i64], rows: usize) -> (Vec<usize>, Vec<i64>) {
    let rows = rows as i64;
    let first = offsets.first().map_or(0, |&o| o.clamp(0, rows));
    let (mut experts, mut compact) = (Vec::new(), vec![first]);
    let mut end = 0;
    for (e, pair) in offsets.windows(2).enumerate() {
        let start = pair[0].clamp(end, rows);
        end = pair[1].clamp(start, rows);
        if end > start {
            experts.push(e);
            compact.push(end);
        }
    }
    (experts, compact)
}

/// `y[s] = x[s] + bias[e]` for the rows `s` of group `e`, `y[s] = x[s]` for the rows no group
/// covers; differentiable in `x` and `bias` (whose gradient is each group's row sum).
///
/// Shapes: `x: [S, N]`, `bias: [E, N]`, `offsets: [E + 1]`, output `[S, N]`.
///
/// # Panics
///
/// If the shapes do not match as above.
pub fn grouped_bias(x: Tensor<2>, bias: Tensor<2>, offsets: Tensor<1, Int>) -> Tensor<2> {
    let [_, columns] = x.dims();
    let [experts, bias_columns] = bias.dims();
    let [bounds] = offsets.dims();
    assert!(
        columns == bias_columns && bounds == experts + 1,
        "grouped_bias: x is {:?}, bias is {:?} and offsets is {:?}; expected [S, N], [E, N] \
         and [E + 1]",
        x.dims(),
        bias.dims(),
        offsets.dims()
    );
    Tensor::from_dispatch(<Dispatch as GroupedMatmulBackend>::grouped_bias(
        x.into_dispatch(),
        bias.into_dispatch(),
        offsets.into_dispatch(),
    ))
}

/// `grad_w[e] = Σ_{s in group e} x[s]ᵀ grad[s]`, `[E, K, N]` (zero for an empty group): the
/// weight gradient that the backward pass of [`grouped_matmul`] computes, as a product of its
/// own (for benchmarks and tests; not differentiable).
///
/// Shapes: `x: [S, K]`, `grad: [S, N]`, `offsets: [E + 1]`.
///
/// # Panics
///
/// If the shapes do not match as above.
pub fn grouped_weight_grad(x: Tensor<2>, grad: Tensor<2>, offsets: Tensor<1, Int>) -> Tensor<3> {
    let [rows, _] = x.dims();
    let [grad_rows, _] = grad.dims();
    assert!(
        rows == grad_rows && offsets.dims()[0] >= 1,
        "grouped_weight_grad: x is {:?}, grad is {:?} and offsets is {:?}; expected [S, K], \
         [S, N] and [E + 1]",
        x.dims(),
        grad.dims(),
        offsets.dims()
    );
    Tensor::from_dispatch(<Dispatch as GroupedMatmulBackend>::grouped_weight_grad(
        x.into_dispatch(),
        grad.into_dispatch(),
        offsets.into_dispatch(),
    ))
}

/// Backends that multiply ragged groups of rows. The default bodies read the offsets and run
/// Burn's ops group by group; flex and wgpu override them.
#[moe_extension(fusion)]
pub trait GroupedMatmulBackend: Backend {
    /// `[S, K] x [E, K, N] -> [S, N]`, group by group (see [`grouped_matmul`]).
    #[fusion(dtype = x, shape = Shape::new([x[0], w[2]]))]
    fn grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_grouped_matmul::<Self>(x, w, offsets)
    }

    /// `grad_w[e] = Σ_{s in group e} x[s]ᵀ grad[s]` for `x: [S, K]`, `grad: [S, N]`, giving
    /// `[E, K, N]` (zero for an empty group): the gradient of
    /// [`grouped_matmul`](Self::grouped_matmul) with respect to `w`.
    #[fusion(dtype = x, shape = Shape::new([offsets[0] - 1, x[1], grad[1]]))]
    fn grouped_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_grouped_weight_grad::<Self>(x, grad, offsets)
    }

    /// `x[s] + bias[e]` for the rows of group `e` (see [`grouped_bias`]).
    #[fusion(dtype = x, shape = x)]
    fn grouped_bias(
        x: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_grouped_bias::<Self>(x, bias, offsets)
    }

    /// `Σ_{s in group e} values[s]` for `values: [S, N]`, giving `[E, N]` (zero for an empty
    /// group): the gradient of [`grouped_bias`](Self::grouped_bias) with respect to the bias.
    #[fusion(dtype = values, shape = Shape::new([offsets[0] - 1, values[1]]))]
    fn grouped_row_sum(values: FloatTensor<Self>, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        composed_grouped_row_sum::<Self>(values, offsets)
    }
}

/// The groups that `offsets` delimit in `rows` rows, as the [module docs](self) define them:
/// disjoint, in order, within `0..rows`.
pub fn groups_from_offsets(offsets: &[i64], rows: usize) -> Vec<Range<usize>> {
    let mut end = 0;
    offsets
        .windows(2)
        .map(|bounds| {
            let start = (bounds[0].max(0) as usize).clamp(end, rows);
            end = (bounds[1].max(0) as usize).clamp(start, rows);
            start..end
        })
        .collect()
}

/// The rows that no group covers: before the first group and after the last.
pub fn uncovered_rows(groups: &[Range<usize>], rows: usize) -> [Range<usize>; 2] {
    let first = groups.first().map_or(rows, |group| group.start);
    let last = groups.last().map_or(rows, |group| group.end);
    [0..first, last..rows]
}

/// The groups of a backend's offsets tensor, read to the host (a wait on a GPU; free on the
/// CPU backends).
pub(crate) fn host_groups<B: Backend>(offsets: IntTensor<B>, rows: usize) -> Vec<Range<usize>> {
    let data = burn::tensor::try_read_sync(B::int_into_data(offsets))
        .expect("reading back from a synchronous backend")
        .expect("group offsets read back to the host");
    let offsets: Vec<i64> = data.iter::<i64>().collect();
    groups_from_offsets(&offsets, rows)
}

/// Rows `range` of a `[rows, columns]` tensor.
pub(crate) fn row_slice<B: Backend>(x: FloatTensor<B>, range: Range<usize>) -> FloatTensor<B> {
    B::float_slice(x, &[Slice::from(range), Slice::from(..)])
}

/// A `[rows, columns]` zero tensor like `like`.
fn zero_rows<B: Backend>(like: &FloatTensor<B>, rows: usize, columns: usize) -> FloatTensor<B> {
    B::float_zeros(
        Shape::new([rows, columns]),
        &like.device(),
        like.dtype().into(),
    )
}

/// Stacks per-group `[.., N]` results along the first dimension.
fn stack_rows<B: Backend>(pieces: Vec<FloatTensor<B>>) -> FloatTensor<B> {
    if pieces.len() == 1 {
        return pieces.into_iter().next().expect("one piece");
    }
    B::float_cat(pieces, 0)
}

/// Applies `each(group, rows)` to every group of `x: [S, ..]` and zero-fills (`columns` wide)
/// the rows no group covers, keeping the row order.
pub(crate) fn by_group<B: Backend>(
    x: &FloatTensor<B>,
    groups: &[Range<usize>],
    columns: usize,
    mut each: impl FnMut(usize, Range<usize>) -> FloatTensor<B>,
) -> FloatTensor<B> {
    let rows = x.shape()[0];
    let [before, after] = uncovered_rows(groups, rows);
    let mut pieces = Vec::with_capacity(groups.len() + 2);
    if !before.is_empty() {
        pieces.push(zero_rows::<B>(x, before.len(), columns));
    }
    for (expert, group) in groups.iter().enumerate() {
        if !group.is_empty() {
            pieces.push(each(expert, group.clone()));
        }
    }
    if !after.is_empty() || pieces.is_empty() {
        pieces.push(zero_rows::<B>(x, after.len(), columns));
    }
    stack_rows::<B>(pieces)
}

/// `w[e]` of a `[E, K, N]` tensor, as `[K, N]`.
fn expert_matrix<B: Backend>(w: FloatTensor<B>, expert: usize) -> FloatTensor<B> {
    let shape = w.shape();
    let (inner, columns) = (shape[1], shape[2]);
    let slice = B::float_slice(
        w,
        &[
            Slice::from(expert..expert + 1),
            Slice::from(..),
            Slice::from(..),
        ],
    );
    B::float_reshape(slice, Shape::new([inner, columns]))
}

/// [`GroupedMatmulBackend::grouped_matmul`] from Burn's ops: one matmul per group.
pub(crate) fn composed_grouped_matmul<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    offsets: IntTensor<B>,
) -> FloatTensor<B> {
    let columns = w.shape()[2];
    let groups = host_groups::<B>(offsets, x.shape()[0]);
    by_group::<B>(&x, &groups, columns, |expert, rows| {
        B::float_matmul(
            row_slice::<B>(x.clone(), rows),
            expert_matrix::<B>(w.clone(), expert),
        )
    })
}

/// [`GroupedMatmulBackend::grouped_bias`] from Burn's ops: one broadcast add per group.
pub(crate) fn composed_grouped_bias<B: Backend>(
    x: FloatTensor<B>,
    bias: FloatTensor<B>,
    offsets: IntTensor<B>,
) -> FloatTensor<B> {
    let groups = host_groups::<B>(offsets, x.shape()[0]);
    let [before, after] = uncovered_rows(&groups, x.shape()[0]);
    let mut pieces = Vec::with_capacity(groups.len() + 2);
    if !before.is_empty() {
        pieces.push(row_slice::<B>(x.clone(), before));
    }
    for (expert, rows) in groups.iter().enumerate() {
        if !rows.is_empty() {
            let bias_row = row_slice::<B>(bias.clone(), expert..expert + 1);
            pieces.push(B::float_add(
                row_slice::<B>(x.clone(), rows.clone()),
                bias_row,
            ));
        }
    }
    if !after.is_empty() || pieces.is_empty() {
        pieces.push(row_slice::<B>(x.clone(), after));
    }
    stack_rows::<B>(pieces)
}

/// [`GroupedMatmulBackend::grouped_weight_grad`] from Burn's ops: `xᵀ grad` per group, zero for
/// an empty one.
pub(crate) fn composed_grouped_weight_grad<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
    offsets: IntTensor<B>,
) -> FloatTensor<B> {
    let (inner, columns) = (x.shape()[1], grad.shape()[1]);
    let groups = host_groups::<B>(offsets, x.shape()[0]);
    let experts = groups.len();
    let blocks: Vec<FloatTensor<B>> = groups
        .into_iter()
        .map(|rows| {
            if rows.is_empty() {
                zero_rows::<B>(&x, inner, columns)
            } else {
                B::float_matmul(
                    B::float_transpose(row_slice::<B>(x.clone(), rows.clone())),
                    row_slice::<B>(grad.clone(), rows),
                )
            }
        })
        .collect();
    B::float_reshape(
        stack_rows::<B>(blocks),
        Shape::new([experts, inner, columns]),
    )
}

/// [`GroupedMatmulBackend::grouped_row_sum`] from Burn's ops: a row sum per group, zero for an
/// empty one.
pub(crate) fn composed_grouped_row_sum<B: Backend>(
    values: FloatTensor<B>,
    offsets: IntTensor<B>,
) -> FloatTensor<B> {
    let columns = values.shape()[1];
    let groups = host_groups::<B>(offsets, values.shape()[0]);
    let sums: Vec<FloatTensor<B>> = groups
        .into_iter()
        .map(|rows| {
            if rows.is_empty() {
                zero_rows::<B>(&values, 1, columns)
            } else {
                B::float_sum_dim(row_slice::<B>(values.clone(), rows), 0)
            }
        })
        .collect();
    stack_rows::<B>(sums)
}

#[cfg(feature = "ndarray")]
impl GroupedMatmulBackend for burn::backend::NdArray {}

/// The backward step of [`grouped_matmul`]: what it needs of the forward pass.
#[derive(Debug)]
struct GroupedMatmulBackward;

/// Saved by the forward pass: `x` when `w` needs a gradient, `w` when `x` does, and the
/// offsets.
type SavedInputs<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>, IntTensor<B>);

impl<B: Backend + GroupedMatmulBackend> Backward<B, 2> for GroupedMatmulBackward {
    type State = SavedInputs<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (x, w, offsets) = ops.state;
        let [x_node, w_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let (Some(node), Some(w)) = (x_node, w) {
            let w_transposed = B::float_swap_dims(w, 1, 2);
            let grad_x = B::grouped_matmul(grad.clone(), w_transposed, offsets.clone());
            grads.register::<B>(node.id, grad_x);
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            grads.register::<B>(node.id, B::grouped_weight_grad(x, grad, offsets));
        }
    }
}

/// The backward step of [`grouped_bias`]: the gradient passes to `x` unchanged and sums per
/// group for the bias.
#[derive(Debug)]
struct GroupedBiasBackward;

impl<B: Backend + GroupedMatmulBackend> Backward<B, 2> for GroupedBiasBackward {
    type State = IntTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let offsets = ops.state;
        let [x_node, bias_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = bias_node {
            grads.register::<B>(node.id, B::grouped_row_sum(grad.clone(), offsets));
        }
        if let Some(node) = x_node {
            grads.register::<B>(node.id, grad);
        }
    }
}

impl<B: Backend + GroupedMatmulBackend, C: CheckpointStrategy> GroupedMatmulBackend
    for Autodiff<B, C>
{
    fn grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: IntTensor<Self>,
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
                    B::grouped_matmul(x.into_primitive(), w.into_primitive(), offsets.clone());
                prep.finish((saved_x, saved_w, offsets), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::grouped_matmul(
                x.into_primitive(),
                w.into_primitive(),
                offsets,
            )),
        }
    }

    fn grouped_bias(
        x: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match GroupedBiasBackward
            .prepare::<C>([x.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output =
                    B::grouped_bias(x.into_primitive(), bias.into_primitive(), offsets.clone());
                prep.finish(offsets, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::grouped_bias(
                x.into_primitive(),
                bias.into_primitive(),
                offsets,
            )),
        }
    }

    /// Not differentiable: the inner backend's product, untracked.
    fn grouped_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        offsets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::grouped_weight_grad(
            <Self as AutodiffBackend>::inner(x),
            <Self as AutodiffBackend>::inner(grad),
            offsets,
        ))
    }

    /// Not differentiable: the inner backend's sums, untracked.
    fn grouped_row_sum(values: FloatTensor<Self>, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::grouped_row_sum(
            <Self as AutodiffBackend>::inner(values),
            offsets,
        ))
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl GroupedMatmulBackend for burn::backend::Remote {}

#[cfg(all(test, feature = "flex"))]
mod held_tests {
    use super::*;
    use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};
    use burn::tensor::{DType, Device, Distribution};

    /// With the weight held in bf16 or 8 bits and experts 1 and 3 empty, the product that
    /// converts only experts 0 and 2 gives what converting the whole stack gives.
    #[test]
    fn converting_the_experts_with_rows_alone_changes_nothing() {
        let device = Device::flex();
        let x = Tensor::<2>::random([10, 24], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<3>::random([4, 24, 16], Distribution::Normal(0.0, 0.1), &device);
        let offsets =
            Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 3, 3, 10, 10], [5]), &device);
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .per_block([8], ScaleDtype::F32);
        for held in [w.clone().cast(DType::BF16), w.quantize_dynamic(&scheme)] {
            let whole = match held.dtype() {
                DType::QFloat(_) => held.clone().dequantize(),
                _ => held.clone().cast(DType::F32),
            };
            let expected = grouped_matmul(x.clone(), whole, offsets.clone()).into_data();
            let ours = grouped_matmul_held(x.clone(), held, offsets.clone()).into_data();
            assert_eq!(ours.as_bytes(), expected.as_bytes());
        }
    }

    #[test]
    fn the_groups_with_rows_and_their_offsets() {
        // Experts 1 and 3 empty; offsets past the rows are clamped.
        assert_eq!(
            active_groups(&[0, 3, 3, 10, 12], 10),
            (vec![0, 2], vec![0, 3, 10])
        );
        // Decreasing offsets give an empty group; the next starts where the last ended.
        assert_eq!(active_groups(&[0, 4, 2, 6], 9), (vec![0, 2], vec![0, 4, 6]));
        // The first group may start late: the rows before it stay padding.
        assert_eq!(active_groups(&[2, 2, 5], 5), (vec![1], vec![2, 5]));
        assert_eq!(active_groups(&[0, 0, 0], 5), (vec![], vec![0]));
    }
}
