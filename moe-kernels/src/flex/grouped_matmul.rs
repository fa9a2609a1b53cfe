//! flex's grouped matmul: one `gemm` call per expert over its filled rows only, written
//! straight into the output, with no copy of the inputs (their strides go to `gemm` as they
//! are, so transposed views cost nothing).
//!
//! With at least two experts per core the experts run in parallel, one single-threaded GEMM
//! each (rayon balances unequal loads by work stealing); with fewer, they run one after the
//! other and each GEMM is split over the cores, as flex does for one large matmul.
//!
//! [`Products`] is the machinery the dense products (`matmul.rs`) share: any number of
//! products over one or two batch dimensions, operands read through their strides, and the
//! output written once in the storage order asked for.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::ops::FloatTensorOps;
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
        let rhs = Operand::new(&w);
        // Expert e: its first rows[e] rows of x times w[e].
        let products = Products {
            batch: vec![experts],
            matrix: [slots, columns],
            order: output_order(rhs, slots),
            lhs: Operand::new(&x),
            rhs,
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
            batch: vec![experts],
            matrix: [inner, columns],
            order: ROW_MAJOR,
            lhs: Operand::new(&x).transposed(),
            rhs: Operand::new(&grad),
            sizes: rows.iter().map(|&filled| (inner, filled)).collect(),
        };
        products
            .run_float(&x, &grad)
            .unwrap_or_else(|| composed_grouped_weight_grad::<Flex>(x, grad, count_tensor(&rows)))
    }
}

/// Rows per expert up to which a product with a transposed right operand is stored column by
/// column (see [`output_order`]).
const COLUMN_MAJOR_MAX_ROWS: usize = 256;

/// How the grouped matmul stores its `[E, C, N]` output: each expert's `[C, N]` block
/// column-major when `w[e]` is a transposed view (the backward pass's `w[e]ᵀ`, whose
/// columns are contiguous) and the experts have few rows, row-major otherwise.
///
/// `gemm` computes a row-major product as the transposed one, so with a transposed `w[e]` it
/// must first pack `w[e]` against its storage, and with few rows that packing takes a good
/// part of the product's time. Stored column-major, the output takes `w[e]` as it lies.
/// Measured with `gemm` 0.19, 64 experts' input-gradient products on two cores (weights not in
/// cache): 1.25x to 1.36x faster with 150 rows each; 32 experts with 299 rows: 1.05x to 1.21x,
/// which the copy to row-major order that the next operation makes (a reshape, an element-wise
/// backward pass) takes back, so above 256 rows the output stays row-major.
fn output_order(rhs: Operand, slots: usize) -> StorageOrder {
    if rhs.row_stride == 1 && slots <= COLUMN_MAJOR_MAX_ROWS {
        [0, 1, 3, 2]
    } else {
        ROW_MAJOR
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

/// Where one product's matrix starts and how to step through it, in elements of the storage.
/// Products are numbered `0..outer * inner`; product `p` is batch entry `(p / inner, p % inner)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Operand {
    start: isize,
    batch_strides: [isize; 2],
    row_stride: isize,
    column_stride: isize,
}

impl Operand {
    /// The matrices of a rank-2, 3 or 4 tensor: its last two dimensions are each matrix's rows
    /// and columns, the ones before them (none, one or two) number the batch entries.
    pub(super) fn new(tensor: &FlexTensor) -> Self {
        let layout = tensor.layout();
        let strides = layout.strides();
        let rank = strides.len();
        let mut batch_strides = [0; 2];
        batch_strides[..rank - 2].copy_from_slice(&strides[..rank - 2]);
        Self {
            start: layout.start_offset() as isize,
            batch_strides,
            row_stride: strides[rank - 2],
            column_stride: strides[rank - 1],
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

    /// Where the matrix of batch entry `(outer, inner)` starts.
    fn offset(&self, [outer, inner]: [usize; 2]) -> isize {
        self.start + outer as isize * self.batch_strides[0] + inner as isize * self.batch_strides[1]
    }
}

/// The dimensions of a product's output, `[outer, inner, rows, columns]`, in storage order,
/// outermost first: `[0, 1, 2, 3]` is row-major.
pub(super) type StorageOrder = [usize; 4];

/// Row-major storage.
pub(super) const ROW_MAJOR: StorageOrder = [0, 1, 2, 3];

/// One product per batch entry, `out[b, h][..m, ..] = lhs[b, h][..m, ..k] · rhs[b, h][..k, ..]`,
/// where `(m, k) = sizes[b * inner + h]`; the rest of `out` is zero. The output has shape
/// `batch ++ matrix`; its dimensions `[outer, inner, rows, columns]` (the batch padded with ones
/// to two dimensions, see [`Products::output_dims`]) are stored in `order`.
pub(super) struct Products {
    /// The batch dimensions (none, one or two).
    pub(super) batch: Vec<usize>,
    /// `[rows, columns]` of each product's output.
    pub(super) matrix: [usize; 2],
    /// How the output is stored.
    pub(super) order: StorageOrder,
    /// The left operand of each product.
    pub(super) lhs: Operand,
    /// The right operand of each product.
    pub(super) rhs: Operand,
    /// `(m, k)` of each product.
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

/// The output's storage, shared by the tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct Destination<T>(*mut T);

// SAFETY: the tasks given a `Destination` write disjoint elements (one batch entry each).
unsafe impl<T: Send> Send for Destination<T> {}
// SAFETY: as above; no task reads through it.
unsafe impl<T: Send> Sync for Destination<T> {}

impl<T> Destination<T> {
    /// The element `offset` elements from the start.
    ///
    /// # Safety
    ///
    /// `offset` is within the storage.
    unsafe fn at(&self, offset: isize) -> *mut T {
        // SAFETY: the caller keeps `offset` within the storage.
        unsafe { self.0.offset(offset) }
    }
}

impl Products {
    /// The products in `f32` or `f64` when both operands have that type; `None` otherwise
    /// (half precisions), for the caller's composed fallback.
    pub(super) fn run_float(self, lhs: &FlexTensor, rhs: &FlexTensor) -> Option<FlexTensor> {
        let stored = match (lhs.dtype(), rhs.dtype()) {
            (DType::F32, DType::F32) => self.run::<f32>(lhs, rhs),
            (DType::F64, DType::F64) => self.run::<f64>(lhs, rhs),
            _ => return None,
        };
        let stored = FlexTensor::from_data(stored);
        // The storage without the dimensions that pad the batch (of size 1, so dropping them
        // moves no element), then viewed in the output's order: output dimension `i` is
        // dimension `position of dims[i] in stored_order` of the storage (the identity when
        // row-major).
        let logical = self.logical_shape();
        let dims = self.output_dims();
        let stored_order: Vec<usize> = self
            .order
            .iter()
            .copied()
            .filter(|dim| dims.contains(dim))
            .collect();
        let stored_shape: Vec<usize> = stored_order.iter().map(|&dim| logical[dim]).collect();
        let axes: Vec<usize> = dims
            .iter()
            .map(|dim| stored_order.iter().position(|stored| stored == dim))
            .map(|position| position.expect("every output dimension is stored"))
            .collect();
        Some(Flex::float_permute(
            Flex::float_reshape(stored, stored_shape.into()),
            &axes,
        ))
    }

    /// Which of `[outer, inner, rows, columns]` the output has, in its order: the others
    /// (of size 1) pad the batch.
    fn output_dims(&self) -> &'static [usize] {
        match self.batch.len() {
            0 => &[2, 3],
            1 => &[0, 2, 3],
            2 => &[0, 1, 2, 3],
            _ => unreachable!("products have at most two batch dimensions"),
        }
    }

    /// `[outer, inner, rows, columns]`: the output's shape with the padding dimensions.
    fn logical_shape(&self) -> [usize; 4] {
        let mut shape = [1; 4];
        let sizes = self.batch.iter().chain(&self.matrix);
        for (&dim, &size) in self.output_dims().iter().zip(sizes) {
            shape[dim] = size;
        }
        shape
    }

    /// The storage's shape: the logical one in `order`.
    fn physical_shape(&self) -> [usize; 4] {
        let logical = self.logical_shape();
        self.order.map(|dim| logical[dim])
    }

    /// The stride of each logical dimension in the storage.
    fn output_strides(&self) -> [isize; 4] {
        let physical = self.physical_shape();
        let mut strides = [0; 4];
        let mut stride = 1;
        for position in (0..4).rev() {
            strides[self.order[position]] = stride as isize;
            stride *= physical[position];
        }
        strides
    }

    /// The output's elements in storage order, shaped as stored.
    fn run<T: GemmFloat>(&self, lhs: &FlexTensor, rhs: &FlexTensor) -> TensorData {
        let [outer, inner, rows, columns] = self.logical_shape();
        let len = outer * inner * rows * columns;
        let strides = self.output_strides();
        // Written once: each product by `gemm` (which does not read its destination), only the
        // rows beyond it zeroed. Zeroing everything first would write the whole output twice,
        // and for weight gradients that output is every expert's weights.
        let mut output: Vec<T> = Vec::with_capacity(len);
        if len == 0 {
            return TensorData::new(output, self.physical_shape());
        }
        let destination = Destination(output.as_mut_ptr());
        let lhs_data: &[T] = lhs.storage();
        let rhs_data: &[T] = rhs.storage();
        let multiply = |product: usize, parallelism: Parallelism| {
            let entry = [product / inner, product % inner];
            let (m, k) = self.sizes[product];
            // An empty product (`k == 0`) is zero throughout.
            let m = if k == 0 { 0 } else { m };
            // SAFETY: `strides` map the logical `[outer, inner, rows, columns]` one to one
            // onto `0..len` (`output_strides`), so batch entry `entry` owns the elements at
            // `start + r * strides[2] + c * strides[3]` for `r < rows`, `c < columns`, which no
            // other product writes. The rows from `m` on are zeroed here; `gemm` writes the
            // first `m` without reading them (`read_dst` is false). `lhs` and `rhs` are tensors
            // whose layouts address every element of batch entry `entry` within their storage,
            // and `m`, `k` are within their dimensions (the counts are clamped to the slots;
            // `k` is the shared inner size or a clamped count).
            unsafe {
                let start =
                    destination.at(entry[0] as isize * strides[0] + entry[1] as isize * strides[1]);
                for row in m..rows {
                    let row_start = start.offset(row as isize * strides[2]);
                    if strides[3] == 1 {
                        std::slice::from_raw_parts_mut(row_start.cast::<MaybeUninit<T>>(), columns)
                            .fill(MaybeUninit::new(T::ZERO));
                    } else {
                        for column in 0..columns {
                            row_start
                                .offset(column as isize * strides[3])
                                .write(T::ZERO);
                        }
                    }
                }
                if m == 0 {
                    return;
                }
                gemm::gemm(
                    m,
                    columns,
                    k,
                    start,
                    strides[3],
                    strides[2],
                    false,
                    lhs_data.as_ptr().offset(self.lhs.offset(entry)),
                    self.lhs.column_stride,
                    self.lhs.row_stride,
                    rhs_data.as_ptr().offset(self.rhs.offset(entry)),
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

        let products = outer * inner;
        if products >= 2 * rayon::current_num_threads() {
            (0..products)
                .into_par_iter()
                .for_each(|product| multiply(product, Parallelism::None));
        } else {
            for (product, &(m, k)) in self.sizes.iter().enumerate() {
                let parallelism = if m * k * columns >= SPLIT_GEMM_ABOVE {
                    Parallelism::Rayon(0)
                } else {
                    Parallelism::None
                };
                multiply(product, parallelism);
            }
        }
        // SAFETY: every element was written above, by `gemm` or by the zero fill.
        unsafe { output.set_len(len) };
        TensorData::new(output, self.physical_shape())
    }
}
