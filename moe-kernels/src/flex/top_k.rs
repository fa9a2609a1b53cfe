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
            DType::F32 => top_k::<f32>(x, k, f32::total_cmp),
            DType::F64 => top_k::<f64>(x, k, f64::total_cmp),
            _ => {
                let dtype = burn::backend::get_device_settings::<Flex>(&x.device()).int_dtype;
                <Flex as burn::backend::ops::FloatTensorOps<Flex>>::float_argtopk(x, 1, k, dtype)
            }
        }
    }
}

/// The `k` largest of each row by `order` (ties to the lower index), largest first, as the
/// device's integer type.
fn top_k<E: Float>(x: FlexTensor, k: usize, order: fn(&E, &E) -> Ordering) -> FlexTensor {
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
