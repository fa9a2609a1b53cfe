//! flex's products: any number of GEMMs over one or two batch dimensions, operands read
//! through their strides (transposed or head-split views cost nothing), the output written
//! once in the storage order asked for. The dense, batched and multi-head matmuls
//! (`matmul.rs`) run on it.

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, TensorData};
use gemm::Parallelism;
use rayon::prelude::*;

/// Multiply-adds below which one GEMM is not worth splitting over the cores.
const SPLIT_GEMM_ABOVE: usize = 1 << 18;

/// Runs `multiply(product, parallelism)` for products `0..count` whose multiply-adds
/// `work(product)` says: with at least two products per core, in parallel, one
/// single-threaded GEMM each (rayon balances unequal ones by work stealing); with fewer, one
/// after the other, each large one split over the cores, as flex does for one large matmul.
pub(super) fn run_products(
    count: usize,
    work: impl Fn(usize) -> usize,
    multiply: impl Fn(usize, Parallelism) + Sync,
) {
    if count >= 2 * rayon::current_num_threads() {
        (0..count)
            .into_par_iter()
            .for_each(|product| multiply(product, Parallelism::None));
    } else {
        for product in 0..count {
            let parallelism = if work(product) >= SPLIT_GEMM_ABOVE {
                Parallelism::Rayon(0)
            } else {
                Parallelism::None
            };
            multiply(product, parallelism);
        }
    }
}

/// Where one product's matrix starts and how to step through it, in elements of the storage.
/// Products are numbered `0..outer * inner`; product `p` is batch entry `(p / inner, p % inner)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Operand {
    pub(super) start: isize,
    pub(super) batch_strides: [isize; 2],
    pub(super) row_stride: isize,
    pub(super) column_stride: isize,
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
    pub(super) fn transposed(self) -> Self {
        Self {
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..self
        }
    }

    /// Where the matrix of batch entry `(outer, inner)` starts.
    pub(super) fn offset(&self, [outer, inner]: [usize; 2]) -> isize {
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
pub(super) trait GemmFloat:
    burn::tensor::Element + bytemuck::Pod + Send + Sync + 'static
{
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
pub(super) struct Destination<T>(pub(super) *mut T);

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
    pub(super) unsafe fn at(&self, offset: isize) -> *mut T {
        // SAFETY: the caller keeps `offset` within the storage.
        unsafe { self.0.offset(offset) }
    }
}

/// `dst = lhs · rhs` for one `m x k` by `k x n` product through `gemm`, overwriting the
/// `m x n` block at `dst` without reading it. Each matrix is a pointer with its
/// `[row, column]` strides in elements.
///
/// # Safety
///
/// `dst` with its strides addresses `m x n` elements that nothing else reads or writes
/// meanwhile; `lhs` and `rhs` with theirs address `m x k` and `k x n` readable elements.
pub(super) unsafe fn write_product<T: GemmFloat>(
    [m, n, k]: [usize; 3],
    (dst, [dst_row, dst_column]): (*mut T, [isize; 2]),
    (lhs, [lhs_row, lhs_column]): (*const T, [isize; 2]),
    (rhs, [rhs_row, rhs_column]): (*const T, [isize; 2]),
    parallelism: Parallelism,
) {
    // SAFETY: the caller's contract is `gemm`'s for these pointers and strides; `read_dst`
    // is false, so `dst` is only written (with `alpha` unused and `beta = 1`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_column,
            dst_row,
            false,
            lhs,
            lhs_column,
            lhs_row,
            rhs,
            rhs_column,
            rhs_row,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
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
            // first `m` without reading them. `lhs` and `rhs` are tensors
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
                write_product(
                    [m, columns, k],
                    (start, [strides[2], strides[3]]),
                    (
                        lhs_data.as_ptr().offset(self.lhs.offset(entry)),
                        [self.lhs.row_stride, self.lhs.column_stride],
                    ),
                    (
                        rhs_data.as_ptr().offset(self.rhs.offset(entry)),
                        [self.rhs.row_stride, self.rhs.column_stride],
                    ),
                    parallelism,
                );
            }
        };

        run_products(
            outer * inner,
            |product| {
                let (m, k) = self.sizes[product];
                m * k * columns
            },
            multiply,
        );
        // SAFETY: every element was written above, by `gemm` or by the zero fill.
        unsafe { output.set_len(len) };
        TensorData::new(output, self.physical_shape())
    }
}
