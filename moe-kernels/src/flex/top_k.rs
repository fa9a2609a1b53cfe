//! flex's top-k: a partial selection per row (`O(E k)`), rows in parallel, instead of Burn's
//! sort of every whole row.

use std::cmp::Ordering;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use super::{contiguous, matrix, rows_per_task, Float};
use crate::top_k::{select_largest, TopKBackend};

/// Rows per rayon task: about this many values.
const CHUNK: usize = 1 << 14;

impl TopKBackend for Flex {
    fn top_k_indices(x: FlexTensor, k: usize) -> FlexTensor {
        match x.dtype() {
            DType::F32 => top_k_f32(x, k),
            DType::F64 => top_k::<f64>(x, k, f64::total_cmp),
            _ => {
                let dtype = burn::backend::get_device_settings::<Flex>(&x.device()).int_dtype;
                <Flex as burn::backend::ops::FloatTensorOps<Flex>>::float_argtopk(x, 1, k, dtype)
            }
        }
    }
}

/// [`top_k`] for `f32` rows: each value and its index packed in one integer that orders as
/// "larger value, then lower index" (the value's bits mapped to an unsigned key in the order
/// of `f32::total_cmp`, the index complemented), so that one `select_nth_unstable` and a sort
/// of the `k` chosen find them: `O(E + k log k)` integer comparisons per row, where the
/// insertion of [`top_k`] takes `O(E k)` float comparisons (0.36 ms against about 0.05 ms for
/// 16 of 64 experts over 1,024 tokens).
fn top_k_f32(x: FlexTensor, k: usize) -> FlexTensor {
    let x = contiguous::<f32>(x);
    let (data, columns) = matrix::<f32>(&x);
    let rows = data.len() / columns.max(1);
    let mut indices = vec![0i64; rows * k];
    let block = rows_per_task(columns, CHUNK);
    if k > 0 && columns > 0 {
        indices
            .par_chunks_mut(block * k)
            .zip(data.par_chunks(block * columns))
            .for_each_init(Vec::new, |packed, (out, values)| {
                for (out, row) in out.chunks_mut(k).zip(values.chunks(columns)) {
                    select_largest_packed(row, out, packed);
                }
            });
    }
    let int_dtype = burn::backend::get_device_settings::<Flex>(&x.device()).int_dtype;
    FlexTensor::from_data(TensorData::new(indices, [rows, k]).convert_dtype(int_dtype.into()))
}

/// `f32::total_cmp`'s order as unsigned integers: negative values (sign bit set) have all
/// bits flipped, the others only the sign bit.
fn ordered_key(value: f32) -> u32 {
    let bits = value.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | (1 << 31)
    }
}

/// The indices of the `out.len()` largest values of `row`, largest first, equal values in
/// index order, through `packed` (scratch).
fn select_largest_packed(row: &[f32], out: &mut [i64], packed: &mut Vec<u64>) {
    packed.clear();
    packed.extend(
        row.iter().enumerate().map(|(index, &value)| {
            u64::from(ordered_key(value)) << 32 | u64::from(!(index as u32))
        }),
    );
    let k = out.len();
    let descending = |a: &u64, b: &u64| b.cmp(a);
    if k < packed.len() {
        packed.select_nth_unstable_by(k - 1, descending);
    }
    let chosen = &mut packed[..k];
    chosen.sort_unstable_by(descending);
    for (out, key) in out.iter_mut().zip(chosen.iter()) {
        *out = i64::from(!(*key as u32));
    }
}

/// The `k` largest of each row by `order` (ties to the lower index), largest first, as the
/// device's integer type.
fn top_k<E: Float>(
    x: FlexTensor,
    k: usize,
    order: impl Fn(&E, &E) -> Ordering + Sync + Copy,
) -> FlexTensor {
    let x = contiguous::<E>(x);
    let (data, columns) = matrix::<E>(&x);
    let rows = data.len() / columns.max(1);
    let mut indices = vec![0i64; rows * k];
    let block = rows_per_task(columns, CHUNK);
    indices
        .par_chunks_mut(block * k)
        .zip(data.par_chunks(block * columns.max(1)))
        .for_each(|(out, values)| {
            for (out, row) in out.chunks_mut(k).zip(values.chunks(columns.max(1))) {
                select_largest(row, out, order);
            }
        });
    let int_dtype = burn::backend::get_device_settings::<Flex>(&x.device()).int_dtype;
    FlexTensor::from_data(TensorData::new(indices, [rows, k]).convert_dtype(int_dtype.into()))
}
