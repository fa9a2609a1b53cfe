//! The indices of each row's `k` largest values: how a token-choice gate picks its experts.
//!
//! Burn's `argtopk` sorts each whole row (flex, ndarray) to keep `k` of its `E` entries; with
//! 64 experts that sort took 15 ms of a 16,384-token layer's 80 ms forward pass on flex. flex
//! and ndarray run a partial selection instead, `O(E k)` per row (flex in parallel over the
//! rows); cube keeps Burn's `argtopk` (a reduction).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{get_device_settings, Backend, Dispatch, TensorMetadata};
use burn::tensor::{Int, Tensor};
use moe_macros::moe_extension;

/// The indices of the `k` largest values of each row of `x: [rows, columns]`, largest first,
/// equal values in increasing index order (as Burn's `argtopk`), `[rows, k]`; `k` may equal
/// the number of columns.
///
/// # Panics
///
/// If `k` is 0 or more than the number of columns.
pub fn top_k_indices(x: Tensor<2>, k: usize) -> Tensor<2, Int> {
    let [_, columns] = x.dims();
    assert!(
        (1..=columns).contains(&k),
        "top_k_indices: k = {k} for rows of {columns} values; expected 1 to {columns}"
    );
    Tensor::from_dispatch(<Dispatch as TopKBackend>::top_k_indices(
        x.into_dispatch(),
        k,
    ))
}

/// Backends that pick each row's largest values. The default body is Burn's `argtopk` (a
/// reduction on cube); flex and ndarray select on the host.
#[moe_extension]
pub trait TopKBackend: Backend {
    /// See [`top_k_indices`].
    fn top_k_indices(x: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        let dtype = get_device_settings::<Self>(&x.device()).int_dtype;
        Self::float_argtopk(x, 1, k, dtype)
    }
}

/// ndarray's `argtopk` sorts each row unstably: among many equal values it can pick a later
/// one (seen: index 63 before 3 in a row of 64). Its tensors live in host memory, so it runs
/// the same selection as flex, on a copy of the values.
#[cfg(feature = "ndarray")]
impl TopKBackend for burn::backend::NdArray {
    fn top_k_indices(x: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        use burn::backend::ops::{FloatTensorOps, IntTensorOps};
        use burn::tensor::TensorData;
        type B = burn::backend::NdArray;
        let device = x.device();
        let [rows, columns] = [x.shape()[0], x.shape()[1]];
        let data = burn::tensor::try_read_sync(B::float_into_data(x))
            .expect("ndarray reads synchronously")
            .expect("a host tensor reads back");
        let values: Vec<f64> = data.iter::<f64>().collect();
        let mut indices = vec![0i64; rows * k];
        for (out, row) in indices.chunks_mut(k).zip(values.chunks(columns.max(1))) {
            select_largest(row, out, f64::total_cmp);
        }
        let dtype = get_device_settings::<B>(&device).int_dtype;
        B::int_from_data(
            TensorData::new(indices, [rows, k]).convert_dtype(dtype.into()),
            &device,
        )
    }
}

/// Writes the indices of the `out.len()` largest values of `row` into `out`, largest first,
/// equal values in index order: an insertion into the sorted best-so-far, which a value enters
/// only if it ranks before the last (`O(len x k)`). `order` is a type parameter so that it is
/// inlined: through a function pointer the comparisons cost the flex top-k of 16 of 64
/// experts for 1,024 tokens 0.55 ms, ten times the softmax before it.
pub(crate) fn select_largest<E: Copy>(
    row: &[E],
    out: &mut [i64],
    order: impl Fn(&E, &E) -> std::cmp::Ordering,
) {
    let k = out.len();
    // `a` ranks before `b`: larger, or equal and earlier (indices are visited in order, so an
    // equal later value never displaces an earlier one).
    let before = |a: usize, b: usize| order(&row[a], &row[b]) == std::cmp::Ordering::Greater;
    let mut filled = 0;
    for index in 0..row.len() {
        if filled == k && !before(index, out[k - 1] as usize) {
            continue;
        }
        let mut slot = filled.min(k - 1);
        while slot > 0 && before(index, out[slot - 1] as usize) {
            out[slot] = out[slot - 1];
            slot -= 1;
        }
        out[slot] = index as i64;
        filled = (filled + 1).min(k);
    }
}

#[cfg(feature = "wgpu")]
impl TopKBackend for burn::backend::Cube {}

/// Integer outputs carry no gradient: the autodiff backend runs its inner backend's
/// implementation.
impl<B: Backend + TopKBackend, C: CheckpointStrategy> TopKBackend for Autodiff<B, C> {
    fn top_k_indices(x: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        B::top_k_indices(x.into_primitive(), k)
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl TopKBackend for burn::backend::Remote {}
