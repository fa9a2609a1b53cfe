//! AdamW's update on cube: one launch per parameter, one unit per element, reading `θ, g, m, v`
//! and writing the new `θ, m, v` (Burn's composed update is about a dozen element-wise passes,
//! which fusion joins into a few launches, each reading what the last wrote).
//!
//! Work: `numel` units, each one element (no loop).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeDim};

use super::empty_like_shape;
use crate::adamw::{composed_adamw_update, AdamWBackend, AdamWStep};

impl AdamWBackend for CubeBackend {
    fn adamw_update(
        param: CubeTensor,
        grad: CubeTensor,
        moment_1: CubeTensor,
        moment_2: CubeTensor,
        step: AdamWStep,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let same_dtype = [&grad, &moment_1, &moment_2]
            .iter()
            .all(|tensor| tensor.dtype == param.dtype);
        if !same_dtype {
            return composed_adamw_update::<CubeBackend>(param, grad, moment_1, moment_2, step);
        }
        let [param, grad, moment_1, moment_2] =
            [param, grad, moment_1, moment_2].map(into_contiguous);
        let shape = param.shape();
        let new_param = empty_like_shape(&param, shape.clone());
        let new_moment_1 = empty_like_shape(&param, shape.clone());
        let new_moment_2 = empty_like_shape(&param, shape.clone());
        let units = shape.num_elements();
        if units == 0 {
            return (new_param, new_moment_1, new_moment_2);
        }
        let s = step.scalars();
        let client = param.client.clone();
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        let dtype = dtype_to_storage_type(param.dtype);
        adamw_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            param.into_tensor_arg(),
            grad.into_tensor_arg(),
            moment_1.into_tensor_arg(),
            moment_2.into_tensor_arg(),
            new_param.clone().into_tensor_arg(),
            new_moment_1.clone().into_tensor_arg(),
            new_moment_2.clone().into_tensor_arg(),
            s.beta_1,
            s.one_minus_beta_1,
            s.beta_2,
            s.one_minus_beta_2,
            s.correction_1,
            s.correction_2,
            s.epsilon,
            s.keep,
            s.lr,
            units,
            dtype,
        );
        (new_param, new_moment_1, new_moment_2)
    }
}

/// One unit per element, in burn-optim's order (see [`crate::adamw`]):
/// `m = β₁ m + (1 - β₁) g`, `v = β₂ v + (1 - β₂) g²`,
/// `θ = θ (1 - lr λ) - lr (m / c₁) / (√(v / c₂) + ε)`, in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float>(
    param: &Tensor<F>,
    grad: &Tensor<F>,
    moment_1: &Tensor<F>,
    moment_2: &Tensor<F>,
    new_param: &mut Tensor<F>,
    new_moment_1: &mut Tensor<F>,
    new_moment_2: &mut Tensor<F>,
    beta_1: f32,
    one_minus_beta_1: f32,
    beta_2: f32,
    one_minus_beta_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    keep: f32,
    lr: f32,
    units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= units {
        terminate!();
    }
    let g = f32::cast_from(grad[i]);
    let m = beta_1 * f32::cast_from(moment_1[i]) + one_minus_beta_1 * g;
    let v = beta_2 * f32::cast_from(moment_2[i]) + one_minus_beta_2 * (g * g);
    let corrected_1 = m / correction_1;
    let corrected_2 = v / correction_2;
    let delta = corrected_1 / (f32::sqrt(corrected_2) + epsilon);
    let theta = f32::cast_from(param[i]) * keep - delta * lr;
    new_param[i] = F::cast_from(theta);
    new_moment_1[i] = F::cast_from(m);
    new_moment_2[i] = F::cast_from(v);
}
