//! The dispatch plan's integer operations on cube: a column scan that reads each element
//! twice (Burn's `cumsum` reads `n²/2` per column), and the slot inversion as one parallel
//! scatter of distinct positions (no `arange`, no single-thread `select_assign`).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::IntTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

use super::{empty_like_shape, scan_units};
use crate::routing::RoutingBackend;

impl RoutingBackend for CubeBackend {
    fn exclusive_cumsum(x: CubeTensor) -> CubeTensor {
        column_exclusive_scan(x)
    }

    fn invert_slots(slot_of_pair: CubeTensor, slots: usize) -> CubeTensor {
        let slot_of_pair = into_contiguous(slot_of_pair);
        let pairs = slot_of_pair.shape().num_elements();
        let dtype = slot_of_pair.dtype;
        let pair_of_slot = CubeBackend::int_full(
            Shape::new([slots]),
            (-1i64).into(),
            &slot_of_pair.device,
            dtype.into(),
        );
        if pairs == 0 || slots == 0 {
            return pair_of_slot;
        }
        let client = slot_of_pair.client.clone();
        let cube_dim = CubeDim::new(&client, pairs);
        let cube_count = calculate_cube_count_elemwise(&client, pairs, cube_dim);
        invert_slots_kernel::launch(
            &client,
            cube_count,
            cube_dim,
            slot_of_pair.into_tensor_arg(),
            pair_of_slot.clone().into_tensor_arg(),
            pairs,
            dtype_to_storage_type(dtype),
        );
        pair_of_slot
    }
}

/// `y[t, c] = Σ_{t' < t} x[t', c]` for an integer `x: [T, C]` (any strides), into a new
/// contiguous tensor: one cube per column, each unit scanning a run of consecutive rows.
pub(super) fn column_exclusive_scan(x: CubeTensor) -> CubeTensor {
    let shape = x.shape();
    let columns = shape[1];
    let output = empty_like_shape(&x, shape);
    if output.shape().num_elements() == 0 {
        return output;
    }
    let client = x.client.clone();
    let units = scan_units(&client);
    let dtype = x.dtype;
    column_exclusive_scan_kernel::launch(
        &client,
        CubeCount::Static(columns as u32, 1, 1),
        CubeDim::new_1d(units as u32),
        x.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        units,
        dtype_to_storage_type(dtype),
    );
    output
}

/// One cube per column `c` (`CUBE_POS_X`) of `units` units. Unit `u` owns the rows
/// `u * run..(u + 1) * run` (`run = ceil(T / units)`): it sums them, the units' sums are
/// turned into exclusive prefixes in shared memory, and each unit writes its rows' prefixes
/// from its own. Every element is read twice and written once.
#[cube(launch)]
fn column_exclusive_scan_kernel<I: Int>(
    x: &Tensor<I>,
    y: &mut Tensor<I>,
    #[comptime] units: usize,
    #[define(I)] _dtype: ElemType,
) {
    let column = CUBE_POS_X as usize;
    let rows = x.shape(0);
    let unit = UNIT_POS as usize;
    let run = (rows + units - 1) / units;
    let start = select(unit * run < rows, unit * run, rows);
    let end = select(start + run < rows, start + run, rows);
    let (x_row, x_column) = (x.stride(0), x.stride(1));
    let (y_row, y_column) = (y.stride(0), y.stride(1));

    let mut total = I::from_int(0);
    for row in start..end {
        total += x[row * x_row + column * x_column];
    }
    let mut prefix = Shared::<[I]>::new_slice(units);
    prefix[unit] = total;
    sync_cube();
    if unit == 0 {
        let mut running = I::from_int(0);
        for other in 0..units {
            let sum = prefix[other];
            prefix[other] = running;
            running += sum;
        }
    }
    sync_cube();

    let mut running = prefix[unit];
    for row in start..end {
        let value = x[row * x_row + column * x_column];
        y[row * y_row + column * y_column] = running;
        running += value;
    }
}

/// One unit per pair `p` of the contiguous `slot_of_pair`: writes `p` at its slot when that is
/// a slot of `pair_of_slot`. The dispatch plan gives distinct pairs distinct slots, so no two
/// units write the same element.
#[cube(launch)]
fn invert_slots_kernel<I: Int>(
    slot_of_pair: &Tensor<I>,
    pair_of_slot: &mut Tensor<I>,
    pairs: usize,
    #[define(I)] _dtype: ElemType,
) {
    let pair = ABSOLUTE_POS;
    if pair >= pairs {
        terminate!();
    }
    let slot = slot_of_pair[pair];
    if slot >= I::from_int(0) {
        let slot = usize::cast_from(slot);
        if slot < pair_of_slot.shape(0) {
            pair_of_slot[slot] = I::cast_from(pair);
        }
    }
}
