//! What the one-cube-per-row kernels share: how many units a row gets, and the reduction of
//! the units' partial results in shared memory.
//!
//! A row's reduction is done by one cube: each unit `u` of the `units` reads the elements
//! `u, u + units, ...` and keeps its partial result, then unit 0 combines the partial results
//! in unit order. The order is fixed, so the result does not depend on scheduling (the same
//! bits on every run), and no unit's loop grows with the number of rows.
//!
//! The kernels read their inputs through their strides ([`row_start`]), so a permuted or
//! broadcast input costs no copy (a launch of its own, and a pass over the tensor); they write
//! contiguous outputs.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::wgpu::CubeTensor;
use burn::backend::TensorMetadata;
use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

use super::{one_cube_per_row, scan_units};

/// The launch of a one-cube-per-row kernel over the rows of a tensor's last dimension.
pub(super) struct RowLaunch {
    /// The tensor's client.
    pub client: Client,
    /// Rows: the product of the leading dimensions.
    pub rows: usize,
    /// Elements per row: the last dimension.
    pub n: usize,
    /// Units per cube: `n` rounded up to a power of two, at most [`scan_units`] (256, or fewer
    /// where the device allows fewer).
    pub units: usize,
    /// The tensor's storage type, for the kernel's `#[define(F)]`.
    pub dtype: ElemType,
}

impl RowLaunch {
    /// The launch over `x`'s rows; `None` when it has none.
    pub fn over(x: &CubeTensor) -> Option<Self> {
        let shape = x.shape();
        let n = shape[shape.num_dims() - 1];
        let rows = shape.num_elements().checked_div(n).unwrap_or(0);
        (rows > 0).then(|| Self {
            client: x.client.clone(),
            rows,
            n,
            units: n.next_power_of_two().min(scan_units(&x.client)),
            dtype: dtype_to_storage_type(x.dtype),
        })
    }

    /// One cube per row ([`one_cube_per_row`]).
    pub fn cube_count(&self) -> CubeCount {
        one_cube_per_row(self.rows)
    }

    /// [`Self::units`] units in a line.
    pub fn cube_dim(&self) -> CubeDim {
        CubeDim::new_1d(self.units as u32)
    }
}

/// Where row `row` of `x` starts in its storage, `x` seen as rows of its last dimension in
/// row-major order, whatever its strides: the row's index taken apart over the leading
/// dimensions, each part times its stride. Element `j` of the row is `j` last-dimension strides
/// further.
#[cube]
pub(super) fn row_start<F: Float>(x: &Tensor<F>, row: usize) -> usize {
    let leading = x.rank() - 1;
    let mut remaining = row;
    let mut start = 0usize;
    for k in 0..leading {
        let dim = leading - 1 - k;
        let size = x.shape(dim);
        start += (remaining % size) * x.stride(dim);
        remaining /= size;
    }
    start
}

/// Reduces `shared[0..units]` into `shared[0]` (the maximum, or the sum), unit 0 walking the
/// values in order (a fixed order: the same result on every run). Ends with the cube
/// synchronised, so every unit may read `shared[0]`.
#[cube]
pub(super) fn reduce_in_order(
    shared: &mut Shared<[f32]>,
    #[comptime] units: usize,
    #[comptime] maximum: bool,
) {
    if UNIT_POS == 0 {
        let mut combined = shared[0];
        for other in 1..units {
            let value = shared[other];
            if maximum {
                combined = f32::max(combined, value);
            } else {
                combined += value;
            }
        }
        shared[0] = combined;
    }
    sync_cube();
}

/// `m = max_j x[start + j stride]` over `j < count`, each unit reading `j = u, u + units, ...`,
/// the partial maxima reduced in order through `shared`: every unit gets `m`. Ends with the
/// cube synchronised, so `shared` may be written again.
#[cube]
pub(super) fn row_maximum<F: Float>(
    x: &Tensor<F>,
    start: usize,
    stride: usize,
    count: usize,
    shared: &mut Shared<[f32]>,
    #[comptime] units: usize,
) -> f32 {
    let unit = UNIT_POS as usize;
    let mut largest = f32::min_value();
    for j in range_stepped(unit, count, units) {
        largest = f32::max(largest, f32::cast_from(x[start + j * stride]));
    }
    shared[unit] = largest;
    sync_cube();
    reduce_in_order(shared, units, true);
    let maximum = shared[0];
    sync_cube();
    maximum
}

/// `s = Σ_j e^{x[start + j stride] - m}` over `j < count`, reduced like [`row_maximum`]: every
/// unit gets `s`, the sum of the softmax's numerators with `m` the row's maximum.
#[cube]
pub(super) fn row_exp_sum<F: Float>(
    x: &Tensor<F>,
    start: usize,
    stride: usize,
    count: usize,
    maximum: f32,
    shared: &mut Shared<[f32]>,
    #[comptime] units: usize,
) -> f32 {
    let unit = UNIT_POS as usize;
    let mut sum = 0.0f32;
    for j in range_stepped(unit, count, units) {
        sum += f32::exp(f32::cast_from(x[start + j * stride]) - maximum);
    }
    shared[unit] = sum;
    sync_cube();
    reduce_in_order(shared, units, false);
    let total = shared[0];
    sync_cube();
    total
}
