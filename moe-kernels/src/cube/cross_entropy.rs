//! The cross-entropy on cube: the forward pass as one cube per row (the row's maximum and its
//! sum of shifted exponentials reduced in shared memory, in a fixed order, so the result
//! does not depend on scheduling), the backward pass as one unit per logit. Composed from
//! Burn's ops the same loss is a max, a subtract, an exp, a sum, a log, a gather and, backward,
//! an exp, a multiply and a scatter: several launches each way, and a `[rows, classes]`
//! intermediate forward.
//!
//! Work per launch, for `R` rows, `C` classes and `u` units per cube (256, or fewer where the
//! device allows fewer):
//!
//! | kernel | units | most work of one unit |
//! |---|---|---|
//! | `cross_entropy_forward_kernel` | `R` cubes of `u` | `2 ceil(C / u)` reads; unit 0 also combines the `u` partial results twice |
//! | `cross_entropy_backward_kernel` | `R x C` | 3 reads, 1 write |
//!
//! A target outside `0..classes` picks no logit: its loss is the log-normaliser and its
//! gradient the softmax alone (flex refuses such a target; Burn's composed `gather` reads out
//! of bounds).

use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use super::index::index_within;
use super::rows::{row_exp_sum, row_maximum};
use super::{cube_row, empty_like_shape, float_and_int_dtypes, one_cube_per_row, scan_units};
use crate::cross_entropy::CrossEntropyBackend;

impl CrossEntropyBackend for CubeBackend {
    fn cross_entropy_forward(logits: CubeTensor, targets: CubeTensor) -> (CubeTensor, CubeTensor) {
        let rows = logits.shape()[0];
        let loss = empty_like_shape(&logits, Shape::new([rows]));
        let lse = empty_like_shape(&logits, Shape::new([rows]));
        if rows == 0 {
            return (loss, lse);
        }
        let client = logits.client.clone();
        let units = scan_units(&client);
        let dtypes = float_and_int_dtypes(&logits, &targets);
        cross_entropy_forward_kernel::launch(
            &client,
            one_cube_per_row(rows),
            CubeDim::new_1d(units as u32),
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            loss.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            units,
            dtypes,
        );
        (loss, lse)
    }

    fn cross_entropy_backward(
        logits: CubeTensor,
        lse: CubeTensor,
        targets: CubeTensor,
        grad: CubeTensor,
    ) -> CubeTensor {
        let shape = logits.shape();
        let output = empty_like_shape(&logits, shape.clone());
        let units = shape.num_elements();
        if units == 0 {
            return output;
        }
        let client = logits.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtypes = float_and_int_dtypes(&logits, &targets);
        cross_entropy_backward_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            logits.into_tensor_arg(),
            lse.into_tensor_arg(),
            targets.into_tensor_arg(),
            grad.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            units,
            dtypes,
        );
        output
    }
}

/// One cube per row `r` (`CUBE_POS_Y * 65,535 + CUBE_POS_X`): `m = max_j x[r, j]`,
/// `lse[r] = m + ln Σ_j e^{x[r, j] - m}` and `loss[r] = lse[r] - x[r, t]`, in f32. Unit `u`
/// reads the classes `u, u + units, ...`.
#[cube(launch)]
fn cross_entropy_forward_kernel<F: Float, I: Int>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    loss: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    #[comptime] units: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let row = cube_row();
    if row >= logits.shape(0) {
        terminate!();
    }
    let classes = logits.shape(1);
    let (row_start, column) = (row * logits.stride(0), logits.stride(1));
    let unit = UNIT_POS as usize;
    let mut shared = Shared::<[f32]>::new_slice(units);

    let maximum = row_maximum(logits, row_start, column, classes, &mut shared, units);
    let sum = row_exp_sum(
        logits,
        row_start,
        column,
        classes,
        maximum,
        &mut shared,
        units,
    );

    if unit == 0 {
        let normaliser = maximum + f32::ln(sum);
        let target = index_within(targets, row, classes);
        let mut picked = 0.0f32;
        if target < classes {
            picked = f32::cast_from(logits[row_start + target * column]);
        }
        lse[row] = F::cast_from(normaliser);
        loss[row] = F::cast_from(normaliser - picked);
    }
}

/// One unit per logit `(r, j)`: `grad[r] (e^{x[r, j] - lse[r]} - [j = t_r])`, in f32.
#[cube(launch)]
fn cross_entropy_backward_kernel<F: Float, I: Int>(
    logits: &Tensor<F>,
    lse: &Tensor<F>,
    targets: &Tensor<I>,
    grad: &Tensor<F>,
    output: &mut Tensor<F>,
    units: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let position = ABSOLUTE_POS;
    if position >= units {
        terminate!();
    }
    let classes = logits.shape(1);
    let (row, class) = (position / classes, position % classes);
    let x = f32::cast_from(logits[row * logits.stride(0) + class * logits.stride(1)]);
    let probability = f32::exp(x - f32::cast_from(lse[row * lse.stride(0)]));
    let hit = select(index_within(targets, row, classes) == class, 1.0f32, 0.0f32);
    output[position] =
        F::cast_from(f32::cast_from(grad[row * grad.stride(0)]) * (probability - hit));
}
