//! flex's rotary encoding: one pass over the rows, split over the cores, each output element
//! written once. `f32` and `f64`; half precisions and mixed dtypes use the composed ops.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};

use crate::rotary::{composed_rotate_pairs, RotaryBackend};

use super::{contiguous, rows_per_task, written_rows, Float};

/// Elements per rayon task (whole rows, at least one).
const CHUNK: usize = 1 << 15;

impl RotaryBackend for Flex {
    fn rotate_pairs(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
        if cos.dtype() != x.dtype() || sin.dtype() != x.dtype() {
            return composed_rotate_pairs::<Flex>(x, cos, sin, inverse);
        }
        match x.dtype() {
            DType::F32 => rotate::<f32>(x, cos, sin, inverse),
            DType::F64 => rotate::<f64>(x, cos, sin, inverse),
            _ => composed_rotate_pairs::<Flex>(x, cos, sin, inverse),
        }
    }
}

/// `y[2i] = a c - b s`, `y[2i + 1] = a s + b c` for each pair `(a, b)` of each row, `c` and
/// `s` taken from the row's position (`row % positions`), negated when `inverse`.
fn rotate<E: Float>(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, inverse: bool) -> FlexTensor {
    let shape = x.shape();
    let [positions, pairs] = [cos.shape()[0], cos.shape()[1]];
    // The whole row: `k` groups (heads) of `pairs` pairs, each rotated by the same tables.
    let row = shape[shape.num_dims() - 1];
    let (x, cos, sin) = (
        contiguous::<E>(x),
        contiguous::<E>(cos),
        contiguous::<E>(sin),
    );
    let input = x.as_slice::<E>().expect("contiguous after `contiguous`");
    let cos = cos.as_slice::<E>().expect("contiguous after `contiguous`");
    let sin = sin.as_slice::<E>().expect("contiguous after `contiguous`");
    let rows = input.len().checked_div(row).unwrap_or(0);
    let block = rows_per_task(row, CHUNK);
    let output = written_rows::<E>(rows, row, block, |first, out| {
        for (offset, out) in out.chunks_exact_mut(row).enumerate() {
            let index = first + offset;
            let position = index % positions;
            let x = &input[index * row..(index + 1) * row];
            let cos = &cos[position * pairs..(position + 1) * pairs];
            let sin = &sin[position * pairs..(position + 1) * pairs];
            let pairs = x
                .chunks_exact(2)
                .zip(out.chunks_exact_mut(2))
                .zip(cos.iter().zip(sin).cycle());
            for ((x, out), (&c, &s)) in pairs {
                let s = if inverse { E::ZERO - s } else { s };
                let (a, b) = (x[0], x[1]);
                out[0].write(a * c - b * s);
                out[1].write(a * s + b * c);
            }
        }
    });
    FlexTensor::from_data(TensorData::new(output, shape))
}
