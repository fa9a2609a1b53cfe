//! RMSNorm on cube: the forward pass as one cube per row, the backward pass as one cube per
//! row (the input's gradient, and each row's `g ⊙ x̂`) followed by Burn's sum over the rows
//! (the scale's gradient). Composed from Burn's ops it is about seven launches forward and
//! backward together, with `[rows, n]` intermediates each way.
//!
//! Work per launch, for `R` rows of `n` and `u` units per cube ([`RowLaunch`]: `n` rounded up
//! to a power of two, at most 256):
//!
//! | kernel | units | most work of one unit |
//! |---|---|---|
//! | `rms_norm_forward_kernel` | `R` cubes of `u` | `2 ceil(n / u)` reads, `ceil(n / u)` writes; unit 0 also adds `u` sums |
//! | `rms_norm_backward_kernel` | `R` cubes of `u` | `4 ceil(n / u)` reads, `2 ceil(n / u)` writes; unit 0 also adds `2u` sums |
//!
//! then Burn's `sum_dim` over the `R` rows of `g ⊙ x̂` (its reduction kernel, no long loop).

use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use cubecl::prelude::*;

use super::rows::{reduce_in_order, row_start, RowLaunch};
use super::{computes_in_f32, cube_row, empty_like_shape};
use crate::rms_norm::{composed_rms_norm, composed_rms_norm_backward, RmsNormBackend};

impl RmsNormBackend for CubeBackend {
    fn rms_norm(x: CubeTensor, gamma: CubeTensor, epsilon: f64) -> CubeTensor {
        if gamma.dtype != x.dtype || !computes_in_f32(x.dtype) {
            return composed_rms_norm::<CubeBackend>(x, gamma, epsilon);
        }
        let output = empty_like_shape(&x, x.shape());
        let Some(launch) = RowLaunch::over(&x) else {
            return output;
        };
        rms_norm_forward_kernel::launch(
            &launch.client,
            launch.cube_count(),
            launch.cube_dim(),
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            epsilon as f32,
            launch.rows,
            launch.n,
            launch.units,
            launch.dtype,
        );
        output
    }

    fn rms_norm_backward(
        x: CubeTensor,
        gamma: CubeTensor,
        grad: CubeTensor,
        epsilon: f64,
    ) -> (CubeTensor, CubeTensor) {
        if gamma.dtype != x.dtype || grad.dtype != x.dtype || !computes_in_f32(x.dtype) {
            return composed_rms_norm_backward::<CubeBackend>(x, gamma, grad, epsilon);
        }
        let grad_x = empty_like_shape(&x, x.shape());
        let n = gamma.shape()[0];
        let Some(launch) = RowLaunch::over(&x) else {
            let zeros = CubeBackend::float_zeros(Shape::new([n]), &x.device, x.dtype.into());
            return (grad_x, zeros);
        };
        let scaled = empty_like_shape(&x, Shape::new([launch.rows, n]));
        rms_norm_backward_kernel::launch(
            &launch.client,
            launch.cube_count(),
            launch.cube_dim(),
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            grad.into_tensor_arg(),
            grad_x.clone().into_tensor_arg(),
            scaled.clone().into_tensor_arg(),
            epsilon as f32,
            launch.rows,
            n,
            launch.units,
            launch.dtype,
        );
        let grad_gamma =
            CubeBackend::float_reshape(CubeBackend::float_sum_dim(scaled, 0), Shape::new([n]));
        (grad_x, grad_gamma)
    }
}

/// One cube per row `r` (`CUBE_POS_Y * 65,535 + CUBE_POS_X`) of `x` (read through its
/// strides), into the contiguous output:
/// `ρ = 1 / √(Σ_j x[r, j]² / n + ε)`, then `y[r, j] = γ[j] x[r, j] ρ`, in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_forward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    output: &mut Tensor<F>,
    epsilon: f32,
    rows: usize,
    n: usize,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let (start, step) = (row_start(x, row), x.stride(x.rank() - 1));
    let unit = UNIT_POS as usize;
    let mut shared = Shared::<[f32]>::new_slice(units);
    let mut squares = 0.0f32;
    for j in range_stepped(unit, n, units) {
        let value = f32::cast_from(x[start + j * step]);
        squares += value * value;
    }
    shared[unit] = squares;
    sync_cube();
    reduce_in_order(&mut shared, units, false);
    let inverse_rms = 1.0f32 / f32::sqrt(shared[0] / f32::cast_from(n) + epsilon);
    for j in range_stepped(unit, n, units) {
        let scale = f32::cast_from(gamma[j * gamma.stride(0)]);
        let value = f32::cast_from(x[start + j * step]);
        output[row * n + j] = F::cast_from(value * inverse_rms * scale);
    }
}

/// One cube per row `r` of `x` and `g` (read through their strides), into contiguous outputs:
/// with `ρ` as forward, `x̂ = x ρ` and
/// `m = ρ Σ_j g[j] γ[j] x[j] / n` (the mean of `g ⊙ γ ⊙ x̂`),
/// `grad_x[r, j] = ρ (g[j] γ[j] - x̂[j] m)` and `scaled[r, j] = g[j] x̂[j]` (whose sum over the
/// rows is `grad_γ`), in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_backward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    grad: &Tensor<F>,
    grad_x: &mut Tensor<F>,
    scaled: &mut Tensor<F>,
    epsilon: f32,
    rows: usize,
    n: usize,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let (start, step) = (row_start(x, row), x.stride(x.rank() - 1));
    let (grad_start, grad_step) = (row_start(grad, row), grad.stride(grad.rank() - 1));
    let unit = UNIT_POS as usize;
    let mut squares_shared = Shared::<[f32]>::new_slice(units);
    let mut dot_shared = Shared::<[f32]>::new_slice(units);
    let mut squares = 0.0f32;
    let mut dot = 0.0f32;
    for j in range_stepped(unit, n, units) {
        let value = f32::cast_from(x[start + j * step]);
        let scale = f32::cast_from(gamma[j * gamma.stride(0)]);
        squares += value * value;
        dot += f32::cast_from(grad[grad_start + j * grad_step]) * scale * value;
    }
    squares_shared[unit] = squares;
    dot_shared[unit] = dot;
    sync_cube();
    reduce_in_order(&mut squares_shared, units, false);
    reduce_in_order(&mut dot_shared, units, false);
    let inverse_rms = 1.0f32 / f32::sqrt(squares_shared[0] / f32::cast_from(n) + epsilon);
    let mean = inverse_rms * dot_shared[0] / f32::cast_from(n);
    for j in range_stepped(unit, n, units) {
        let normed = f32::cast_from(x[start + j * step]) * inverse_rms;
        let g = f32::cast_from(grad[grad_start + j * grad_step]);
        let scale = f32::cast_from(gamma[j * gamma.stride(0)]);
        grad_x[row * n + j] = F::cast_from(inverse_rms * (g * scale - normed * mean));
        scaled[row * n + j] = F::cast_from(g * normed);
    }
}
