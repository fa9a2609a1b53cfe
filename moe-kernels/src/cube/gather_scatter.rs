//! The row gather, the combine (a weighted scatter-add of rows back to their tokens), its
//! backward pass and the dispatch's backward pass (an unweighted scatter-add) on cube, as
//! parallel gathers, without float atomics.
//!
//! Burn's `select_assign` runs one thread per output column, each walking every index; float
//! atomics are not available on every wgpu adapter, and where they are, the order in which
//! they land changes the rounding from run to run. Instead, each token's rows are listed
//! first (a counting sort: counts by integer atomics, offsets by a scan, positions by integer
//! atomics, each list then sorted so the order does not depend on scheduling), and then one
//! unit per output element sums its token's rows in slot order. Six launches, all linear in
//! the slots and tokens; the result is deterministic.
//!
//! The lists are sorted by insertion, one unit per token: quick for the few rows a token
//! receives in an MoE layer, quadratic in a token's row count in general. A slot whose index
//! is outside `0..tokens` (the plan's padding) joins no list, so a token's list holds exactly
//! the rows routed to it: at most `top_k` under a token-choice gate and at most `E` under
//! expert choice, however large the batch or the share of padding.
//!
//! Work per launch (units, and the most work one unit does), for `S` slots, `T` tokens, `d`
//! columns and `m` the longest list (the most rows one token receives):
//!
//! | kernel | units | most work of one unit |
//! |---|---|---|
//! | `gather_rows_kernel` | `S x d` | one read |
//! | `count_rows_kernel`, `list_rows_kernel` | `S` | one atomic add |
//! | the scan of the counts | see `routing.rs` | |
//! | `sort_lists_kernel` | `T` | `m²/2` compares |
//! | `sum_listed_rows_kernel` | `T x d` | `m` reads |
//! | `combine_backward_kernel` | `S` | `2d` reads, `d` writes |

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use super::index::index_within;
use super::routing::column_exclusive_scan;
use super::{empty_like_shape, float_and_int_dtypes, zeros_like_shape};
use crate::gather_scatter::{composed_combine_rows_backward, GatherScatterBackend};

impl GatherScatterBackend for CubeBackend {
    fn gather_rows(x: CubeTensor, index: CubeTensor) -> CubeTensor {
        let columns = x.shape()[1];
        let slots = index.shape()[0];
        let output = empty_like_shape(&x, Shape::new([slots, columns]));
        let units = slots * columns;
        if units == 0 {
            return output;
        }
        let client = x.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtypes = float_and_int_dtypes(&x, &index);
        gather_rows_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            index.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            units,
            dtypes,
        );
        output
    }

    fn combine_rows_backward(
        grad: CubeTensor,
        values: CubeTensor,
        weight: CubeTensor,
        index: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        if grad.dtype != values.dtype || weight.dtype != values.dtype {
            return composed_combine_rows_backward::<CubeBackend>(grad, values, weight, index);
        }
        let (slots, columns) = (values.shape()[0], values.shape()[1]);
        let grad_values = empty_like_shape(&values, Shape::new([slots, columns]));
        let grad_weight = empty_like_shape(&weight, Shape::new([slots]));
        if slots == 0 {
            return (grad_values, grad_weight);
        }
        let client = values.client.clone();
        let cube_dim = CubeDim::new(&client, slots);
        let cube_count = calculate_cube_count_elemwise(&client, slots, cube_dim);
        let dtypes = float_and_int_dtypes(&values, &index);
        combine_backward_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            grad.into_tensor_arg(),
            values.into_tensor_arg(),
            weight.into_tensor_arg(),
            index.into_tensor_arg(),
            grad_values.clone().into_tensor_arg(),
            grad_weight.clone().into_tensor_arg(),
            dtypes,
        );
        (grad_values, grad_weight)
    }

    fn scatter_add_rows(values: CubeTensor, index: CubeTensor, tokens: usize) -> CubeTensor {
        sum_rows_by_token(values, None, index, tokens)
    }

    fn combine_rows(
        values: CubeTensor,
        weight: CubeTensor,
        index: CubeTensor,
        tokens: usize,
    ) -> CubeTensor {
        sum_rows_by_token(values, Some(weight), index, tokens)
    }
}

/// Each token's rows, listed: `rows[starts[t]..starts[t] + counts[t]]` are the slots `s` with
/// `index[s] = t`, in increasing order (slots whose index is out of range are in no list).
struct RowLists {
    counts: CubeTensor,
    starts: CubeTensor,
    rows: CubeTensor,
}

impl RowLists {
    fn new(index: CubeTensor, tokens: usize) -> Self {
        let index = into_contiguous(index);
        let slots = index.shape()[0];
        let client = index.client.clone();
        let dtype = dtype_to_storage_type(index.dtype);
        let elementwise = |units: usize| {
            let cube_dim = CubeDim::new(&client, units.max(1));
            (
                calculate_cube_count_elemwise(&client, units, cube_dim),
                cube_dim,
            )
        };

        let counts = zeros_like_shape(&index, Shape::new([tokens]));
        let (cube_count, cube_dim) = elementwise(slots);
        count_rows_kernel::launch(
            &client,
            cube_count.clone(),
            cube_dim,
            index.clone().into_tensor_arg(),
            counts.clone().into_tensor_arg(),
            slots,
            dtype,
        );
        let starts = column_exclusive_scan(reshaped(counts.clone(), [tokens, 1]));
        let starts = reshaped(starts, [tokens]);

        let filled = zeros_like_shape(&index, Shape::new([tokens]));
        let rows = empty_like_shape(&index, Shape::new([slots]));
        list_rows_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            index.into_tensor_arg(),
            starts.clone().into_tensor_arg(),
            filled.into_tensor_arg(),
            rows.clone().into_tensor_arg(),
            slots,
            dtype,
        );
        let (cube_count, cube_dim) = elementwise(tokens);
        sort_lists_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            starts.clone().into_tensor_arg(),
            counts.clone().into_tensor_arg(),
            rows.clone().into_tensor_arg(),
            tokens,
            dtype,
        );
        Self {
            counts,
            starts,
            rows,
        }
    }
}

/// A contiguous tensor with a new shape of the same number of elements (a view).
fn reshaped<const D: usize>(mut tensor: CubeTensor, shape: [usize; D]) -> CubeTensor {
    let contiguous = CubeTensor::new_contiguous(
        tensor.client.clone(),
        tensor.device.clone(),
        Shape::new(shape),
        tensor.handle.clone(),
        tensor.dtype,
    );
    tensor.meta = contiguous.meta;
    tensor
}

/// `y[t] = Σ_{s: index[s] = t} weight[s] · values[s]` (weight 1 when `None`), `[tokens, d]`.
fn sum_rows_by_token(
    values: CubeTensor,
    weight: Option<CubeTensor>,
    index: CubeTensor,
    tokens: usize,
) -> CubeTensor {
    let columns = values.shape()[1];
    let output = empty_like_shape(&values, Shape::new([tokens, columns]));
    if tokens * columns == 0 {
        return output;
    }
    let lists = RowLists::new(index, tokens);
    let client = values.client.clone();
    let units = tokens * columns;
    let cube_dim = CubeDim::new(&client, units);
    let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
    let weighted = weight.is_some();
    // Unweighted: the kernel does not read `weight`; any tensor of the right type will do.
    let weight = weight.unwrap_or_else(|| values.clone());
    let dtypes = float_and_int_dtypes(&values, &lists.rows);
    sum_listed_rows_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        values.into_tensor_arg(),
        weight.into_tensor_arg(),
        lists.starts.into_tensor_arg(),
        lists.counts.into_tensor_arg(),
        lists.rows.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        units,
        weighted,
        dtypes,
    );
    output
}

/// One unit per output element `(s, c)`: `x[index[s], c]`, or zero for a padding slot.
#[cube(launch)]
fn gather_rows_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    index: &Tensor<I>,
    output: &mut Tensor<F>,
    units: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let position = ABSOLUTE_POS;
    if position >= units {
        terminate!();
    }
    let columns = output.shape(1);
    let tokens = x.shape(0);
    let token = index_within(index, position / columns, tokens);
    let mut value = F::from_int(0);
    if token < tokens {
        value = x[token * x.stride(0) + (position % columns) * x.stride(1)];
    }
    output[position] = value;
}

/// One unit per slot `s` naming token `t`: `grad_values[s] = weight[s] · grad[t]` and
/// `grad_weight[s] = grad[t] · values[s]` (summed in f32, in column order); zeros for a
/// padding slot.
#[cube(launch)]
fn combine_backward_kernel<F: Float, I: Int>(
    grad: &Tensor<F>,
    values: &Tensor<F>,
    weight: &Tensor<F>,
    index: &Tensor<I>,
    grad_values: &mut Tensor<F>,
    grad_weight: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let slot = ABSOLUTE_POS;
    if slot >= values.shape(0) {
        terminate!();
    }
    let columns = values.shape(1);
    let tokens = grad.shape(0);
    let token = index_within(index, slot, tokens);
    let mut scale = 0.0f32;
    if token < tokens {
        scale = f32::cast_from(weight[slot * weight.stride(0)]);
    }
    let mut dot = 0.0f32;
    for column in 0..columns {
        let mut upstream = 0.0f32;
        if token < tokens {
            upstream = f32::cast_from(grad[token * grad.stride(0) + column * grad.stride(1)]);
        }
        let value = f32::cast_from(values[slot * values.stride(0) + column * values.stride(1)]);
        grad_values[slot * columns + column] = F::cast_from(scale * upstream);
        dot += upstream * value;
    }
    grad_weight[slot] = F::cast_from(dot);
}

/// One unit per slot: `counts[index[s]] += 1` (integer atomics).
#[cube(launch)]
fn count_rows_kernel<I: Int>(
    index: &Tensor<I>,
    counts: &mut Tensor<Atomic<I>>,
    slots: usize,
    #[define(I)] _dtype: ElemType,
) {
    let slot = ABSOLUTE_POS;
    if slot >= slots {
        terminate!();
    }
    let token = index[slot];
    if token >= I::from_int(0) && usize::cast_from(token) < counts.shape(0) {
        counts[usize::cast_from(token)].fetch_add(I::from_int(1));
    }
}

/// One unit per slot: takes the next free place in its token's list.
#[cube(launch)]
fn list_rows_kernel<I: Int>(
    index: &Tensor<I>,
    starts: &Tensor<I>,
    filled: &mut Tensor<Atomic<I>>,
    rows: &mut Tensor<I>,
    slots: usize,
    #[define(I)] _dtype: ElemType,
) {
    let slot = ABSOLUTE_POS;
    if slot >= slots {
        terminate!();
    }
    let token = index[slot];
    if token >= I::from_int(0) && usize::cast_from(token) < starts.shape(0) {
        let token = usize::cast_from(token);
        let place = filled[token].fetch_add(I::from_int(1));
        rows[usize::cast_from(starts[token]) + usize::cast_from(place)] = I::cast_from(slot);
    }
}

/// One unit per token: sorts its list (insertion sort; the lists are short).
#[cube(launch)]
fn sort_lists_kernel<I: Int>(
    starts: &Tensor<I>,
    counts: &Tensor<I>,
    rows: &mut Tensor<I>,
    tokens: usize,
    #[define(I)] _dtype: ElemType,
) {
    let token = ABSOLUTE_POS;
    if token >= tokens {
        terminate!();
    }
    let start = usize::cast_from(starts[token]);
    let count = usize::cast_from(counts[token]);
    for i in 1..count {
        let row = rows[start + i];
        // Shift the larger rows before it one place up, then put it in the gap.
        let mut j = i;
        let mut shifting = true;
        while shifting {
            if j == 0 {
                shifting = false;
            } else {
                let previous = rows[start + j - 1];
                if previous > row {
                    rows[start + j] = previous;
                    j -= 1;
                } else {
                    shifting = false;
                }
            }
        }
        rows[start + j] = row;
    }
}

/// One unit per output element `(t, c)`: the weighted sum of column `c` of token `t`'s rows,
/// in slot order, in f32.
#[cube(launch)]
fn sum_listed_rows_kernel<F: Float, I: Int>(
    values: &Tensor<F>,
    weight: &Tensor<F>,
    starts: &Tensor<I>,
    counts: &Tensor<I>,
    rows: &Tensor<I>,
    output: &mut Tensor<F>,
    units: usize,
    #[comptime] weighted: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let position = ABSOLUTE_POS;
    if position >= units {
        terminate!();
    }
    let columns = output.shape(1);
    let token = position / columns;
    let column = position % columns;
    let start = usize::cast_from(starts[token]);
    let count = usize::cast_from(counts[token]);
    let (row_stride, column_stride) = (values.stride(0), values.stride(1));
    let mut sum = 0.0f32;
    for i in 0..count {
        let row = usize::cast_from(rows[start + i]);
        let value = f32::cast_from(values[row * row_stride + column * column_stride]);
        if weighted {
            sum += f32::cast_from(weight[row * weight.stride(0)]) * value;
        } else {
            sum += value;
        }
    }
    output[position] = F::cast_from(sum);
}
