//! flex's softmax and log-softmax along the last dimension: each row in one pass for its
//! maximum, one for the exponentials and their sum, one to write (all in cache for rows up to
//! thousands of elements); the backward passes are one reduction and one pass for the result. Rows are
//! split over the cores with rayon; `f32` is vectorised with [`crate::math::exp_nonpositive`],
//! `f64` uses libm's `exp`, half precisions the composed ops.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use crate::math;
use crate::softmax::{
    composed_causal_softmax, composed_log_softmax, composed_log_softmax_backward, composed_softmax,
    composed_softmax_backward, SoftmaxBackend,
};

use super::{contiguous, rows_per_task, written_rows, Float};

/// Elements per rayon task (whole rows, at least one).
const CHUNK: usize = 1 << 15;

/// Lanes of the vectorised reductions (one AVX-512 register of f32).
const LANES: usize = 16;

impl SoftmaxBackend for Flex {
    fn softmax_last(x: FlexTensor) -> FlexTensor {
        match x.dtype() {
            DType::F32 => rows(x, None, softmax_rows_f32),
            DType::F64 => rows(x, None, softmax_rows_f64),
            _ => composed_softmax::<Flex>(x),
        }
    }

    fn softmax_last_backward(y: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if y.dtype() != grad.dtype() || y.shape() != grad.shape() {
            return composed_softmax_backward::<Flex>(y, grad);
        }
        match y.dtype() {
            DType::F32 => rows(y, Some(grad), softmax_backward_rows_f32),
            DType::F64 => rows(y, Some(grad), softmax_backward_rows_f64),
            _ => composed_softmax_backward::<Flex>(y, grad),
        }
    }

    fn causal_softmax_last(x: FlexTensor, offset: usize) -> FlexTensor {
        match x.dtype() {
            DType::F32 => causal_rows(x, offset, softmax_rows_f32),
            DType::F64 => causal_rows(x, offset, softmax_rows_f64),
            _ => composed_causal_softmax::<Flex>(x, offset),
        }
    }

    fn log_softmax_last(x: FlexTensor) -> FlexTensor {
        match x.dtype() {
            DType::F32 => rows(x, None, log_softmax_rows_f32),
            DType::F64 => rows(x, None, log_softmax_rows_f64),
            _ => composed_log_softmax::<Flex>(x),
        }
    }

    fn log_softmax_last_backward(z: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if z.dtype() != grad.dtype() || z.shape() != grad.shape() {
            return composed_log_softmax_backward::<Flex>(z, grad);
        }
        match z.dtype() {
            DType::F32 => rows(z, Some(grad), log_softmax_backward_rows_f32),
            DType::F64 => rows(z, Some(grad), log_softmax_backward_rows_f64),
            _ => composed_log_softmax_backward::<Flex>(z, grad),
        }
    }
}

/// A row kernel: `(input rows, second input rows or empty, output rows, row length)`.
type RowKernel<E> = fn(&[E], &[E], &mut [E], usize);

/// A new tensor of `first`'s shape from `kernel` applied to whole rows of the last dimension,
/// in parallel blocks of rows.
fn rows<E: Float>(
    first: FlexTensor,
    second: Option<FlexTensor>,
    kernel: RowKernel<E>,
) -> FlexTensor {
    let shape = first.shape();
    let row = shape[shape.num_dims() - 1];
    let first = contiguous::<E>(first);
    let second = second.map(contiguous::<E>);
    let input = first
        .as_slice::<E>()
        .expect("contiguous after `contiguous`");
    let other: &[E] = match &second {
        Some(second) => second
            .as_slice::<E>()
            .expect("contiguous after `contiguous`"),
        None => &[],
    };
    let mut output = vec![E::default(); input.len()];
    if row == 0 {
        return FlexTensor::from_data(TensorData::new(output, shape));
    }
    let block = row * rows_per_task(row, CHUNK);
    output
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(index, out)| {
            let start = index * block;
            let end = start + out.len();
            let other = if other.is_empty() {
                other
            } else {
                &other[start..end]
            };
            kernel(&input[start..end], other, out, row);
        });
    FlexTensor::from_data(TensorData::new(output, shape))
}

/// `kernel` applied to the visible prefix of each row of `x: [.., queries, keys]` (keys
/// `0..=query + offset`), zeros after it, rows split over the cores.
fn causal_rows<E: Float>(x: FlexTensor, offset: usize, kernel: RowKernel<E>) -> FlexTensor {
    let shape = x.shape();
    let rank = shape.num_dims();
    let (queries, keys) = (shape[rank - 2], shape[rank - 1]);
    let x = contiguous::<E>(x);
    let input = x.as_slice::<E>().expect("contiguous after `contiguous`");
    let rows = input.len().checked_div(keys).unwrap_or(0);
    let block = rows_per_task(keys, CHUNK);
    let output = written_rows::<E>(rows, keys, block, |first, out| {
        for (within, out) in out.chunks_exact_mut(keys).enumerate() {
            let row = first + within;
            let visible = (row % queries + offset + 1).min(keys);
            out.fill(MaybeUninit::new(E::ZERO));
            // SAFETY: every element was just initialised, and `MaybeUninit<E>` has `E`'s layout.
            let out = unsafe { &mut *(out as *mut [MaybeUninit<E>] as *mut [E]) };
            let x = &input[row * keys..row * keys + visible];
            kernel(x, &[], &mut out[..visible], visible);
        }
    });
    FlexTensor::from_data(TensorData::new(output, shape))
}

/// `max` of a row, ignoring NaN (a NaN still reaches the output through `x - max`).
#[inline(always)]
pub(super) fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = if value > *lane { value } else { *lane };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &value in lanes.iter().chain(chunks.remainder()) {
        max = if value > max { value } else { max };
    }
    max
}

/// `Σ a ⊙ b` of two rows, in `LANES` partial sums.
#[inline(always)]
fn row_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    let mut b_chunks = b.chunks_exact(LANES);
    for (a, b) in (&mut a_chunks).zip(&mut b_chunks) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(a, b)| a * b)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

vectorised! {
    /// Softmax of each `row`-long row of `x` into `out`.
    fn softmax_rows_f32(x: &[f32], _unused: &[f32], out: &mut [f32], row: usize) {
        for (x, out) in x.chunks_exact(row).zip(out.chunks_exact_mut(row)) {
            let max = row_max(x);
            let mut lanes = [0.0f32; LANES];
            for (x, out) in x.chunks(LANES).zip(out.chunks_mut(LANES)) {
                for ((lane, out), &x) in lanes.iter_mut().zip(out).zip(x) {
                    let exp = exp_shifted(x, max);
                    *out = exp;
                    *lane += exp;
                }
            }
            let scale = 1.0 / lanes.iter().sum::<f32>();
            for out in out.iter_mut() {
                *out *= scale;
            }
        }
    }
}

vectorised! {
    /// `out = y ⊙ (grad - Σ grad ⊙ y)` on each `row`-long row.
    fn softmax_backward_rows_f32(y: &[f32], grad: &[f32], out: &mut [f32], row: usize) {
        let rows = y.chunks_exact(row).zip(grad.chunks_exact(row)).zip(out.chunks_exact_mut(row));
        for ((y, grad), out) in rows {
            let dot = row_dot(grad, y);
            for ((out, &y), &grad) in out.iter_mut().zip(y).zip(grad) {
                *out = y * (grad - dot);
            }
        }
    }
}

/// `e^{x - max}`, keeping a NaN (which [`math::exp_nonpositive`] would map to 0).
#[inline(always)]
pub(super) fn exp_shifted(x: f32, max: f32) -> f32 {
    let shifted = x - max;
    if shifted.is_nan() {
        shifted
    } else {
        math::exp_nonpositive(shifted)
    }
}

/// `Σ e^{x - max}` of a row, in `LANES` partial sums.
#[inline(always)]
pub(super) fn row_exp_sum(x: &[f32], max: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += exp_shifted(x, max);
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| exp_shifted(x, max))
        .sum();
    lanes.iter().sum::<f32>() + tail
}

vectorised! {
    /// Log-softmax of each `row`-long row of `x` into `out`.
    fn log_softmax_rows_f32(x: &[f32], _unused: &[f32], out: &mut [f32], row: usize) {
        for (x, out) in x.chunks_exact(row).zip(out.chunks_exact_mut(row)) {
            let max = row_max(x);
            let offset = max + row_exp_sum(x, max).ln();
            for (out, &x) in out.iter_mut().zip(x) {
                *out = x - offset;
            }
        }
    }
}

vectorised! {
    /// `out = grad - e^z Σ grad` on each `row`-long row.
    fn log_softmax_backward_rows_f32(z: &[f32], grad: &[f32], out: &mut [f32], row: usize) {
        let rows = z.chunks_exact(row).zip(grad.chunks_exact(row)).zip(out.chunks_exact_mut(row));
        for ((z, grad), out) in rows {
            let total = row_sum(grad);
            for ((out, &z), &grad) in out.iter_mut().zip(z).zip(grad) {
                *out = grad - exp_shifted(z, 0.0) * total;
            }
        }
    }
}

/// `Σ x` of a row, in `LANES` partial sums.
#[inline(always)]
fn row_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Log-softmax of each `row`-long row of `x` into `out`, with libm's `exp` and `log`.
fn log_softmax_rows_f64(x: &[f64], _unused: &[f64], out: &mut [f64], row: usize) {
    for (x, out) in x.chunks_exact(row).zip(out.chunks_exact_mut(row)) {
        let max = x
            .iter()
            .fold(f64::NEG_INFINITY, |max, &x| if x > max { x } else { max });
        let sum: f64 = x.iter().map(|&x| libm::exp(x - max)).sum();
        let offset = max + libm::log(sum);
        for (out, &x) in out.iter_mut().zip(x) {
            *out = x - offset;
        }
    }
}

/// `out = grad - e^z Σ grad` on each `row`-long row, in f64.
fn log_softmax_backward_rows_f64(z: &[f64], grad: &[f64], out: &mut [f64], row: usize) {
    let rows = z
        .chunks_exact(row)
        .zip(grad.chunks_exact(row))
        .zip(out.chunks_exact_mut(row));
    for ((z, grad), out) in rows {
        let total: f64 = grad.iter().sum();
        for ((out, &z), &grad) in out.iter_mut().zip(z).zip(grad) {
            *out = grad - libm::exp(z) * total;
        }
    }
}

/// Softmax of each `row`-long row of `x` into `out`, with libm's `exp`.
fn softmax_rows_f64(x: &[f64], _unused: &[f64], out: &mut [f64], row: usize) {
    for (x, out) in x.chunks_exact(row).zip(out.chunks_exact_mut(row)) {
        let max = x
            .iter()
            .fold(f64::NEG_INFINITY, |max, &x| if x > max { x } else { max });
        let mut sum = 0.0;
        for (out, &x) in out.iter_mut().zip(x) {
            *out = libm::exp(x - max);
            sum += *out;
        }
        for out in out.iter_mut() {
            *out /= sum;
        }
    }
}

/// `out = y ⊙ (grad - Σ grad ⊙ y)` on each `row`-long row, in f64.
fn softmax_backward_rows_f64(y: &[f64], grad: &[f64], out: &mut [f64], row: usize) {
    let rows = y
        .chunks_exact(row)
        .zip(grad.chunks_exact(row))
        .zip(out.chunks_exact_mut(row));
    for ((y, grad), out) in rows {
        let dot: f64 = y.iter().zip(grad).map(|(y, grad)| y * grad).sum();
        for ((out, &y), &grad) in out.iter_mut().zip(y).zip(grad) {
            *out = y * (grad - dot);
        }
    }
}
