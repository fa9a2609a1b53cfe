//! flex's cross-entropy: forward, one pass per row for its maximum and one for the sum of the
//! exponentials (the row stays in cache), writing two numbers per row; backward, one pass
//! per row writing the gradient once. Rows are split over the cores with rayon; `f32` is
//! vectorised with [`crate::math::exp_nonpositive`], `f64` uses libm, half precisions the
//! composed ops.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use crate::cross_entropy::{
    composed_cross_entropy_backward, composed_cross_entropy_forward, CrossEntropyBackend,
};

use super::softmax::{exp_shifted, row_exp_sum, row_max};
use super::{checked_indices, contiguous, matrix, rows_per_task, written_rows, Float};

/// Elements per rayon task (whole rows, at least one).
const CHUNK: usize = 1 << 15;

impl CrossEntropyBackend for Flex {
    fn cross_entropy_forward(logits: FlexTensor, targets: FlexTensor) -> (FlexTensor, FlexTensor) {
        match logits.dtype() {
            DType::F32 => forward::<f32>(logits, targets, lse_rows_f32),
            DType::F64 => forward::<f64>(logits, targets, lse_rows_f64),
            _ => composed_cross_entropy_forward::<Flex>(logits, targets),
        }
    }

    fn cross_entropy_backward(
        logits: FlexTensor,
        lse: FlexTensor,
        targets: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        let same = logits.dtype() == lse.dtype() && lse.dtype() == grad.dtype();
        match logits.dtype() {
            DType::F32 if same => backward::<f32>(logits, lse, targets, grad, probs_rows_f32),
            DType::F64 if same => backward::<f64>(logits, lse, targets, grad, probs_rows_f64),
            _ => composed_cross_entropy_backward::<Flex>(logits, lse, targets, grad),
        }
    }
}

/// `(x rows, lse out, row length)`: the log-normaliser of each row.
type LseKernel<E> = fn(&[E], &mut [E], usize);

/// `(x rows, lse, grad, out, row length)`: `out = grad · e^{x - lse}` row by row.
type ProbsKernel<E> = fn(&[E], &[E], &[E], &mut [MaybeUninit<E>], usize);

/// `(loss, lse)`: `lse` by `kernel` over blocks of rows in parallel, then
/// `loss[r] = lse[r] - x[r, targets[r]]`.
fn forward<E: Float>(
    logits: FlexTensor,
    targets: FlexTensor,
    kernel: LseKernel<E>,
) -> (FlexTensor, FlexTensor) {
    let logits = contiguous::<E>(logits);
    let (data, classes) = matrix::<E>(&logits);
    let rows = logits.shape()[0];
    let targets = checked_indices(targets, classes, "target class", "classes");
    let mut lse = vec![E::ZERO; rows];
    if classes > 0 {
        let block = rows_per_task(classes, CHUNK);
        lse.par_chunks_mut(block)
            .zip(data.par_chunks(block * classes))
            .for_each(|(lse, x)| kernel(x, lse, classes));
    }
    let loss: Vec<E> = lse
        .iter()
        .zip(&targets)
        .enumerate()
        .map(|(row, (&lse, &class))| lse - data[row * classes + class])
        .collect();
    (
        FlexTensor::from_data(TensorData::new(loss, [rows])),
        FlexTensor::from_data(TensorData::new(lse, [rows])),
    )
}

/// `grad[r] (e^{x[r, j] - lse[r]} - [j = targets[r]])`: the scaled probabilities by `kernel`
/// over blocks of rows in parallel (every element written once), then `grad[r]` taken off at
/// each row's target.
fn backward<E: Float>(
    logits: FlexTensor,
    lse: FlexTensor,
    targets: FlexTensor,
    grad: FlexTensor,
    kernel: ProbsKernel<E>,
) -> FlexTensor {
    let logits = contiguous::<E>(logits);
    let (lse, grad) = (contiguous::<E>(lse), contiguous::<E>(grad));
    let (data, classes) = matrix::<E>(&logits);
    let rows = logits.shape()[0];
    let targets = checked_indices(targets, classes, "target class", "classes");
    let lse: &[E] = lse.as_slice().expect("contiguous after `contiguous`");
    let grad: &[E] = grad.as_slice().expect("contiguous after `contiguous`");
    let block = rows_per_task(classes, CHUNK);
    let mut output = written_rows::<E>(rows, classes, block, |first, out| {
        let last = first + out.len() / classes.max(1);
        let x = &data[first * classes..last * classes];
        kernel(x, &lse[first..last], &grad[first..last], out, classes);
    });
    for (row, &class) in targets.iter().enumerate() {
        let at = row * classes + class;
        output[at] = output[at] - grad[row];
    }
    FlexTensor::from_data(TensorData::new(output, [rows, classes]))
}

vectorised! {
    /// `ln Σ_j e^{x_j}` of each `row`-long row of `x` into `lse`.
    fn lse_rows_f32(x: &[f32], lse: &mut [f32], row: usize) {
        for (x, lse) in x.chunks_exact(row).zip(lse.iter_mut()) {
            let max = row_max(x);
            *lse = max + row_exp_sum(x, max).ln();
        }
    }
}

vectorised! {
    /// `out = grad · e^{x - lse}` on each `row`-long row.
    fn probs_rows_f32(
        x: &[f32],
        lse: &[f32],
        grad: &[f32],
        out: &mut [MaybeUninit<f32>],
        row: usize
    ) {
        let rows = x.chunks_exact(row).zip(out.chunks_exact_mut(row)).zip(lse.iter().zip(grad));
        for ((x, out), (&lse, &grad)) in rows {
            for (out, &x) in out.iter_mut().zip(x) {
                out.write(grad * exp_shifted(x, lse));
            }
        }
    }
}

/// [`lse_rows_f32`] in `f64`, with libm's `exp`.
fn lse_rows_f64(x: &[f64], lse: &mut [f64], row: usize) {
    for (x, lse) in x.chunks_exact(row).zip(lse.iter_mut()) {
        let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        *lse = max + x.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
    }
}

/// [`probs_rows_f32`] in `f64`, with libm's `exp`.
fn probs_rows_f64(x: &[f64], lse: &[f64], grad: &[f64], out: &mut [MaybeUninit<f64>], row: usize) {
    let rows = x
        .chunks_exact(row)
        .zip(out.chunks_exact_mut(row))
        .zip(lse.iter().zip(grad));
    for ((x, out), (&lse, &grad)) in rows {
        for (out, &x) in out.iter_mut().zip(x) {
            out.write(grad * (x - lse).exp());
        }
    }
}
