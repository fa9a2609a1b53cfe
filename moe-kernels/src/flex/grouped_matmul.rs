//! flex's grouped matmul over the ragged layout: one `gemm` call per group, on the group's
//! rows where they lie (operands read through their strides, so transposed views cost
//! nothing), written straight into the output; only the rows no group covers are zeroed.
//!
//! The groups' GEMMs run as the dense products' do (`products::run_products`): in parallel,
//! one per core at a time, when there are enough of them, otherwise one after the other with
//! each large one split over the cores.

use std::mem::MaybeUninit;
use std::ops::Range;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

use super::products::{run_products, write_product, Destination, GemmFloat, Operand};
use super::{contiguous, matrix, rows_per_task, written_rows, Float};
use crate::grouped_matmul::{
    composed_grouped_bias, composed_grouped_matmul, composed_grouped_row_sum,
    composed_grouped_weight_grad, groups_from_offsets, uncovered_rows, GroupedMatmulBackend,
};

/// Elements per rayon task of the bias addition (whole rows, at least one).
const CHUNK: usize = 1 << 14;

impl GroupedMatmulBackend for Flex {
    fn grouped_matmul(x: FlexTensor, w: FlexTensor, offsets: FlexTensor) -> FlexTensor {
        let [rows, inner] = dims2(&x);
        let columns = w.shape()[2];
        let groups = host_groups(&offsets, rows);
        let (lhs, rhs) = (Operand::new(&x), Operand::new(&w));
        // Group e: its rows of x times w[e], into the same rows of the [S, N] output.
        let gemms = groups
            .iter()
            .enumerate()
            .filter(|(_, group)| !group.is_empty())
            .map(|(expert, group)| Gemm {
                size: [group.len(), columns, inner],
                out: (group.start * columns) as isize,
                lhs: lhs.rows_from(group.start),
                rhs: rhs.matrix(expert),
            })
            .collect();
        let [before, after] = uncovered_rows(&groups, rows);
        let zeroed = [before, after]
            .map(|range| range.start * columns..range.end * columns)
            .to_vec();
        GroupedGemms {
            shape: vec![rows, columns],
            row_length: columns,
            gemms,
            zeroed,
        }
        .run_float(&x, &w)
        .unwrap_or_else(|| composed_grouped_matmul::<Flex>(x, w, offsets))
    }

    fn grouped_weight_grad(x: FlexTensor, grad: FlexTensor, offsets: FlexTensor) -> FlexTensor {
        let [rows, inner] = dims2(&x);
        let columns = grad.shape()[1];
        let groups = host_groups(&offsets, rows);
        let block = inner * columns;
        let (lhs, rhs) = (Operand::new(&x).transposed(), Operand::new(&grad));
        // Group e: its rows of x, transposed, times the same rows of grad, into block e.
        let mut gemms = Vec::with_capacity(groups.len());
        let mut zeroed = Vec::new();
        for (expert, group) in groups.iter().enumerate() {
            let out = expert * block;
            if group.is_empty() {
                zeroed.push(out..out + block);
            } else {
                gemms.push(Gemm {
                    size: [inner, columns, group.len()],
                    out: out as isize,
                    lhs: lhs.columns_from(group.start),
                    rhs: rhs.rows_from(group.start),
                });
            }
        }
        GroupedGemms {
            shape: vec![groups.len(), inner, columns],
            row_length: columns,
            gemms,
            zeroed,
        }
        .run_float(&x, &grad)
        .unwrap_or_else(|| composed_grouped_weight_grad::<Flex>(x, grad, offsets))
    }

    fn grouped_bias(x: FlexTensor, bias: FlexTensor, offsets: FlexTensor) -> FlexTensor {
        match (x.dtype(), bias.dtype()) {
            (DType::F32, DType::F32) => add_group_bias::<f32>(x, bias, offsets),
            (DType::F64, DType::F64) => add_group_bias::<f64>(x, bias, offsets),
            _ => composed_grouped_bias::<Flex>(x, bias, offsets),
        }
    }

    fn grouped_row_sum(values: FlexTensor, offsets: FlexTensor) -> FlexTensor {
        match values.dtype() {
            DType::F32 => group_row_sums::<f32>(values, offsets),
            DType::F64 => group_row_sums::<f64>(values, offsets),
            _ => composed_grouped_row_sum::<Flex>(values, offsets),
        }
    }
}

/// The two dimensions of a rank-2 tensor.
fn dims2(tensor: &FlexTensor) -> [usize; 2] {
    let shape = tensor.shape();
    [shape[0], shape[1]]
}

/// The groups of an offsets tensor (flex tensors live in host memory: this waits for nothing).
fn host_groups(offsets: &FlexTensor, rows: usize) -> Vec<Range<usize>> {
    let offsets: Vec<i64> = offsets.clone().into_data().iter::<i64>().collect();
    groups_from_offsets(&offsets, rows)
}

/// One matrix of an operand: where it starts and its row and column strides, in elements.
#[derive(Debug, Clone, Copy)]
struct Matrix {
    start: isize,
    row_stride: isize,
    column_stride: isize,
}

impl Matrix {
    /// `[row, column]` strides.
    fn strides(&self) -> [isize; 2] {
        [self.row_stride, self.column_stride]
    }
}

impl Operand {
    /// The matrix of a rank-2 tensor from row `row` on.
    fn rows_from(self, row: usize) -> Matrix {
        Matrix {
            start: self.start + row as isize * self.row_stride,
            row_stride: self.row_stride,
            column_stride: self.column_stride,
        }
    }

    /// The matrix of a rank-2 tensor from column `column` on.
    fn columns_from(self, column: usize) -> Matrix {
        Matrix {
            start: self.start + column as isize * self.column_stride,
            row_stride: self.row_stride,
            column_stride: self.column_stride,
        }
    }

    /// Batch entry `entry` of a rank-3 tensor.
    fn matrix(self, entry: usize) -> Matrix {
        Matrix {
            start: self.offset([entry, 0]),
            row_stride: self.row_stride,
            column_stride: self.column_stride,
        }
    }
}

/// One product `out = lhs · rhs` of `size = [m, n, k]`, written row-major from element `out`
/// of the output.
struct Gemm {
    size: [usize; 3],
    out: isize,
    lhs: Matrix,
    rhs: Matrix,
}

/// Products into disjoint parts of one row-major output, whose other elements (`zeroed`, in
/// element ranges) are zero.
struct GroupedGemms {
    shape: Vec<usize>,
    /// Elements per output row (the `n` of every product).
    row_length: usize,
    gemms: Vec<Gemm>,
    zeroed: Vec<Range<usize>>,
}

impl GroupedGemms {
    /// The products in `f32` or `f64` when both operands have that type; `None` otherwise
    /// (half precisions), for the caller's composed fallback.
    fn run_float(self, lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
        let data = match (lhs.dtype(), rhs.dtype()) {
            (DType::F32, DType::F32) => self.run::<f32>(lhs, rhs),
            (DType::F64, DType::F64) => self.run::<f64>(lhs, rhs),
            _ => return None,
        };
        Some(FlexTensor::from_data(data))
    }

    fn run<T: GemmFloat>(&self, lhs: &FlexTensor, rhs: &FlexTensor) -> TensorData {
        let len: usize = self.shape.iter().product();
        let mut output: Vec<T> = Vec::with_capacity(len);
        let spare = &mut output.spare_capacity_mut()[..len];
        for range in &self.zeroed {
            spare[range.clone()].fill(MaybeUninit::new(T::ZERO));
        }
        let destination = Destination(output.as_mut_ptr());
        let lhs_data: &[T] = lhs.storage();
        let rhs_data: &[T] = rhs.storage();
        let row_length = self.row_length as isize;
        let multiply = |gemm: &Gemm, parallelism: Parallelism| {
            // SAFETY: each product writes its `m x n` block (`gemm.size = [m, n, k]`) from
            // `gemm.out` with row stride `row_length`, which lies within the output and
            // overlaps no other product's block nor a zeroed range (the groups are disjoint,
            // and `zeroed` is what they leave), without reading it. The operand
            // matrices are views of `lhs` and `rhs` within their storage: the groups lie
            // within the rows (or, transposed, the columns) of `x` and `grad`, and the expert
            // index within `w`'s first dimension.
            unsafe {
                write_product(
                    gemm.size,
                    (destination.at(gemm.out), [row_length, 1]),
                    (lhs_data.as_ptr().offset(gemm.lhs.start), gemm.lhs.strides()),
                    (rhs_data.as_ptr().offset(gemm.rhs.start), gemm.rhs.strides()),
                    parallelism,
                );
            }
        };
        run_products(
            self.gemms.len(),
            |product| self.gemms[product].size.iter().product(),
            |product, parallelism| multiply(&self.gemms[product], parallelism),
        );
        // SAFETY: the products and the zeroed ranges cover every element between them.
        unsafe { output.set_len(len) };
        TensorData::new(output, self.shape.clone())
    }
}

/// `y[s] = x[s] + bias[e]` for the rows of group `e`; the other rows copied.
fn add_group_bias<E: Float>(x: FlexTensor, bias: FlexTensor, offsets: FlexTensor) -> FlexTensor {
    let [rows, columns] = dims2(&x);
    let groups = host_groups(&offsets, rows);
    let x = contiguous::<E>(x);
    let bias = contiguous::<E>(bias);
    let (data, _) = matrix::<E>(&x);
    let (bias_data, _) = matrix::<E>(&bias);
    let row = columns.max(1);
    // One parallel pass, each output element written once.
    let output = written_rows::<E>(rows, columns, rows_per_task(row, CHUNK), |first, out| {
        for (offset, out_row) in out.chunks_mut(row).enumerate() {
            let index = first + offset;
            let source = &data[index * columns..(index + 1) * columns];
            // The groups are in order: the first that ends after the row is the only candidate.
            let expert = groups.partition_point(|group| group.end <= index);
            match groups.get(expert).filter(|group| group.contains(&index)) {
                Some(_) => {
                    let bias_row = &bias_data[expert * columns..(expert + 1) * columns];
                    for ((out, &value), &b) in out_row.iter_mut().zip(source).zip(bias_row) {
                        out.write(value + b);
                    }
                }
                None => {
                    for (out, &value) in out_row.iter_mut().zip(source) {
                        out.write(value);
                    }
                }
            }
        }
    });
    FlexTensor::from_data(TensorData::new(output, [rows, columns]))
}

/// `sums[e] = Σ_{s in group e} values[s]`, rows summed in order.
fn group_row_sums<E: Float>(values: FlexTensor, offsets: FlexTensor) -> FlexTensor {
    let [rows, columns] = dims2(&values);
    let groups = host_groups(&offsets, rows);
    let values = contiguous::<E>(values);
    let (data, _) = matrix::<E>(&values);
    let mut sums = vec![E::ZERO; groups.len() * columns];
    sums.par_chunks_mut(columns.max(1))
        .zip(&groups)
        .for_each(|(sum, group)| {
            for row in data[group.start * columns..group.end * columns].chunks(columns.max(1)) {
                for (total, &value) in sum.iter_mut().zip(row) {
                    *total = *total + value;
                }
            }
        });
    FlexTensor::from_data(TensorData::new(sums, [groups.len(), columns]))
}
