//! The integer operations of an MoE layer's dispatch plan: where each routed (token, expert)
//! pair goes in the expert buffer, and which pair each row of the buffer holds.
//!
//! - [`exclusive_cumsum`]: `y[t, e] = Σ_{t' < t} x[t', e]`, the prefix sum down each column.
//!   Over a 0/1 mask of kept pairs it numbers each expert's tokens in token order, which is
//!   both the capacity rule "keep the first C" and each pair's row within its expert's group.
//! - [`invert_slots`]: from the row (slot) each pair takes, the pair each slot holds.
//!
//! Composed from Burn's ops both are linear on the CPU backends, but on cube (wgpu) Burn's
//! `cumsum` is the O(n²) kernel (each output element sums its whole prefix), `arange` under
//! fusion is built as a `cumsum` of ones, and a 1-D `select_assign` runs on a single GPU
//! thread. The cube backend runs each as one linear-cost kernel instead (`crate::cube`), and
//! flex as one pass over the matrix (`crate::flex`).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::IntTensor;
use burn::backend::{Backend, Dispatch, TensorMetadata};
use burn::tensor::ops::IndexingUpdateOp;
use burn::tensor::{Int, IntDType, Shape, Tensor};
use moe_macros::moe_extension;

/// `y[t, e] = Σ_{t' < t} x[t', e]`: the exclusive prefix sum of each column of `x: [T, E]`.
pub fn exclusive_cumsum(x: Tensor<2, Int>) -> Tensor<2, Int> {
    Tensor::from_dispatch(<Dispatch as RoutingBackend>::exclusive_cumsum(
        x.into_dispatch(),
    ))
}

/// The pair each slot holds: for `slot_of_pair: [T, E]`, `y[slot_of_pair[t, e]] = t * E + e`
/// for every pair whose slot is below `slots`, and `y[s] = T * E` (the number of pairs, which
/// names no pair) for a slot no pair takes; `[slots]`.
///
/// An empty slot names no pair, so `y / E` names no token (it is `T`): the row gathers and
/// scatter-adds of [`crate::gather_rows`] leave such rows out of every token's sum, and a
/// buffer that is half padding gives no token more rows than it was routed.
///
/// Each slot below `slots` must be taken by at most one pair (the dispatch plan gives every
/// kept pair a slot of its own and the dropped ones the slot `slots`); where two pairs share
/// one, which of them the slot names is unspecified.
pub fn invert_slots(slot_of_pair: Tensor<2, Int>, slots: usize) -> Tensor<1, Int> {
    Tensor::from_dispatch(<Dispatch as RoutingBackend>::invert_slots(
        slot_of_pair.into_dispatch(),
        slots,
    ))
}

/// Backends that compute dispatch plans. The default bodies compose Burn's ops (right on every
/// backend, linear on the CPU backends); flex and cube override both.
#[moe_extension(fusion)]
pub trait RoutingBackend: Backend {
    /// See [`exclusive_cumsum`].
    #[fusion(dtype = x, shape = x)]
    fn exclusive_cumsum(x: IntTensor<Self>) -> IntTensor<Self> {
        let inclusive = Self::int_cumsum(x.clone(), 0);
        Self::int_sub(inclusive, x)
    }

    /// See [`invert_slots`].
    #[fusion(dtype = slot_of_pair, shape = Shape::new([*slots]))]
    fn invert_slots(slot_of_pair: IntTensor<Self>, slots: usize) -> IntTensor<Self> {
        composed_invert_slots::<Self>(slot_of_pair, slots)
    }
}

/// [`RoutingBackend::invert_slots`] from Burn's ops: `1 + t * E + e` scattered (added to zero)
/// at each pair's slot, in a buffer with one extra slot that collects the dropped pairs and is
/// cut off; then `(code + pairs) mod (pairs + 1)`, which is `code - 1` for a taken slot and
/// `pairs` for an empty one (code 0).
pub(crate) fn composed_invert_slots<B: Backend>(
    slot_of_pair: IntTensor<B>,
    slots: usize,
) -> IntTensor<B> {
    let shape = slot_of_pair.shape();
    let pairs = shape.num_elements();
    let device = slot_of_pair.device();
    let dtype = IntDType::from(slot_of_pair.dtype());
    let flat = B::int_reshape(slot_of_pair, Shape::new([pairs]));
    // Slots beyond `slots` all land in the overflow slot.
    let flat = B::int_clamp(flat, 0.into(), (slots as i64).into());
    let codes = B::int_arange(1..pairs as i64 + 1, &device, dtype);
    let buffer = B::int_zeros(Shape::new([slots + 1]), &device, dtype);
    let filled = B::int_select_assign(buffer, 0, flat, codes, IndexingUpdateOp::Add);
    let taken = B::int_slice(filled, &[burn::tensor::Slice::from(0..slots)]);
    let shifted = B::int_add_scalar(taken, (pairs as i64).into());
    B::int_remainder_scalar(shifted, (pairs as i64 + 1).into())
}

#[cfg(feature = "ndarray")]
impl RoutingBackend for burn::backend::NdArray {}

/// Integer tensors carry no gradient: the autodiff backend runs its inner backend's
/// implementation.
impl<B: Backend + RoutingBackend, C: CheckpointStrategy> RoutingBackend for Autodiff<B, C> {
    fn exclusive_cumsum(x: IntTensor<Self>) -> IntTensor<Self> {
        B::exclusive_cumsum(x)
    }

    fn invert_slots(slot_of_pair: IntTensor<Self>, slots: usize) -> IntTensor<Self> {
        B::invert_slots(slot_of_pair, slots)
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl RoutingBackend for burn::backend::Remote {}
