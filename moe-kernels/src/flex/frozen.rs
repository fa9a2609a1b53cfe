//! flex's product by a frozen quantized expert stack: each expert with rows is dequantized on
//! its own, on every core ([`crate::dequantize()`]'s loop), and multiplied by flex's GEMM, so
//! the converted copy alive at any time is one expert's `[K, N]` matrix (8 MB for OLMoE's),
//! not the stack's (1.6 GB per layer for OLMoE in f32). Other schemes, and activations in a
//! type other than f32, take the trait's default.

use std::ops::Range;

use burn::backend::flex::{Flex, FlexQTensor, FlexTensor};
use burn::backend::ops::{FloatTensorOps, QTensorOps};
use burn::backend::tensor::IntTensor;
use burn::backend::TensorMetadata;
use burn::tensor::quantization::QuantStore;
use burn::tensor::{DType, Shape, TensorData};

use crate::dequantize::{dequantized, trailing_block};
use crate::frozen::FrozenProductBackend;
use crate::grouped_matmul::{by_group, host_groups, row_slice, GroupedMatmulBackend};
use crate::matmul::MatmulBackend;

impl FrozenProductBackend for Flex {
    fn frozen_grouped_matmul_quantized(
        x: FlexTensor,
        w: FlexQTensor,
        offsets: IntTensor<Self>,
        transpose: bool,
    ) -> FlexTensor {
        let Some(run) = expert_runs(&x, &w) else {
            let w = Flex::float_cast(Flex::dequantize(w, DType::F32.into()), x.dtype().into());
            let w = if transpose {
                Flex::float_swap_dims(w, 1, 2)
            } else {
                w
            };
            return Flex::grouped_matmul(x, w, offsets);
        };
        let shape = w.shape();
        let (inner, columns) = (shape[1], shape[2]);
        let values = w
            .tensor()
            .as_slice::<i8>()
            .expect("checked contiguous by expert_runs");
        let scales = w.scales();
        let device = x.device();
        let groups = host_groups::<Flex>(offsets, x.shape()[0]);
        let width = if transpose { inner } else { columns };
        by_group::<Flex>(&x, &groups, width, |expert, rows: Range<usize>| {
            let size = inner * columns;
            let range = expert * size..(expert + 1) * size;
            let scales = &scales[range.start / run..range.end / run];
            let matrix = dequantized(&values[range], scales, run);
            let matrix = TensorData::new(matrix, Shape::new([inner, columns]));
            let matrix = Flex::float_from_data(matrix, &device);
            let matrix = if transpose {
                Flex::float_transpose(matrix)
            } else {
                matrix
            };
            Flex::matmul_2d(row_slice::<Flex>(x.clone(), rows), matrix)
        })
    }
}

/// The length of the runs of values sharing a scale when `w` can be read expert by expert
/// here: f32 activations, one level of f32 scales over runs along the last axis, one byte a
/// value, stored contiguously.
fn expert_runs(x: &FlexTensor, w: &FlexQTensor) -> Option<usize> {
    let DType::QFloat(scheme) = w.dtype() else {
        return None;
    };
    let simple = x.dtype() == DType::F32
        && scheme.num_levels() == 1
        && scheme.store == QuantStore::Native
        && w.tensor().as_slice::<i8>().is_some();
    let run = trailing_block(&scheme, &w.shape())?;
    let [_, _, columns] = w.shape().dims::<3>();
    (simple && columns.is_multiple_of(run)).then_some(run)
}
