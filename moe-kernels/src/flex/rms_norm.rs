//! flex's RMSNorm: the forward pass is one pass over each row for its mean square and one to
//! write it; the backward pass recomputes `r` and one dot product per row, writes `grad_x`, and
//! adds `g ⊙ x̂` into a partial `grad_γ` per task, the partials summed in task order (so the
//! result does not depend on the thread count). Rows are split over the cores. `f32` and `f64`;
//! half precisions and mixed dtypes use the composed ops.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use crate::rms_norm::{composed_rms_norm, composed_rms_norm_backward, RmsNormBackend};

use super::{contiguous, rows_per_task, written_rows, Float};

/// Elements per rayon task (whole rows, at least one).
const CHUNK: usize = 1 << 15;

/// Lanes of the row reductions.
const LANES: usize = 16;

impl RmsNormBackend for Flex {
    fn rms_norm(x: FlexTensor, gamma: FlexTensor, epsilon: f64) -> FlexTensor {
        if gamma.dtype() != x.dtype() {
            return composed_rms_norm::<Flex>(x, gamma, epsilon);
        }
        match x.dtype() {
            DType::F32 => forward::<f32>(x, gamma, epsilon as f32),
            DType::F64 => forward::<f64>(x, gamma, epsilon),
            _ => composed_rms_norm::<Flex>(x, gamma, epsilon),
        }
    }

    fn rms_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor) {
        if gamma.dtype() != x.dtype() || grad.dtype() != x.dtype() || grad.shape() != x.shape() {
            return composed_rms_norm_backward::<Flex>(x, gamma, grad, epsilon);
        }
        match x.dtype() {
            DType::F32 => backward::<f32>(x, gamma, grad, epsilon as f32),
            DType::F64 => backward::<f64>(x, gamma, grad, epsilon),
            _ => composed_rms_norm_backward::<Flex>(x, gamma, grad, epsilon),
        }
    }
}

/// The float operations the row loops need beyond [`Float`].
trait RowFloat: Float + std::ops::Div<Output = Self> + Copy {
    /// `√self`.
    fn sqrt(self) -> Self;
    /// `n` as this type.
    fn from_usize(n: usize) -> Self;
}
impl RowFloat for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn from_usize(n: usize) -> Self {
        n as f32
    }
}
impl RowFloat for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn from_usize(n: usize) -> Self {
        n as f64
    }
}

/// `Σ a ⊙ b` of two rows, in `LANES` partial sums.
#[inline(always)]
fn dot<E: RowFloat>(a: &[E], b: &[E]) -> E {
    let mut lanes = [E::ZERO; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    let mut b_chunks = b.chunks_exact(LANES);
    for (a, b) in (&mut a_chunks).zip(&mut b_chunks) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *lane = *lane + a * b;
        }
    }
    let mut total = E::ZERO;
    for (&a, &b) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        total = total + a * b;
    }
    lanes.iter().fold(total, |sum, &lane| sum + lane)
}

/// `1 / √(mean(x²) + ε)` of one row.
#[inline(always)]
fn inverse_rms<E: RowFloat>(x: &[E], epsilon: E) -> E {
    let mean_square = dot(x, x) / E::from_usize(x.len());
    E::from_usize(1) / (mean_square + epsilon).sqrt()
}

/// The rows' length and how many rows a task takes.
fn row_blocks(shape: &burn::tensor::Shape) -> (usize, usize) {
    let n = shape[shape.num_dims() - 1];
    (n, rows_per_task(n, CHUNK))
}

fn forward<E: RowFloat>(x: FlexTensor, gamma: FlexTensor, epsilon: E) -> FlexTensor {
    let shape = x.shape();
    let (n, block) = row_blocks(&shape);
    let (x, gamma) = (contiguous::<E>(x), contiguous::<E>(gamma));
    let input = x.as_slice::<E>().expect("contiguous after `contiguous`");
    let gamma = gamma
        .as_slice::<E>()
        .expect("contiguous after `contiguous`");
    let rows = input.len().checked_div(n).unwrap_or(0);
    let output = written_rows::<E>(rows, n, block, |first, out| {
        for (offset, out) in out.chunks_exact_mut(n).enumerate() {
            let x = &input[(first + offset) * n..(first + offset + 1) * n];
            let r = inverse_rms(x, epsilon);
            for ((out, &x), &gamma) in out.iter_mut().zip(x).zip(gamma) {
                out.write(gamma * (x * r));
            }
        }
    });
    FlexTensor::from_data(TensorData::new(output, shape))
}

fn backward<E: RowFloat>(
    x: FlexTensor,
    gamma: FlexTensor,
    grad: FlexTensor,
    epsilon: E,
) -> (FlexTensor, FlexTensor) {
    let shape = x.shape();
    let (n, block) = row_blocks(&shape);
    let (x, gamma, grad) = (
        contiguous::<E>(x),
        contiguous::<E>(gamma),
        contiguous::<E>(grad),
    );
    let input = x.as_slice::<E>().expect("contiguous after `contiguous`");
    let gamma = gamma
        .as_slice::<E>()
        .expect("contiguous after `contiguous`");
    let grad = grad.as_slice::<E>().expect("contiguous after `contiguous`");
    let rows = input.len().checked_div(n).unwrap_or(0);
    let tasks = rows.div_ceil(block);
    let mut partials = vec![E::ZERO; tasks * n];
    let mut grad_x = vec![E::ZERO; rows * n];
    if rows > 0 {
        grad_x
            .par_chunks_mut(block * n)
            .zip(partials.par_chunks_mut(n))
            .enumerate()
            .for_each(|(task, (out, partial))| {
                let first = task * block;
                let mut scaled = vec![E::ZERO; n];
                for (offset, out) in out.chunks_exact_mut(n).enumerate() {
                    let range = (first + offset) * n..(first + offset + 1) * n;
                    let (x, g) = (&input[range.clone()], &grad[range]);
                    let r = inverse_rms(x, epsilon);
                    for ((scaled, &g), &gamma) in scaled.iter_mut().zip(g).zip(gamma) {
                        *scaled = g * gamma;
                    }
                    // mean(g ⊙ γ ⊙ x̂) = r mean(g ⊙ γ ⊙ x)
                    let mean = r * dot(&scaled, x) / E::from_usize(n);
                    let rows = out
                        .iter_mut()
                        .zip(x)
                        .zip(&scaled)
                        .zip(g)
                        .zip(partial.iter_mut());
                    for ((((out, &x), &scaled), &g), partial) in rows {
                        let normed = x * r;
                        *out = r * (scaled - normed * mean);
                        *partial = *partial + g * normed;
                    }
                }
            });
    }
    let mut grad_gamma = vec![E::ZERO; n];
    for partial in partials.chunks_exact(n.max(1)) {
        for (total, &value) in grad_gamma.iter_mut().zip(partial) {
            *total = *total + value;
        }
    }
    (
        FlexTensor::from_data(TensorData::new(grad_x, shape)),
        FlexTensor::from_data(TensorData::new(grad_gamma, [n])),
    )
}
