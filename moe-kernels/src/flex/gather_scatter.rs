//! flex's row gather and weighted row scatter-add: each direction one pass over the rows,
//! writing every output element once, with no `[slots, d]` intermediate.
//!
//! Gathers split their output rows over the cores. Scatter-adds split the *destination* rows:
//! each task owns a block of tokens and walks the whole index, adding the slots that land in
//! its block, so no two tasks write the same row and the sum over slots runs in slot order
//! whatever the thread count (the result does not depend on it). A slot whose index is outside
//! `0..tokens` is padding: a zero row, added nowhere. `f32` and `f64` only; half precisions use
//! the composed ops.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use crate::gather_scatter::{
    composed_combine_rows, composed_combine_rows_backward, composed_gather_rows,
    composed_scatter_add_rows, GatherScatterBackend,
};

use super::{contiguous, matrix, rows_per_task, written_rows, Float};

/// Elements per rayon task (whole rows, at least one).
const CHUNK: usize = 1 << 14;

impl GatherScatterBackend for Flex {
    fn gather_rows(x: FlexTensor, index: FlexTensor) -> FlexTensor {
        match x.dtype() {
            DType::F32 => gather::<f32>(x, index),
            DType::F64 => gather::<f64>(x, index),
            _ => composed_gather_rows::<Flex>(x, index),
        }
    }

    fn scatter_add_rows(values: FlexTensor, index: FlexTensor, tokens: usize) -> FlexTensor {
        match values.dtype() {
            DType::F32 => scatter_add::<f32>(values, None, index, tokens),
            DType::F64 => scatter_add::<f64>(values, None, index, tokens),
            _ => composed_scatter_add_rows::<Flex>(values, index, tokens),
        }
    }

    fn combine_rows(
        values: FlexTensor,
        weight: FlexTensor,
        index: FlexTensor,
        tokens: usize,
    ) -> FlexTensor {
        match (values.dtype(), weight.dtype()) {
            (DType::F32, DType::F32) => scatter_add::<f32>(values, Some(weight), index, tokens),
            (DType::F64, DType::F64) => scatter_add::<f64>(values, Some(weight), index, tokens),
            _ => composed_combine_rows::<Flex>(values, weight, index, tokens),
        }
    }

    fn combine_rows_backward(
        grad: FlexTensor,
        values: FlexTensor,
        weight: FlexTensor,
        index: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let same = grad.dtype() == values.dtype() && values.dtype() == weight.dtype();
        match grad.dtype() {
            DType::F32 if same => combine_backward::<f32>(grad, values, weight, index),
            DType::F64 if same => combine_backward::<f64>(grad, values, weight, index),
            _ => composed_combine_rows_backward::<Flex>(grad, values, weight, index),
        }
    }
}

/// The token each slot names: `None` for an index outside `0..tokens` (padding).
fn named_tokens(index: FlexTensor, tokens: usize) -> Vec<Option<usize>> {
    index
        .into_data()
        .iter::<i64>()
        .map(|token| {
            (0..tokens as i64)
                .contains(&token)
                .then_some(token as usize)
        })
        .collect()
}

/// `y[s] = x[index[s]]` (a zero row for padding).
fn gather<E: Float>(x: FlexTensor, index: FlexTensor) -> FlexTensor {
    let x = contiguous::<E>(x);
    let (data, row) = matrix::<E>(&x);
    let tokens = x.shape()[0];
    let index = named_tokens(index, tokens);
    let output = written_rows::<E>(index.len(), row, rows_per_task(row, CHUNK), |first, out| {
        for (out_row, &token) in out.chunks_mut(row.max(1)).zip(&index[first..]) {
            match token {
                Some(token) => {
                    let source = &data[token * row..(token + 1) * row];
                    for (o, &v) in out_row.iter_mut().zip(source) {
                        o.write(v);
                    }
                }
                None => out_row.fill(MaybeUninit::new(E::ZERO)),
            }
        }
    });
    FlexTensor::from_data(TensorData::new(output, [index.len(), row]))
}

/// `y[t] = Σ_{s: index[s] = t} weight[s] · values[s]` (`weight[s] = 1` without `weight`).
fn scatter_add<E: Float>(
    values: FlexTensor,
    weight: Option<FlexTensor>,
    index: FlexTensor,
    tokens: usize,
) -> FlexTensor {
    let values = contiguous::<E>(values);
    let weight = weight.map(contiguous::<E>);
    let (data, row) = matrix::<E>(&values);
    let weights: Option<&[E]> = weight.as_ref().map(|weight| matrix::<E>(weight).0);
    let index = named_tokens(index, tokens);
    // Every task walks the whole index, so there are a few tasks per core (not one per
    // `CHUNK`): the walks then cost `O(slots x cores)`, not `O(slots x tokens)`.
    let block = tokens.div_ceil(4 * rayon::current_num_threads()).max(1);
    let output = written_rows::<E>(tokens, row, block, |first, out| {
        out.fill(MaybeUninit::new(E::ZERO));
        // SAFETY: every element of `out` was just initialised.
        let out = unsafe { &mut *(out as *mut [MaybeUninit<E>] as *mut [E]) };
        let owned = first..first + out.len() / row.max(1);
        for (slot, &token) in index.iter().enumerate() {
            let Some(token) = token.filter(|token| owned.contains(token)) else {
                continue;
            };
            let start = (token - first) * row;
            let target = &mut out[start..start + row];
            let source = &data[slot * row..(slot + 1) * row];
            match weights {
                Some(weights) => {
                    let scale = weights[slot];
                    for (t, &v) in target.iter_mut().zip(source) {
                        *t = *t + scale * v;
                    }
                }
                None => {
                    for (t, &v) in target.iter_mut().zip(source) {
                        *t = *t + v;
                    }
                }
            }
        }
    });
    FlexTensor::from_data(TensorData::new(output, [tokens, row]))
}

/// `(grad_values, grad_weight)` of [`scatter_add`] with weights: `weight[s] · grad[index[s]]`
/// and `grad[index[s]] · values[s]`, in one pass over the slots.
fn combine_backward<E: Float>(
    grad: FlexTensor,
    values: FlexTensor,
    weight: FlexTensor,
    index: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let grad = contiguous::<E>(grad);
    let values = contiguous::<E>(values);
    let weight = contiguous::<E>(weight);
    let (grad_data, row) = matrix::<E>(&grad);
    let (value_data, _) = matrix::<E>(&values);
    let (weights, _) = matrix::<E>(&weight);
    let index = named_tokens(index, grad.shape()[0]);
    let slots = index.len();

    let len = slots * row;
    let mut grad_values: Vec<E> = Vec::with_capacity(len);
    let mut grad_weight = vec![E::ZERO; slots];
    if len > 0 {
        let block = rows_per_task(row, CHUNK);
        grad_values.spare_capacity_mut()[..len]
            .par_chunks_mut(block * row)
            .zip(grad_weight.par_chunks_mut(block))
            .enumerate()
            .for_each(|(task, (out, dots))| {
                let first = task * block;
                for (offset, (out_row, dot)) in out.chunks_mut(row).zip(dots).enumerate() {
                    let slot = first + offset;
                    let Some(token) = index[slot] else {
                        out_row.fill(MaybeUninit::new(E::ZERO));
                        continue;
                    };
                    let upstream = &grad_data[token * row..(token + 1) * row];
                    for (o, &g) in out_row.iter_mut().zip(upstream) {
                        o.write(weights[slot] * g);
                    }
                    *dot = dot_product(upstream, &value_data[slot * row..(slot + 1) * row]);
                }
            });
        // SAFETY: every row of every block was written just above.
        unsafe { grad_values.set_len(len) };
    }
    (
        FlexTensor::from_data(TensorData::new(grad_values, [slots, row])),
        FlexTensor::from_data(TensorData::new(grad_weight, [slots])),
    )
}

/// `Σ_j a_j b_j`, summed in 8 interleaved partial sums (so the loop vectorises).
fn dot_product<E: Float>(a: &[E], b: &[E]) -> E {
    const LANES: usize = 8;
    let mut partial = [E::ZERO; LANES];
    let mut a_blocks = a.chunks_exact(LANES);
    let mut b_blocks = b.chunks_exact(LANES);
    for (a_block, b_block) in (&mut a_blocks).zip(&mut b_blocks) {
        for lane in 0..LANES {
            partial[lane] = partial[lane] + a_block[lane] * b_block[lane];
        }
    }
    let tail = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .fold(E::ZERO, |sum, (&x, &y)| sum + x * y);
    partial.iter().fold(tail, |sum, &p| sum + p)
}
