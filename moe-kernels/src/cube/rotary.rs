//! Rotary position encoding on cube: one launch, one unit per feature pair (Burn's composed
//! form is two slices, two concatenations, four multiplies and an add each way, with the
//! zero fills and slice-assigns of their gradients: about 14 launches per call).
//!
//! Work: `P` units for `P` pairs, each two reads of `x` (found through its strides, a step per
//! dimension of `x`), one of each table and two writes; no loop over rows or features.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use super::rows::row_start;
use super::{computes_in_f32, empty_like_shape};
use crate::rotary::{composed_rotate_pairs, RotaryBackend};

impl RotaryBackend for CubeBackend {
    fn rotate_pairs(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, inverse: bool) -> CubeTensor {
        if cos.dtype != x.dtype || sin.dtype != x.dtype || !computes_in_f32(x.dtype) {
            return composed_rotate_pairs::<CubeBackend>(x, cos, sin, inverse);
        }
        let output = empty_like_shape(&x, x.shape());
        let units = x.shape().num_elements() / 2;
        if units == 0 {
            return output;
        }
        let [positions, pairs] = [cos.shape()[0], cos.shape()[1]];
        let row_pairs = x.shape()[x.shape().num_dims() - 1] / 2;
        let client = x.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtype = dtype_to_storage_type(x.dtype);
        rotary_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            positions,
            pairs,
            row_pairs,
            units,
            inverse,
            dtype,
        );
        output
    }
}

/// One unit per pair `q` of `x` in row-major order (pair `q mod row_pairs` of row
/// `r = q / row_pairs`, at position `p = r mod positions`; `x` read through its strides): with
/// `(a, b)` the pair, `i = (q mod row_pairs) mod pairs`, `c = cos[p, i]` and `s = ±sin[p, i]`
/// (minus for the inverse rotation), `y[2q] = a c - b s` and `y[2q + 1] = a s + b c`
/// (contiguous), in f32. The tables are read through their strides.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rotary_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    output: &mut Tensor<F>,
    positions: usize,
    pairs: usize,
    row_pairs: usize,
    units: usize,
    #[comptime] inverse: bool,
    #[define(F)] _dtype: ElemType,
) {
    let q = ABSOLUTE_POS;
    if q >= units {
        terminate!();
    }
    let (row, pair) = (q / row_pairs, q % row_pairs);
    let i = pair % pairs;
    let p = row % positions;
    let c = f32::cast_from(cos[p * cos.stride(0) + i * cos.stride(1)]);
    let mut s = f32::cast_from(sin[p * sin.stride(0) + i * sin.stride(1)]);
    if inverse {
        s = -s;
    }
    let step = x.stride(x.rank() - 1);
    let first = row_start(x, row) + 2 * pair * step;
    let a = f32::cast_from(x[first]);
    let b = f32::cast_from(x[first + step]);
    output[2 * q] = F::cast_from(a * c - b * s);
    output[2 * q + 1] = F::cast_from(a * s + b * c);
}
