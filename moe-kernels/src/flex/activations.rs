//! flex's element-wise kernels (GELU, SiLU): one pass over memory for each forward and each
//! backward, split over the cores with rayon and vectorised with the widest instructions the
//! CPU has.
//!
//! `f32` uses the branch-free approximations of [`crate::math`]; `f64` evaluates libm's `erf`
//! and `exp` (exact to the last bits, for gradient checks); half precisions fall back to the
//! composed ops.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use crate::activation::{
    composed_gelu, composed_gelu_backward, composed_silu, composed_silu_backward, ActivationBackend,
};
use crate::math;

use super::{contiguous, Float};

/// Elements per rayon task: large enough to amortise the task, small enough to balance cores.
const CHUNK: usize = 1 << 15;

impl ActivationBackend for Flex {
    fn gelu_exact(x: FlexTensor) -> FlexTensor {
        forward(x, (gelu_f32, gelu_f64), composed_gelu::<Flex>)
    }

    fn gelu_exact_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let kernels: Kernels = (gelu_backward_f32, gelu_backward_f64);
        backward(x, grad, kernels, composed_gelu_backward::<Flex>)
    }

    fn silu_forward(x: FlexTensor) -> FlexTensor {
        forward(x, (silu_f32, silu_f64), composed_silu::<Flex>)
    }

    fn silu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let kernels: Kernels = (silu_backward_f32, silu_backward_f64);
        backward(x, grad, kernels, composed_silu_backward::<Flex>)
    }
}

/// An element-wise kernel over `f32` and its `f64` twin.
type Kernels = (fn(&[f32], &mut [f32]), fn(&[f64], &mut [f64]));

/// A forward pass: the kernel for the tensor's precision, or `composed` for half precisions.
fn forward(
    x: FlexTensor,
    (f32_kernel, f64_kernel): Kernels,
    composed: fn(FlexTensor) -> FlexTensor,
) -> FlexTensor {
    match x.dtype() {
        DType::F32 => map(x, f32_kernel),
        DType::F64 => map(x, f64_kernel),
        _ => composed(x),
    }
}

/// A backward pass: the kernel for the tensor's precision, or `composed` for half precisions
/// (and for a gradient whose dtype or shape is not `x`'s).
fn backward(
    x: FlexTensor,
    grad: FlexTensor,
    (f32_kernel, f64_kernel): Kernels,
    composed: fn(FlexTensor, FlexTensor) -> FlexTensor,
) -> FlexTensor {
    if x.dtype() != grad.dtype() || x.shape() != grad.shape() {
        return composed(x, grad);
    }
    match x.dtype() {
        DType::F32 => scale_by_slope(x, grad, f32_kernel),
        DType::F64 => scale_by_slope(x, grad, f64_kernel),
        _ => composed(x, grad),
    }
}

vectorised! {
    /// `out[i] = gelu(x[i])`.
    fn gelu_f32(x: &[f32], out: &mut [f32]) {
        for (out, &x) in out.iter_mut().zip(x) {
            *out = math::gelu(x);
        }
    }
}

vectorised! {
    /// `grad[i] *= gelu'(x[i])`.
    fn gelu_backward_f32(x: &[f32], grad: &mut [f32]) {
        for (grad, &x) in grad.iter_mut().zip(x) {
            *grad *= math::gelu_slope(x);
        }
    }
}

vectorised! {
    /// `out[i] = silu(x[i])`.
    fn silu_f32(x: &[f32], out: &mut [f32]) {
        for (out, &x) in out.iter_mut().zip(x) {
            *out = math::silu(x);
        }
    }
}

vectorised! {
    /// `grad[i] *= silu'(x[i])`.
    fn silu_backward_f32(x: &[f32], grad: &mut [f32]) {
        for (grad, &x) in grad.iter_mut().zip(x) {
            *grad *= math::silu_slope(x);
        }
    }
}

/// `out[i] = silu(x[i])` with libm's `exp`.
fn silu_f64(x: &[f64], out: &mut [f64]) {
    for (out, &x) in out.iter_mut().zip(x) {
        *out = x / (1.0 + libm::exp(-x));
    }
}

/// `grad[i] *= silu'(x[i])` with libm's `exp`.
fn silu_backward_f64(x: &[f64], grad: &mut [f64]) {
    for (grad, &x) in grad.iter_mut().zip(x) {
        let sigmoid = 1.0 / (1.0 + libm::exp(-x));
        *grad *= sigmoid * (1.0 + x * (1.0 - sigmoid));
    }
}

/// `out[i] = gelu(x[i])` with libm's `erf`.
fn gelu_f64(x: &[f64], out: &mut [f64]) {
    for (out, &x) in out.iter_mut().zip(x) {
        *out = x * normal_cdf_f64(x);
    }
}

/// `grad[i] *= gelu'(x[i])` with libm's `erf` and `exp`.
fn gelu_backward_f64(x: &[f64], grad: &mut [f64]) {
    let frac_1_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    for (grad, &x) in grad.iter_mut().zip(x) {
        let density = frac_1_sqrt_2pi * libm::exp(-0.5 * x * x);
        *grad *= normal_cdf_f64(x) + x * density;
    }
}

/// `Φ(x) = (1 + erf(x / √2)) / 2`.
fn normal_cdf_f64(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// A new tensor `kernel(x)`, element-wise; the chunks run in parallel.
fn map<E: Float>(x: FlexTensor, kernel: fn(&[E], &mut [E])) -> FlexTensor {
    let x = contiguous::<E>(x);
    let input = x.as_slice::<E>().expect("contiguous after `contiguous`");
    let mut output = vec![E::default(); input.len()];
    output
        .par_chunks_mut(CHUNK)
        .zip(input.par_chunks(CHUNK))
        .for_each(|(output, input)| kernel(input, output));
    FlexTensor::from_data(TensorData::new(output, x.shape()))
}

/// `grad` scaled element-wise by `kernel`, in `grad`'s own buffer when nothing else holds it
/// (the usual case in a backward pass), otherwise in a copy.
fn scale_by_slope<E: Float>(
    x: FlexTensor,
    grad: FlexTensor,
    kernel: fn(&[E], &mut [E]),
) -> FlexTensor {
    let x = contiguous::<E>(x);
    let input = x.as_slice::<E>().expect("contiguous after `contiguous`");
    // `storage_mut` copies the buffer only if something else still holds it.
    let mut grad = match grad.layout().contiguous_offsets() {
        Some((0, end)) if end == input.len() => grad,
        _ => {
            let copy = grad.to_contiguous();
            drop(grad);
            copy
        }
    };
    let output = &mut grad.storage_mut::<E>()[..input.len()];
    output
        .par_chunks_mut(CHUNK)
        .zip(input.par_chunks(CHUNK))
        .for_each(|(output, input)| kernel(input, output));
    grad
}
