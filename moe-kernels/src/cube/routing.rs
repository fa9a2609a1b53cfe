//! The dispatch plan's integer operations on cube: a column scan that reads each element
//! twice (Burn's `cumsum` reads `n²/2` per column), and the slot inversion as one parallel
//! scatter of distinct positions (no `arange`, no single-thread `select_assign`).
//!
//! Work per launch, for `x: [T, C]`, `u` units per cube (256, or fewer where the device
//! allows fewer) and `P` pairs:
//!
//! | kernel | units | most work of one unit |
//! |---|---|---|
//! | `block_totals_kernel` | `ceil(T / 4u) x C` cubes of `u` | 4 reads; unit 0 also adds `u` sums |
//! | `block_scan_kernel` | the same | 8 reads, 4 writes; unit 0 also adds `u` sums |
//! | `invert_slots_kernel` | `P` | one read, one write |
//!
//! A scan of more than `4u` rows adds one totals launch and one scan of the `ceil(T / 4u)`
//! totals (recursively), so the launches grow as `log_{4u} T` and no unit's loop with `T`.

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
        // An empty slot names no pair: it holds the number of pairs.
        let pair_of_slot = CubeBackend::int_full(
            Shape::new([slots]),
            (pairs as i64).into(),
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

/// Rows each unit of a scan sums: a block of a scan covers `units x RUN` rows.
const RUN: usize = 4;

/// `y[t, c] = Σ_{t' < t} x[t', c]` for an integer `x: [T, C]` (any strides), into a new
/// contiguous tensor.
///
/// The rows are cut into blocks of `units x RUN` (1,024 with 256 units), one cube per (block,
/// column). One block: one launch. More: each block's column totals (`[blocks, C]`), their
/// own exclusive scan (this function again, on a tensor `units x RUN` times smaller), then
/// each block's scan from its offset. No unit sums more than `RUN` rows, whatever `T`.
pub(super) fn column_exclusive_scan(x: CubeTensor) -> CubeTensor {
    let shape = x.shape();
    let (rows, columns) = (shape[0], shape[1]);
    let output = empty_like_shape(&x, shape);
    if output.shape().num_elements() == 0 {
        return output;
    }
    let client = x.client.clone();
    let units = scan_units(&client);
    let blocks = rows.div_ceil(units * RUN);
    let dtype = dtype_to_storage_type(x.dtype);
    let grid = CubeCount::Static(blocks as u32, columns as u32, 1);
    let cube_dim = CubeDim::new_1d(units as u32);
    let offsets = if blocks == 1 {
        None
    } else {
        let totals = empty_like_shape(&x, Shape::new([blocks, columns]));
        block_totals_kernel::launch(
            &client,
            grid.clone(),
            cube_dim,
            x.clone().into_tensor_arg(),
            totals.clone().into_tensor_arg(),
            units,
            dtype,
        );
        Some(column_exclusive_scan(totals))
    };
    let with_offsets = offsets.is_some();
    // Without offsets the kernel does not read them; any tensor of the type will do.
    let offsets = offsets.unwrap_or_else(|| x.clone());
    block_scan_kernel::launch(
        &client,
        grid,
        cube_dim,
        x.into_tensor_arg(),
        offsets.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        units,
        with_offsets,
        dtype,
    );
    output
}

/// The rows `[start, end)` unit `unit` of block `CUBE_POS_X` sums.
#[cube]
fn unit_rows(rows: usize, #[comptime] units: usize) -> (usize, usize) {
    let first = (CUBE_POS_X as usize * units + UNIT_POS as usize) * RUN;
    let start = select(first < rows, first, rows);
    let end = select(first + RUN < rows, first + RUN, rows);
    (start, end)
}

/// The sum of each unit's rows of column `CUBE_POS_Y`, turned into exclusive prefixes over the
/// block's units in shared memory (unit 0 walks the `units` sums); returns this unit's
/// prefix and, to every unit, the block's total.
#[cube]
fn block_prefix<I: Int>(x: &Tensor<I>, #[comptime] units: usize) -> (I, I) {
    let column = CUBE_POS_Y as usize;
    let (start, end) = unit_rows(x.shape(0), units);
    let mut total = I::from_int(0);
    for row in start..end {
        total += x[row * x.stride(0) + column * x.stride(1)];
    }
    let mut prefix = Shared::<[I]>::new_slice(units + 1);
    prefix[UNIT_POS as usize] = total;
    sync_cube();
    if UNIT_POS == 0 {
        let mut running = I::from_int(0);
        for other in 0..units {
            let sum = prefix[other];
            prefix[other] = running;
            running += sum;
        }
        prefix[units] = running;
    }
    sync_cube();
    (prefix[UNIT_POS as usize], prefix[units])
}

/// One cube per (block, column) of `units` units: the block's column total, `totals[b, c]`.
/// Each unit reads `RUN` elements.
#[cube(launch)]
fn block_totals_kernel<I: Int>(
    x: &Tensor<I>,
    totals: &mut Tensor<I>,
    #[comptime] units: usize,
    #[define(I)] _dtype: ElemType,
) {
    let (_, total) = block_prefix(x, units);
    if UNIT_POS == 0 {
        let row_stride = totals.stride(0);
        totals[CUBE_POS_X as usize * row_stride + CUBE_POS_Y as usize] = total;
    }
}

/// One cube per (block `b`, column `c`) of `units` units: unit `u` owns `RUN` consecutive rows
/// of the block; the units' sums become exclusive prefixes in shared memory, and each unit
/// writes its rows' prefixes from its own, plus `offsets[b, c]` (the earlier blocks' sum) when
/// `with_offsets`. Each unit reads its `RUN` elements twice and writes them once.
#[cube(launch)]
fn block_scan_kernel<I: Int>(
    x: &Tensor<I>,
    offsets: &Tensor<I>,
    y: &mut Tensor<I>,
    #[comptime] units: usize,
    #[comptime] with_offsets: bool,
    #[define(I)] _dtype: ElemType,
) {
    let column = CUBE_POS_Y as usize;
    let (mut running, _) = block_prefix(x, units);
    if with_offsets {
        running += offsets[CUBE_POS_X as usize * offsets.stride(0) + column * offsets.stride(1)];
    }
    let (start, end) = unit_rows(x.shape(0), units);
    let (y_row, y_column) = (y.stride(0), y.stride(1));
    for row in start..end {
        let value = x[row * x.stride(0) + column * x.stride(1)];
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
