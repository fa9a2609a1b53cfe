//! The grouped (ragged) matmul on cube: tiled products over each group's rows, with the groups
//! found on the device.
//!
//! The offsets live on the device, so the host cannot say which tile belongs to which group.
//! The grid is sized for the most tiles any offsets can make (`ceil(S / 64) + E` row tiles:
//! each group adds at most one partial tile), and each cube finds its group by walking the
//! `E + 1` offsets (normalised as the [`crate::grouped_matmul`] docs say); the cubes left over
//! stop at once. Each cube computes a `64 x 64` block of the output from `64 x 16` blocks of
//! the operands staged in shared memory, each unit a `4 x 4` patch held in registers, summed in
//! f32 whatever the operands' type; operands are read through their strides, so the backward
//! pass's transposed views are not copied.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

use super::{empty_like_shape, zeros_like_shape};
use crate::grouped_matmul::GroupedMatmulBackend;

/// Units along each side of a cube.
const UNITS: usize = 16;
/// Outputs along each side of one unit's patch.
const PER_UNIT: usize = 4;
/// Rows and columns of the output block one cube computes.
const BLOCK: usize = UNITS * PER_UNIT;
/// The inner-dimension step: each staged operand block is `BLOCK x STEP`.
const STEP: usize = 16;
/// Elements of a staged block each unit loads.
const LOADS: usize = BLOCK * STEP / (UNITS * UNITS);

impl GroupedMatmulBackend for CubeBackend {
    fn grouped_matmul(x: CubeTensor, w: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let (rows, experts, columns) = (x.shape()[0], w.shape()[0], w.shape()[2]);
        // Rows no group covers stay zero.
        let output = zeros_like_shape(&x, Shape::new([rows, columns]));
        if rows * columns == 0 {
            return output;
        }
        let row_tiles = rows.div_ceil(BLOCK) + experts;
        let dtypes = dtypes(&x, &offsets);
        grouped_matmul_kernel::launch(
            &x.client.clone(),
            CubeCount::Static(row_tiles as u32, columns.div_ceil(BLOCK) as u32, 1),
            CubeDim::new_2d(UNITS as u32, UNITS as u32),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            offsets.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            dtypes,
        );
        output
    }

    fn grouped_weight_grad(x: CubeTensor, grad: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let (inner, columns) = (x.shape()[1], grad.shape()[1]);
        let experts = offsets.shape()[0] - 1;
        // Every element is written (an empty group's block with zeros).
        let output = empty_like_shape(&x, Shape::new([experts, inner, columns]));
        if output.shape().num_elements() == 0 {
            return output;
        }
        let dtypes = dtypes(&x, &offsets);
        grouped_weight_grad_kernel::launch(
            &x.client.clone(),
            CubeCount::Static(
                inner.div_ceil(BLOCK) as u32,
                columns.div_ceil(BLOCK) as u32,
                experts as u32,
            ),
            CubeDim::new_2d(UNITS as u32, UNITS as u32),
            x.into_tensor_arg(),
            grad.into_tensor_arg(),
            offsets.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            dtypes,
        );
        output
    }

    fn grouped_bias(x: CubeTensor, bias: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let output = empty_like_shape(&x, x.shape());
        let rows = x.shape()[0];
        if output.shape().num_elements() == 0 {
            return output;
        }
        let client = x.client.clone();
        let cube_dim = CubeDim::new(&client, rows);
        let cube_count = calculate_cube_count_elemwise(&client, rows, cube_dim);
        let dtypes = dtypes(&x, &offsets);
        grouped_bias_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            bias.into_tensor_arg(),
            offsets.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            dtypes,
        );
        output
    }

    fn grouped_row_sum(values: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let experts = offsets.shape()[0] - 1;
        let columns = values.shape()[1];
        let output = empty_like_shape(&values, Shape::new([experts, columns]));
        let units = experts * columns;
        if units == 0 {
            return output;
        }
        let client = values.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtypes = dtypes(&values, &offsets);
        grouped_row_sum_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            values.into_tensor_arg(),
            offsets.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            units,
            dtypes,
        );
        output
    }
}

/// The float and integer storage types of a kernel's `#[define(F, I)]`.
fn dtypes(float: &CubeTensor, int: &CubeTensor) -> [cubecl::ir::ElemType; 2] {
    [
        dtype_to_storage_type(float.dtype),
        dtype_to_storage_type(int.dtype),
    ]
}

/// `offsets[e]` as a row bound: clamped to `0..=rows`.
#[cube]
fn bound<I: Int>(offsets: &Tensor<I>, e: usize, rows: usize) -> usize {
    let value = offsets[e];
    let value = select(value < I::from_int(0), I::from_int(0), value);
    let value = usize::cast_from(value);
    select(value < rows, value, rows)
}

/// Group `expert`'s rows `[start, end)`: `start` is the previous group's end (or the first
/// bound), `end` its own bound but not before `start`.
#[cube]
fn group_rows<I: Int>(offsets: &Tensor<I>, expert: usize, rows: usize) -> (usize, usize) {
    let mut start = bound(offsets, 0, rows);
    let mut end = start;
    for e in 0..expert + 1 {
        start = end;
        let upper = bound(offsets, e + 1, rows);
        end = select(upper > start, upper, start);
    }
    (start, end)
}

/// One cube per (row tile, column tile) of the output: finds the group of its row tile, then
/// accumulates `x[rows of the tile] · w[group]` over `K` in steps of `STEP`. Each unit computes
/// `PER_UNIT x PER_UNIT` outputs (rows `ty + UNITS i`, columns `tx + UNITS j`), so each staged
/// operand value is used `PER_UNIT` times from registers; sums are kept in f32.
#[cube(launch)]
fn grouped_matmul_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    offsets: &Tensor<I>,
    output: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let rows = x.shape(0);
    let inner = x.shape(1);
    let columns = w.shape(2);
    let experts = w.shape(0);
    let tile = CUBE_POS_X as usize;

    // Walk the groups, counting their row tiles, until the one holding tile `tile`.
    let mut expert = experts;
    let mut first_row = 0usize;
    let mut group_end = 0usize;
    let mut tiles_before = 0usize;
    let mut start = bound(offsets, 0, rows);
    for e in 0..experts {
        let upper = bound(offsets, e + 1, rows);
        let end = select(upper > start, upper, start);
        let tiles = (end - start + BLOCK - 1) / BLOCK;
        if expert == experts && tile < tiles_before + tiles {
            expert = e;
            first_row = start + (tile - tiles_before) * BLOCK;
            group_end = end;
        }
        tiles_before += tiles;
        start = end;
    }
    if expert == experts {
        terminate!();
    }

    let unit = UNIT_POS as usize;
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let first_column = CUBE_POS_Y as usize * BLOCK;
    let (x_row, x_column) = (x.stride(0), x.stride(1));
    let (w_row, w_column) = (w.stride(1), w.stride(2));
    let w_start = expert * w.stride(0);
    // x_block[r][k] = x[first_row + r, k0 + k]; w_block[k][c] = w[expert, k0 + k, first_column + c].
    let mut x_block = Shared::<[F]>::new_slice(BLOCK * STEP);
    let mut w_block = Shared::<[F]>::new_slice(STEP * BLOCK);
    let mut sums = Array::<f32>::new(PER_UNIT * PER_UNIT);
    for k0 in range_stepped(0, inner, STEP) {
        #[unroll]
        for load in 0..LOADS {
            let element = unit + load * UNITS * UNITS;
            let (r, k) = (element / STEP, element % STEP);
            let mut value = F::from_int(0);
            if first_row + r < group_end && k0 + k < inner {
                value = x[(first_row + r) * x_row + (k0 + k) * x_column];
            }
            x_block[element] = value;
            let (k, c) = (element / BLOCK, element % BLOCK);
            let mut value = F::from_int(0);
            if k0 + k < inner && first_column + c < columns {
                value = w[w_start + (k0 + k) * w_row + (first_column + c) * w_column];
            }
            w_block[element] = value;
        }
        sync_cube();
        #[unroll]
        for k in 0..STEP {
            #[unroll]
            for i in 0..PER_UNIT {
                let a = f32::cast_from(x_block[(ty + UNITS * i) * STEP + k]);
                #[unroll]
                for j in 0..PER_UNIT {
                    let b = f32::cast_from(w_block[k * BLOCK + tx + UNITS * j]);
                    sums[i * PER_UNIT + j] += a * b;
                }
            }
        }
        sync_cube();
    }
    // Through the strides: the zero-filled output may have padded rows.
    let (out_row, out_column) = (output.stride(0), output.stride(1));
    #[unroll]
    for i in 0..PER_UNIT {
        let row = first_row + ty + UNITS * i;
        #[unroll]
        for j in 0..PER_UNIT {
            let column = first_column + tx + UNITS * j;
            if row < group_end && column < columns {
                output[row * out_row + column * out_column] = F::cast_from(sums[i * PER_UNIT + j]);
            }
        }
    }
}

/// One cube per (row tile of `K`, column tile of `N`, group): accumulates
/// `x[group rows]ᵀ · grad[group rows]` over the group's rows in steps of `STEP`, each unit
/// `PER_UNIT x PER_UNIT` outputs, in f32.
#[cube(launch)]
fn grouped_weight_grad_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    offsets: &Tensor<I>,
    output: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let rows = x.shape(0);
    let inner = x.shape(1);
    let columns = grad.shape(1);
    let expert = CUBE_POS_Z as usize;
    let (start, end) = group_rows(offsets, expert, rows);

    let unit = UNIT_POS as usize;
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let first_k = CUBE_POS_X as usize * BLOCK;
    let first_column = CUBE_POS_Y as usize * BLOCK;
    // x_block[r][k] = x[r0 + r, first_k + k]; grad_block[r][c] = grad[r0 + r, first_column + c].
    let mut x_block = Shared::<[F]>::new_slice(STEP * BLOCK);
    let mut grad_block = Shared::<[F]>::new_slice(STEP * BLOCK);
    let mut sums = Array::<f32>::new(PER_UNIT * PER_UNIT);
    for r0 in range_stepped(start, end, STEP) {
        #[unroll]
        for load in 0..LOADS {
            let element = unit + load * UNITS * UNITS;
            let (r, c) = (element / BLOCK, element % BLOCK);
            let mut x_value = F::from_int(0);
            let mut grad_value = F::from_int(0);
            if r0 + r < end {
                if first_k + c < inner {
                    x_value = x[(r0 + r) * x.stride(0) + (first_k + c) * x.stride(1)];
                }
                if first_column + c < columns {
                    grad_value =
                        grad[(r0 + r) * grad.stride(0) + (first_column + c) * grad.stride(1)];
                }
            }
            x_block[element] = x_value;
            grad_block[element] = grad_value;
        }
        sync_cube();
        #[unroll]
        for r in 0..STEP {
            #[unroll]
            for i in 0..PER_UNIT {
                let a = f32::cast_from(x_block[r * BLOCK + ty + UNITS * i]);
                #[unroll]
                for j in 0..PER_UNIT {
                    let b = f32::cast_from(grad_block[r * BLOCK + tx + UNITS * j]);
                    sums[i * PER_UNIT + j] += a * b;
                }
            }
        }
        sync_cube();
    }
    #[unroll]
    for i in 0..PER_UNIT {
        let k = first_k + ty + UNITS * i;
        #[unroll]
        for j in 0..PER_UNIT {
            let column = first_column + tx + UNITS * j;
            if k < inner && column < columns {
                output[(expert * inner + k) * columns + column] =
                    F::cast_from(sums[i * PER_UNIT + j]);
            }
        }
    }
}

/// One unit per row: finds its group and adds the group's bias row (rows in no group are
/// copied).
#[cube(launch)]
fn grouped_bias_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    bias: &Tensor<F>,
    offsets: &Tensor<I>,
    output: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let rows = x.shape(0);
    let row = ABSOLUTE_POS;
    if row >= rows {
        terminate!();
    }
    let columns = x.shape(1);
    let experts = bias.shape(0);
    let mut expert = experts;
    let mut start = bound(offsets, 0, rows);
    for e in 0..experts {
        let upper = bound(offsets, e + 1, rows);
        let end = select(upper > start, upper, start);
        if row >= start && row < end {
            expert = e;
        }
        start = end;
    }
    for column in 0..columns {
        let mut value = x[row * x.stride(0) + column * x.stride(1)];
        if expert < experts {
            value += bias[expert * bias.stride(0) + column * bias.stride(1)];
        }
        output[row * columns + column] = value;
    }
}

/// One unit per (group, column): the sum of the column over the group's rows, in row order,
/// in f32.
#[cube(launch)]
fn grouped_row_sum_kernel<F: Float, I: Int>(
    values: &Tensor<F>,
    offsets: &Tensor<I>,
    output: &mut Tensor<F>,
    units: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let position = ABSOLUTE_POS;
    if position >= units {
        terminate!();
    }
    let columns = values.shape(1);
    let expert = position / columns;
    let column = position % columns;
    let (start, end) = group_rows(offsets, expert, values.shape(0));
    let mut sum = 0.0f32;
    for row in start..end {
        sum += f32::cast_from(values[row * values.stride(0) + column * values.stride(1)]);
    }
    output[position] = F::cast_from(sum);
}
