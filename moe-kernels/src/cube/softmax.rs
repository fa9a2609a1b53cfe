//! Softmax, causal softmax and log-softmax along the last dimension on cube: one cube per row
//! each way. Composed from Burn's ops a softmax is a maximum, a subtract, an exp, a sum and a
//! divide (fusion joins some of them), its gradient a multiply, a sum and two element-wise
//! ops, and the causal one adds a `[queries, keys]` mask made on the host.
//!
//! Work per launch, for `R` rows of `n` and `u` units per cube ([`RowLaunch`]: `n` rounded up
//! to a power of two, at most 256):
//!
//! | kernel | units | most work of one unit |
//! |---|---|---|
//! | `softmax_forward_kernel` | `R` cubes of `u` | `3 ceil(n / u)` reads, `ceil(n / u)` writes; unit 0 also combines `2u` partial results |
//! | `softmax_backward_kernel` | `R` cubes of `u` | `4 ceil(n / u)` reads, `ceil(n / u)` writes; unit 0 also adds `u` sums |
//!
//! The causal mask is not read but computed: key `j` of row `r` is visible when
//! `j <= r mod queries + offset`, and a masked key's output is exactly 0.

use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use cubecl::prelude::*;

use super::rows::{reduce_in_order, row_exp_sum, row_maximum, row_start, RowLaunch};
use super::{computes_in_f32, cube_row, empty_like_shape};
use crate::softmax::{
    composed_causal_softmax, composed_log_softmax, composed_log_softmax_backward, composed_softmax,
    composed_softmax_backward, SoftmaxBackend,
};

/// Which of the forward passes a launch computes.
#[derive(Clone, Copy)]
enum Forward {
    Softmax,
    /// Softmax with key `j` of query `i` masked out when `j > i + offset`.
    Causal {
        offset: usize,
    },
    LogSoftmax,
}

/// Burn's composed ops where the kernels' f32 arithmetic does not serve the dtype (f64).
impl SoftmaxBackend for CubeBackend {
    fn softmax_last(x: CubeTensor) -> CubeTensor {
        match computes_in_f32(x.dtype) {
            true => forward(x, Forward::Softmax),
            false => composed_softmax::<Self>(x),
        }
    }

    fn softmax_last_backward(y: CubeTensor, grad: CubeTensor) -> CubeTensor {
        match computes_in_f32(y.dtype) && grad.dtype == y.dtype {
            true => backward(y, grad, false),
            false => composed_softmax_backward::<Self>(y, grad),
        }
    }

    fn causal_softmax_last(x: CubeTensor, offset: usize) -> CubeTensor {
        match computes_in_f32(x.dtype) {
            true => forward(x, Forward::Causal { offset }),
            false => composed_causal_softmax::<Self>(x, offset),
        }
    }

    fn log_softmax_last(x: CubeTensor) -> CubeTensor {
        match computes_in_f32(x.dtype) {
            true => forward(x, Forward::LogSoftmax),
            false => composed_log_softmax::<Self>(x),
        }
    }

    fn log_softmax_last_backward(z: CubeTensor, grad: CubeTensor) -> CubeTensor {
        match computes_in_f32(z.dtype) && grad.dtype == z.dtype {
            true => backward(z, grad, true),
            false => composed_log_softmax_backward::<Self>(z, grad),
        }
    }
}

/// One launch of [`softmax_forward_kernel`] over the rows of `x`'s last dimension.
fn forward(x: CubeTensor, pass: Forward) -> CubeTensor {
    let output = empty_like_shape(&x, x.shape());
    let Some(launch) = RowLaunch::over(&x) else {
        return output;
    };
    // The causal mask's queries: the next-to-last dimension.
    let shape = x.shape();
    let queries = shape[shape.num_dims().max(2) - 2];
    let (causal, offset) = match pass {
        Forward::Causal { offset } => (true, offset),
        _ => (false, 0),
    };
    softmax_forward_kernel::launch(
        &launch.client,
        launch.cube_count(),
        launch.cube_dim(),
        x.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        launch.rows,
        launch.n,
        queries,
        offset,
        launch.units,
        causal,
        matches!(pass, Forward::LogSoftmax),
        launch.dtype,
    );
    output
}

/// One launch of [`softmax_backward_kernel`]: the gradient from the output `y` (or `z`, for
/// the log-softmax) and the output's gradient.
fn backward(output: CubeTensor, grad: CubeTensor, log: bool) -> CubeTensor {
    let grad_x = empty_like_shape(&output, output.shape());
    let Some(launch) = RowLaunch::over(&output) else {
        return grad_x;
    };
    softmax_backward_kernel::launch(
        &launch.client,
        launch.cube_count(),
        launch.cube_dim(),
        output.into_tensor_arg(),
        grad.into_tensor_arg(),
        grad_x.clone().into_tensor_arg(),
        launch.rows,
        launch.n,
        launch.units,
        log,
        launch.dtype,
    );
    grad_x
}

/// One cube per row `r` (`CUBE_POS_Y * 65,535 + CUBE_POS_X`) of `x` (read through its
/// strides, written contiguous), over its
/// visible keys `j < v` (`v = n`, or `min(n, r mod queries + offset + 1)` when `causal`):
/// `m = max_j x[j]`, `s = Σ_j e^{x[j] - m}`, then `y[j] = e^{x[j] - m} / s`, or
/// `x[j] - m - ln s` for the log-softmax; a masked key's output is 0. In f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn softmax_forward_kernel<F: Float>(
    x: &Tensor<F>,
    output: &mut Tensor<F>,
    rows: usize,
    n: usize,
    queries: usize,
    offset: usize,
    #[comptime] units: usize,
    #[comptime] causal: bool,
    #[comptime] log: bool,
    #[define(F)] _dtype: ElemType,
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let (start, step) = (row_start(x, row), x.stride(x.rank() - 1));
    let unit = UNIT_POS as usize;
    let mut visible = n;
    if causal {
        visible = usize::min(n, row % queries + offset + 1);
    }
    let mut shared = Shared::<[f32]>::new_slice(units);

    let maximum = row_maximum(x, start, step, visible, &mut shared, units);
    let total = row_exp_sum(x, start, step, visible, maximum, &mut shared, units);

    for j in range_stepped(unit, n, units) {
        let shifted = f32::cast_from(x[start + j * step]) - maximum;
        let mut value = 0.0f32;
        if log {
            value = shifted - f32::ln(total);
        } else if j < visible {
            value = f32::exp(shifted) / total;
        }
        output[row * n + j] = F::cast_from(value);
    }
}

/// One cube per row `r` of the output `y` and gradient `g` (read through their strides): for
/// the softmax
/// `grad[j] = y[j] (g[j] - Σ_k g[k] y[k])`; for the log-softmax (`y` is `z`)
/// `grad[j] = g[j] - e^{z[j]} Σ_k g[k]`. In f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn softmax_backward_kernel<F: Float>(
    y: &Tensor<F>,
    grad: &Tensor<F>,
    grad_x: &mut Tensor<F>,
    rows: usize,
    n: usize,
    #[comptime] units: usize,
    #[comptime] log: bool,
    #[define(F)] _dtype: ElemType,
) {
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let (y_start, y_step) = (row_start(y, row), y.stride(y.rank() - 1));
    let (grad_start, grad_step) = (row_start(grad, row), grad.stride(grad.rank() - 1));
    let unit = UNIT_POS as usize;
    let mut shared = Shared::<[f32]>::new_slice(units);
    let mut sum = 0.0f32;
    for j in range_stepped(unit, n, units) {
        let g = f32::cast_from(grad[grad_start + j * grad_step]);
        if log {
            sum += g;
        } else {
            sum += g * f32::cast_from(y[y_start + j * y_step]);
        }
    }
    shared[unit] = sum;
    sync_cube();
    reduce_in_order(&mut shared, units, false);
    let total = shared[0];
    for j in range_stepped(unit, n, units) {
        let g = f32::cast_from(grad[grad_start + j * grad_step]);
        let out = f32::cast_from(y[y_start + j * y_step]);
        let mut value = out * (g - total);
        if log {
            value = g - f32::exp(out) * total;
        }
        grad_x[row * n + j] = F::cast_from(value);
    }
}
