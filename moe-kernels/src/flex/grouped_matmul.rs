//! flex's grouped matmul: one `gemm` call per expert over its filled rows only, written
//! straight into the output, with no copy of the inputs (their strides go to `gemm` as they
//! are, so transposed views cost nothing).
//!
//! With at least two experts per core the experts run in parallel, one single-threaded GEMM
//! each (rayon balances unequal loads by work stealing); with fewer, they run one after the
//! other and each GEMM is split over the cores, as flex does for one large matmul.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::grouped_matmul::{
    composed_grouped_matmul, composed_grouped_weight_grad, GroupedMatmulBackend,
};

/// Multiply-adds below which one GEMM is not worth splitting over the cores.
const SPLIT_GEMM_ABOVE: usize = 1 << 18;

impl GroupedMatmulBackend for Flex {
    fn grouped_matmul(x: FlexTensor, w: FlexTensor, rows: FlexTensor) -> FlexTensor {
        let [experts, slots, inner] = dims(&x);
        let [_, _, columns] = dims(&w);
        let rows = row_counts(rows, slots);
        // Expert e: its first rows[e] rows of x times w[e].
        let products = Products {
            out_shape: [experts, slots, columns],
            lhs: Operand::matrix(&x),
            rhs: Operand::matrix(&w),
            sizes: rows.iter().map(|&filled| (filled, inner)).collect(),
        };
        products
            .run_float(&x, &w)
            .unwrap_or_else(|| composed_grouped_matmul::<Flex>(x, w, count_tensor(&rows)))
    }

    fn grouped_weight_grad(x: FlexTensor, grad: FlexTensor, rows: FlexTensor) -> FlexTensor {
        let [experts, slots, inner] = dims(&x);
        let [_, _, columns] = dims(&grad);
        let rows = row_counts(rows, slots);
        // Expert e: x[e]ᵀ (its first rows[e] rows, transposed) times grad[e]'s first rows[e].
        let products = Products {
            out_shape: [experts, inner, columns],
            lhs: Operand::matrix(&x).transposed(),
            rhs: Operand::matrix(&grad),
            sizes: rows.iter().map(|&filled| (inner, filled)).collect(),
        };
        products
            .run_float(&x, &grad)
            .unwrap_or_else(|| composed_grouped_weight_grad::<Flex>(x, grad, count_tensor(&rows)))
    }
}

/// The three dimensions of a rank-3 tensor.
fn dims(tensor: &FlexTensor) -> [usize; 3] {
    let shape = tensor.shape();
    [shape[0], shape[1], shape[2]]
}

/// The per-expert row counts, each clamped to `0..=slots`. `rows` is in host memory, so this
/// reads it without waiting for anything.
fn row_counts(rows: FlexTensor, slots: usize) -> Vec<usize> {
    rows.into_data()
        .iter::<i64>()
        .map(|count| count.clamp(0, slots as i64) as usize)
        .collect()
}

/// The row counts as a tensor again (for the composed fallback of half precisions).
fn count_tensor(counts: &[usize]) -> FlexTensor {
    let counts: Vec<i64> = counts.iter().map(|&count| count as i64).collect();
    let len = counts.len();
    FlexTensor::from_data(TensorData::new(counts, [len]))
}

/// Where one expert's matrix starts and how to step through it, in elements of the storage.
#[derive(Debug, Clone, Copy)]
pub(super) struct Operand {
    start: isize,
    expert_stride: isize,
    row_stride: isize,
    column_stride: isize,
}

impl Operand {
    /// A rank-2 tensor as the matrix of the only expert.
    pub(super) fn matrix_2d(tensor: &FlexTensor) -> Self {
        let layout = tensor.layout();
        let strides = layout.strides();
        Self {
            start: layout.start_offset() as isize,
            expert_stride: 0,
            row_stride: strides[0],
            column_stride: strides[1],
        }
    }

    /// Slice `e` of a rank-3 tensor as the matrix `[dim 1, dim 2]`.
    pub(super) fn matrix(tensor: &FlexTensor) -> Self {
        let layout = tensor.layout();
        let strides = layout.strides();
        Self {
            start: layout.start_offset() as isize,
            expert_stride: strides[0],
            row_stride: strides[1],
            column_stride: strides[2],
        }
    }

    /// The transposed matrix (a view: only the strides swap).
    fn transposed(self) -> Self {
        Self {
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..self
        }
    }
}

/// One product per expert, `out[e][..m, ..] = lhs[e][..m, ..k] · rhs[e][..k, ..]`, where
/// `(m, k) = sizes[e]`; the rest of `out` is zero.
pub(super) struct Products {
    /// `[experts, rows, columns]` of the output.
    pub(super) out_shape: [usize; 3],
    /// The left operand of each product.
    pub(super) lhs: Operand,
    /// The right operand of each product.
    pub(super) rhs: Operand,
    /// `(m, k)` of each expert's product.
    pub(super) sizes: Vec<(usize, usize)>,
}

/// The float types `gemm` multiplies.
trait GemmFloat: burn::tensor::Element + bytemuck::Pod + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
}

impl GemmFloat for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl GemmFloat for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Products {
    /// The products in `f32` or `f64` when both operands have that type; `None` otherwise
    /// (half precisions), for the caller's composed fallback.
    pub(super) fn run_float(self, lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
        match (lhs.dtype(), rhs.dtype()) {
            (DType::F32, DType::F32) => Some(self.run::<f32>(lhs, rhs)),
            (DType::F64, DType::F64) => Some(self.run::<f64>(lhs, rhs)),
            _ => None,
        }
    }

    fn run<T: GemmFloat>(self, lhs: &FlexTensor, rhs: &FlexTensor) -> FlexTensor {
        let [experts, out_rows, columns] = self.out_shape;
        let block = out_rows * columns;
        let len = experts * block;
        // Written once: each expert's product by `gemm` (which does not read its destination),
        // only the rows beyond it zeroed. Zeroing everything first would write the whole output
        // twice, and for weight gradients that output is every expert's weights.
        let mut output: Vec<T> = Vec::with_capacity(len);
        if block == 0 {
            return FlexTensor::from_data(TensorData::new(output, self.out_shape));
        }
        let lhs_data: &[T] = lhs.storage();
        let rhs_data: &[T] = rhs.storage();
        let multiply = |expert: usize, out: &mut [MaybeUninit<T>], parallelism: Parallelism| {
            let (m, k) = self.sizes[expert];
            // An empty product (`k == 0`) is zero throughout.
            let product_len = if k == 0 { 0 } else { m * columns };
            let (product, rest) = out.split_at_mut(product_len);
            rest.fill(MaybeUninit::new(T::ZERO));
            if product.is_empty() {
                return;
            }
            let e = expert as isize;
            let lhs_start = self.lhs.start + e * self.lhs.expert_stride;
            let rhs_start = self.rhs.start + e * self.rhs.expert_stride;
            // SAFETY: `lhs` and `rhs` are rank-3 tensors whose layouts address every element
            // of slice `e` within their storage, and `m <= dim 1`, `k <= dim 2` of `lhs` and
            // `k <= dim 1` of `rhs` (the counts are clamped to the slots; `k` is either the
            // shared inner size or a clamped count); `product` is the first `m` rows of the
            // `out_rows x columns` row-major block of expert `e`, which `gemm` writes without
            // reading (`read_dst` is false).
            unsafe {
                gemm::gemm(
                    m,
                    columns,
                    k,
                    product.as_mut_ptr().cast::<T>(),
                    1,
                    columns as isize,
                    false,
                    lhs_data.as_ptr().offset(lhs_start),
                    self.lhs.column_stride,
                    self.lhs.row_stride,
                    rhs_data.as_ptr().offset(rhs_start),
                    self.rhs.column_stride,
                    self.rhs.row_stride,
                    T::ZERO,
                    T::ONE,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        };

        let blocks = output.spare_capacity_mut()[..len].chunks_mut(block);
        if experts >= 2 * rayon::current_num_threads() {
            let blocks: Vec<&mut [MaybeUninit<T>]> = blocks.collect();
            blocks
                .into_par_iter()
                .enumerate()
                .for_each(|(expert, out)| multiply(expert, out, Parallelism::None));
        } else {
            for (expert, out) in blocks.enumerate() {
                let (m, k) = self.sizes[expert];
                let parallelism = if m * k * columns >= SPLIT_GEMM_ABOVE {
                    Parallelism::Rayon(0)
                } else {
                    Parallelism::None
                };
                multiply(expert, out, parallelism);
            }
        }
        // SAFETY: every block was written above, by `gemm` or by the zero fill.
        unsafe { output.set_len(len) };
        FlexTensor::from_data(TensorData::new(output, self.out_shape))
    }
}
