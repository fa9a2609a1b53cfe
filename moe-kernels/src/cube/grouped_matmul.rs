//! The grouped (ragged) matmul on cube: tiled products over each group's rows, with the groups
//! found on the device.
//!
//! The offsets live on the device, so the host cannot say which tile belongs to which group.
//! The grid is sized for the most tiles any offsets can make (`ceil(S / rows) + E` row tiles:
//! each group adds at most one partial tile), and each cube finds its group by walking the
//! `E + 1` offsets (normalised as the [`crate::grouped_matmul`] docs say); the cubes left over
//! write the zeros of the padding rows and stop. The products themselves are
//! [`super::tile`]'s: a `b tm x b tn` block per cube from operands staged in shared memory,
//! summed in f32, read through their strides.
//!
//! The weight gradient sums over a group's rows, which the data may make long (a busy expert):
//! each group's rows are cut into chunks ([`Chunks`], 256 rows or more) that run on cubes of
//! their own, and a second launch adds each group's chunk sums in chunk order, so a busy expert
//! runs in parallel and the result does not depend on scheduling. The bias gradient (the
//! groups' row sums) is split the same way.
//!
//! Work per launch, for `S` rows, `K` inner, `N` output columns, `E` groups, chunks of `R`
//! rows and `C = ceil(S / R) + E` chunks at most:
//!
//! | kernel | cubes x units | most work of one unit |
//! |---|---|---|
//! | `grouped_matmul_kernel` | `(ceil(S / b tm) + E + 1) x ceil(N / b tn)` x `b²` | `E + 1` offsets; `ceil(K / 16)` steps of `16 tm tn` multiply-adds |
//! | `grouped_weight_grad_kernel` | `ceil(K / b tm) x ceil(N / b tn) x C` x `b²` | `E + 1` offsets; `R / 16` steps of `16 tm tn` multiply-adds |
//! | `chunk_column_sums_kernel` | `ceil(N / u) x C` x `u` | `E + 1` offsets; `R` additions |
//! | `reduce_chunks_kernel` | `ceil(K N / u) x E` x `u` | unit 0: `E + 1` offsets; each: its group's chunk count, `ceil(rows / R)`, additions |
//! | `grouped_bias_kernel` | `S` x `min(N, u)` | unit 0: `E + 1` offsets; each: `ceil(N / u)` additions |
//!
//! `b x b` units of `tm x tn` sums each ([`Tiling`]: 16 x 16 units of up to 8 x 8 on a GPU,
//! 8 x 8 of up to 16 x 16 on llvmpipe). The cubes of the first kernel past the groups' tiles
//! write the zeros of the rows no group covers (`tm tn` each). `u` is 256 (or fewer where the
//! device allows fewer). `R` is 256 unless the chunk sums would
//! pass 64 MB (`C K N` f32 values), in which case the chunks are longer and fewer.

use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

use burn::tensor::DType;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::tile::{multiply, patch_sum, stage, zero_sums, BlockView, Quad, STEP, WIDTH};
use super::{cube_row, empty_like_shape, float_and_int_dtypes, one_cube_per_row, scan_units};
use crate::adapter::SHARED_MEMORY_BYTES;
use crate::grouped_matmul::GroupedMatmulBackend;

/// How a product is tiled: a cube of `side x side` units, each computing a `tm x tn` patch,
/// so a cube's block is `side tm x side tn`.
///
/// On a GPU: 16 x 16 units of up to 8 x 8, the classic register-blocked SGEMM shape (64 f32
/// sums per thread). On a software rasteriser (llvmpipe, which runs a workgroup's invocations
/// as SIMD lanes of one CPU thread, every shared-memory read a gather): 8 x 8 units of up to
/// 16 x 16, the shape that measured fastest there (BENCHMARKS.md, W7): fewer invocations per
/// barrier and more multiply-adds per vector read. Patches shrink (to 4) where the output is
/// narrower than the block. `BURN_MOE_TILING=side,tm,tn` overrides it
/// (for measurements; tilings the kernels cannot run are ignored). The tiling changes speed,
/// never results beyond rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    side: usize,
    tm: usize,
    tn: usize,
}

impl Tiling {
    /// The tiling for an output of about `rows` rows per group and `columns` columns on
    /// `client`'s device: patches no taller or wider than the output needs.
    fn choose(client: &Client, rows: usize, columns: usize) -> Self {
        if let Some(tiling) = Self::overridden() {
            return tiling;
        }
        let software = client.properties().identity.physical.is_none();
        let (side, largest) = if software { (8, 16) } else { (16, 8) };
        // The smallest patch of whole vectors whose block covers `extent`, at most `largest`.
        let patch = |extent: usize| {
            let mut patch = WIDTH;
            while patch < largest && side * patch < extent {
                patch *= 2;
            }
            patch
        };
        Self {
            side,
            tm: patch(rows),
            tn: patch(columns),
        }
    }

    fn overridden() -> Option<Self> {
        let text = std::env::var("BURN_MOE_TILING").ok()?;
        let parts: Vec<usize> = text
            .split(',')
            .filter_map(|part| part.trim().parse().ok())
            .collect();
        let [side, tm, tn] = parts[..] else {
            return None;
        };
        let tiling = Self { side, tm, tn };
        tiling.runs().then_some(tiling)
    }

    /// Whether the kernels can run it: patches of whole vectors, at most 256 units, every
    /// unit staging whole vectors, and the two staged blocks within 16 KiB of f32.
    fn runs(&self) -> bool {
        let Self { side, tm, tn } = *self;
        let units = side * side;
        side > 0
            && tm % WIDTH == 0
            && tn % WIDTH == 0
            && tm > 0
            && tn > 0
            && units <= 256
            && (side * tm / WIDTH * STEP).is_multiple_of(units)
            && (side * tn / WIDTH * STEP).is_multiple_of(units)
            && side * (tm + tn) * STEP * 4 <= SHARED_MEMORY_BYTES as usize
    }

    fn block_rows(&self) -> usize {
        self.side * self.tm
    }

    fn block_columns(&self) -> usize {
        self.side * self.tn
    }

    fn cube_dim(&self) -> CubeDim {
        CubeDim::new_2d(self.side as u32, self.side as u32)
    }
}

/// Whether dimension `contiguous` of `tensor` is the one with stride 1 (read along it).
fn along(tensor: &CubeTensor, contiguous: usize) -> bool {
    tensor.meta.strides()[contiguous] == 1
}

impl GroupedMatmulBackend for CubeBackend {
    fn grouped_matmul(x: CubeTensor, w: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let (rows, experts, columns) = (x.shape()[0], w.shape()[0], w.shape()[2]);
        // Rows no group covers are zeroed by the cubes past the groups' tiles.
        let output = empty_like_shape(&x, Shape::new([rows, columns]));
        if rows * columns == 0 {
            return output;
        }
        let tiling = Tiling::choose(&x.client, rows / experts.max(1), columns);
        // The groups make at most `ceil(S / rows) + E` tiles, and the rows they leave
        // uncovered at most `ceil(uncovered / rows) + 1` more (before and after them).
        let row_tiles = rows.div_ceil(tiling.block_rows()) + experts + 1;
        let dtypes = float_and_int_dtypes(&x, &offsets);
        let (x_along_rows, w_along_columns) = (!along(&x, 1) && along(&x, 0), along(&w, 2));
        // SAFETY: every read and write is guarded by the tensors' own shapes (`stage`, and the
        // bounds on the stores), and the grid covers exactly the tiles the kernel checks for.
        unsafe {
            grouped_matmul_kernel::launch_unchecked(
                &x.client.clone(),
                CubeCount::Static(
                    row_tiles as u32,
                    columns.div_ceil(tiling.block_columns()) as u32,
                    1,
                ),
                tiling.cube_dim(),
                x.into_tensor_arg(),
                w.into_tensor_arg(),
                offsets.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                tiling.side,
                tiling.tm,
                tiling.tn,
                x_along_rows,
                w_along_columns,
                dtypes,
            );
        }
        output
    }

    fn grouped_weight_grad(x: CubeTensor, grad: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let (rows, inner, columns) = (x.shape()[0], x.shape()[1], grad.shape()[1]);
        let experts = offsets.shape()[0] - 1;
        // Every element is written (an empty group's block with zeros).
        let output = empty_like_shape(&x, Shape::new([experts, inner, columns]));
        if output.shape().num_elements() == 0 {
            return output;
        }
        let chunks = Chunks::new(rows, experts, inner * columns);
        let partial = chunks.partial_sums(&x, inner * columns);
        let dtypes = float_and_int_dtypes(&x, &offsets);
        let tiling = Tiling::choose(&x.client, inner, columns);
        let (x_along_columns, grad_along_columns) = (along(&x, 1), along(&grad, 1));
        // SAFETY: as in `grouped_matmul`: every access is guarded by the shapes.
        unsafe {
            grouped_weight_grad_kernel::launch_unchecked(
                &x.client.clone(),
                CubeCount::Static(
                    inner.div_ceil(tiling.block_rows()) as u32,
                    columns.div_ceil(tiling.block_columns()) as u32,
                    chunks.most as u32,
                ),
                tiling.cube_dim(),
                x.into_tensor_arg(),
                grad.into_tensor_arg(),
                offsets.clone().into_tensor_arg(),
                partial.clone().into_tensor_arg(),
                chunks.rows,
                tiling.side,
                tiling.tm,
                tiling.tn,
                x_along_columns,
                grad_along_columns,
                dtypes,
            );
        }
        chunks.reduce(partial, offsets, output, inner * columns)
    }

    fn grouped_bias(x: CubeTensor, bias: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let output = empty_like_shape(&x, x.shape());
        let (rows, columns) = (x.shape()[0], x.shape()[1]);
        if rows * columns == 0 {
            return output;
        }
        // One cube per row, its units along the columns (a power of two, at most 256).
        let units = columns.next_power_of_two().min(scan_units(&x.client));
        let dtypes = float_and_int_dtypes(&x, &offsets);
        grouped_bias_kernel::launch(
            &x.client.clone(),
            one_cube_per_row(rows),
            CubeDim::new_1d(units as u32),
            x.into_tensor_arg(),
            bias.into_tensor_arg(),
            offsets.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            units,
            dtypes,
        );
        output
    }

    fn grouped_row_sum(values: CubeTensor, offsets: CubeTensor) -> CubeTensor {
        let (rows, columns) = (values.shape()[0], values.shape()[1]);
        let experts = offsets.shape()[0] - 1;
        let output = empty_like_shape(&values, Shape::new([experts, columns]));
        if experts * columns == 0 {
            return output;
        }
        let chunks = Chunks::new(rows, experts, columns);
        let partial = chunks.partial_sums(&values, columns);
        let client = values.client.clone();
        let units = scan_units(&client);
        let dtypes = float_and_int_dtypes(&values, &offsets);
        chunk_column_sums_kernel::launch(
            &client,
            CubeCount::Static(columns.div_ceil(units) as u32, chunks.most as u32, 1),
            CubeDim::new_1d(units as u32),
            values.into_tensor_arg(),
            offsets.clone().into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            chunks.rows,
            dtypes,
        );
        chunks.reduce(partial, offsets, output, columns)
    }
}

/// How a sum over each group's rows is split: into chunks of `rows` consecutive rows of one
/// group (a group of `n` rows has `ceil(n / rows)` chunks), each summed by its own cubes into
/// an f32 partial sum, then the partial sums of each group added in chunk order. A busy group
/// runs on as many cubes as it has chunks, and the result does not depend on scheduling.
struct Chunks {
    /// Rows of the buffer, `S`.
    buffer_rows: usize,
    /// Rows of one chunk (a multiple of `STEP`).
    rows: usize,
    /// The most chunks any offsets can make: `ceil(S / rows) + E`.
    most: usize,
}

/// Rows of a chunk, at least.
const CHUNK_ROWS: usize = 256;
/// The most bytes the partial sums of one call may take; longer chunks keep them below.
const PARTIAL_BYTES: usize = 64 << 20;

impl Chunks {
    /// The chunks for `rows` rows in `experts` groups, whose partial sums have `elements`
    /// values each.
    fn new(rows: usize, experts: usize, elements: usize) -> Self {
        let budget = (PARTIAL_BYTES / (4 * elements.max(1))).max(experts + 1);
        let chunk_rows = rows
            .div_ceil(budget - experts)
            .max(CHUNK_ROWS)
            .next_multiple_of(STEP);
        Self {
            buffer_rows: rows,
            rows: chunk_rows,
            most: rows.div_ceil(chunk_rows) + experts,
        }
    }

    /// A new f32 tensor for the partial sums, `[most, elements]`, on `like`'s device.
    fn partial_sums(&self, like: &CubeTensor, elements: usize) -> CubeTensor {
        empty_device_contiguous_dtype(
            like.client.clone(),
            like.device.clone(),
            Shape::new([self.most, elements]),
            DType::F32,
        )
    }

    /// Adds each group's partial sums into `output` (`[E, elements]` values, contiguous; zero
    /// for an empty group).
    fn reduce(
        &self,
        partial: CubeTensor,
        offsets: CubeTensor,
        output: CubeTensor,
        elements: usize,
    ) -> CubeTensor {
        let experts = offsets.shape()[0] - 1;
        let client = output.client.clone();
        let units = scan_units(&client);
        let dtypes = float_and_int_dtypes(&output, &offsets);
        reduce_chunks_kernel::launch(
            &client,
            CubeCount::Static(elements.div_ceil(units) as u32, experts as u32, 1),
            CubeDim::new_1d(units as u32),
            partial.into_tensor_arg(),
            offsets.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            self.buffer_rows,
            self.rows,
            units,
            dtypes,
        );
        output
    }
}

/// `offsets[e]` as a row bound: clamped to `0..=rows`.
#[cube]
fn bound<I: Int>(offsets: &Tensor<I>, e: usize, rows: usize) -> usize {
    let value = offsets[e];
    let value = select(value < I::from_int(0), I::from_int(0), value);
    let value = usize::cast_from(value);
    select(value < rows, value, rows)
}

/// Where a tile of rows falls: the group it belongs to, or past the groups' tiles.
#[derive(CubeType, Clone, Copy)]
struct TilePlace {
    /// Its group, or `E` when the offsets make fewer tiles than its index.
    expert: usize,
    /// Its first row.
    first_row: usize,
    /// The end of its group's rows.
    group_end: usize,
    /// The tiles of all the groups together.
    tiles: usize,
    /// The first row any group covers, and the end of the last group: the rows before and
    /// after are padding.
    covered_start: usize,
    covered_end: usize,
}

/// Tile `tile` of the tiles of `tile_rows` rows each group is cut into (a group of `n` rows has
/// `ceil(n / tile_rows)`, numbered group after group). Reads the `E + 1` offsets.
// `#[cube]` code is expanded into CubeCL's IR, which has no `div_ceil`.
#[allow(clippy::manual_div_ceil)]
#[cube]
fn find_tile<I: Int>(offsets: &Tensor<I>, tile: usize, tile_rows: usize, rows: usize) -> TilePlace {
    let experts = offsets.shape(0) - 1;
    let mut expert = experts;
    let mut first_row = 0usize;
    let mut group_end = 0usize;
    let mut tiles_before = 0usize;
    let covered_start = bound(offsets, 0, rows);
    let mut start = covered_start;
    for e in 0..experts {
        let upper = bound(offsets, e + 1, rows);
        let end = select(upper > start, upper, start);
        let tiles = (end - start + tile_rows - 1) / tile_rows;
        if expert == experts && tile < tiles_before + tiles {
            expert = e;
            first_row = start + (tile - tiles_before) * tile_rows;
            group_end = end;
        }
        tiles_before += tiles;
        start = end;
    }
    TilePlace {
        expert,
        first_row,
        group_end,
        tiles: tiles_before,
        covered_start,
        covered_end: start,
    }
}

/// For a cube past the groups' tiles: writes zeros to its share of the rows no group covers
/// (those before `covered_start` and from `covered_end`), `16 tm` of them per cube, in the
/// cube's block of columns; so the output needs no zero fill of its own.
#[cube]
fn zero_uncovered_rows<F: Float>(
    output: &mut Tensor<F>,
    place: TilePlace,
    tile: usize,
    first_column: usize,
    #[comptime] side: usize,
    #[comptime] tm: usize,
    #[comptime] tn: usize,
) {
    let rows = output.shape(0);
    let columns = output.shape(1);
    let uncovered = place.covered_start + (rows - place.covered_end);
    let first = (tile - place.tiles) * comptime!(side * tm);
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let (out_row, out_column) = (output.stride(0), output.stride(1));
    #[unroll]
    for i in 0..tm {
        let index = first + ty * tm + i;
        if index < uncovered {
            let row = select(
                index < place.covered_start,
                index,
                place.covered_end + index - place.covered_start,
            );
            #[unroll]
            for j in 0..tn {
                let column = first_column + tx * tn + j;
                if column < columns {
                    output[row * out_row + column * out_column] = F::from_int(0);
                }
            }
        }
    }
}

/// `(chunks before group expert, chunks of group expert)` for chunks of `chunk_rows` rows
/// (see [`find_tile`]).
// `#[cube]` code is expanded into CubeCL's IR, which has no `div_ceil`.
#[allow(clippy::manual_div_ceil)]
#[cube]
fn group_chunks<I: Int>(
    offsets: &Tensor<I>,
    expert: usize,
    chunk_rows: usize,
    rows: usize,
) -> (usize, usize) {
    let mut before = 0usize;
    let mut own = 0usize;
    let mut start = bound(offsets, 0, rows);
    for e in 0..expert + 1 {
        let upper = bound(offsets, e + 1, rows);
        let end = select(upper > start, upper, start);
        let chunks = (end - start + chunk_rows - 1) / chunk_rows;
        if e == expert {
            own = chunks;
        } else {
            before += chunks;
        }
        start = end;
    }
    (before, own)
}

/// One cube per (row tile, column tile) of the output: finds the group of its row tile, then
/// accumulates `x[rows of the tile] · w[group]` over `K` in steps of `STEP` ([`tile`]), each
/// unit a `tm x tn` patch summed in f32. `x_along_rows` / `w_along_columns` say which side of
/// each operand is contiguous in memory (the order its blocks are read in).
#[cube(launch_unchecked)]
fn grouped_matmul_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    offsets: &Tensor<I>,
    output: &mut Tensor<F>,
    #[comptime] side: usize,
    #[comptime] tm: usize,
    #[comptime] tn: usize,
    #[comptime] x_along_rows: bool,
    #[comptime] w_along_columns: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let (bm, bn) = (comptime!(side * tm), comptime!(side * tn));
    let rows = x.shape(0);
    let inner = x.shape(1);
    let columns = w.shape(2);
    let tile = CUBE_POS_X as usize;
    let place = find_tile(offsets, tile, bm, rows);
    let (expert, first_row, group_end) = (place.expert, place.first_row, place.group_end);
    let first_column = CUBE_POS_Y as usize * bn;
    if expert == w.shape(0) {
        zero_uncovered_rows(output, place, tile, first_column, side, tm, tn);
        terminate!();
    }
    let (x_row, x_column) = (x.stride(0), x.stride(1));
    let (w_row, w_column) = (w.stride(1), w.stride(2));
    let w_start = expert * w.stride(0) + first_column * w_column;
    let mut x_block = Shared::<[Quad<F>]>::new_slice(comptime!(side * tm * STEP / WIDTH));
    let mut w_block = Shared::<[Quad<F>]>::new_slice(comptime!(side * tn * STEP / WIDTH));
    let mut sums = zero_sums(tm, tn);
    for k0 in range_stepped(0, inner, STEP) {
        let x_view = BlockView {
            base: first_row * x_row + k0 * x_column,
            m_stride: x_row,
            s_stride: x_column,
            m_count: group_end - first_row,
            s_count: inner - k0,
        };
        let w_view = BlockView {
            base: w_start + k0 * w_row,
            m_stride: w_column,
            s_stride: w_row,
            m_count: columns - first_column,
            s_count: inner - k0,
        };
        stage(x, x_view, &mut x_block, bm, x_along_rows, side);
        stage(w, w_view, &mut w_block, bn, w_along_columns, side);
        sync_cube();
        multiply(&x_block, &w_block, &mut sums, tm, tn, side);
        sync_cube();
    }
    // Through the strides: the zero-filled output may have padded rows.
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let (out_row, out_column) = (output.stride(0), output.stride(1));
    #[unroll]
    for i in 0..tm {
        let row = first_row + ty * tm + i;
        #[unroll]
        for j in 0..tn {
            let column = first_column + tx * tn + j;
            if row < group_end && column < columns {
                output[row * out_row + column * out_column] =
                    F::cast_from(patch_sum(&sums, i, j, tn));
            }
        }
    }
}

/// One cube per (row tile of `K`, column tile of `N`, chunk): the chunk's share of its group's
/// `x[rows]ᵀ · grad[rows]`, summed over its at most `chunk_rows` rows in steps of `STEP`
/// ([`tile`]), each unit a `tm x tn` patch, in f32, into `partial[chunk]` (`[K, N]` values).
/// The cubes of chunks the offsets do not make stop at once.
#[cube(launch_unchecked)]
fn grouped_weight_grad_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    offsets: &Tensor<I>,
    partial: &mut Tensor<f32>,
    chunk_rows: usize,
    #[comptime] side: usize,
    #[comptime] tm: usize,
    #[comptime] tn: usize,
    #[comptime] x_along_columns: bool,
    #[comptime] grad_along_columns: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let (bm, bn) = (comptime!(side * tm), comptime!(side * tn));
    let rows = x.shape(0);
    let inner = x.shape(1);
    let columns = grad.shape(1);
    let chunk = CUBE_POS_Z as usize;
    let place = find_tile(offsets, chunk, chunk_rows, rows);
    if place.expert == offsets.shape(0) - 1 {
        terminate!();
    }
    let (start, group_end) = (place.first_row, place.group_end);
    let end = select(
        start + chunk_rows < group_end,
        start + chunk_rows,
        group_end,
    );
    let first_k = CUBE_POS_X as usize * bm;
    let first_column = CUBE_POS_Y as usize * bn;
    let (x_row, x_column) = (x.stride(0), x.stride(1));
    let (grad_row, grad_column) = (grad.stride(0), grad.stride(1));
    let mut x_block = Shared::<[Quad<F>]>::new_slice(comptime!(side * tm * STEP / WIDTH));
    let mut grad_block = Shared::<[Quad<F>]>::new_slice(comptime!(side * tn * STEP / WIDTH));
    let mut sums = zero_sums(tm, tn);
    for r0 in range_stepped(start, end, STEP) {
        // The inner dimension is the rows: x's block is its transpose.
        let x_view = BlockView {
            base: r0 * x_row + first_k * x_column,
            m_stride: x_column,
            s_stride: x_row,
            m_count: inner - first_k,
            s_count: end - r0,
        };
        let grad_view = BlockView {
            base: r0 * grad_row + first_column * grad_column,
            m_stride: grad_column,
            s_stride: grad_row,
            m_count: columns - first_column,
            s_count: end - r0,
        };
        stage(x, x_view, &mut x_block, bm, x_along_columns, side);
        stage(
            grad,
            grad_view,
            &mut grad_block,
            bn,
            grad_along_columns,
            side,
        );
        sync_cube();
        multiply(&x_block, &grad_block, &mut sums, tm, tn, side);
        sync_cube();
    }
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    #[unroll]
    for i in 0..tm {
        let k = first_k + ty * tm + i;
        #[unroll]
        for j in 0..tn {
            let column = first_column + tx * tn + j;
            if k < inner && column < columns {
                partial[(chunk * inner + k) * columns + column] = patch_sum(&sums, i, j, tn);
            }
        }
    }
}

/// One unit per (column, chunk): the sum of the column over the chunk's at most `chunk_rows`
/// rows, in row order, in f32, into `partial[chunk]` (`[N]` values).
#[cube(launch)]
fn chunk_column_sums_kernel<F: Float, I: Int>(
    values: &Tensor<F>,
    offsets: &Tensor<I>,
    partial: &mut Tensor<f32>,
    chunk_rows: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let columns = values.shape(1);
    let column = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let chunk = CUBE_POS_Y as usize;
    let place = find_tile(offsets, chunk, chunk_rows, values.shape(0));
    if place.expert == offsets.shape(0) - 1 || column >= columns {
        terminate!();
    }
    let (start, group_end) = (place.first_row, place.group_end);
    let end = select(
        start + chunk_rows < group_end,
        start + chunk_rows,
        group_end,
    );
    let mut sum = 0.0f32;
    for row in start..end {
        sum += f32::cast_from(values[row * values.stride(0) + column * values.stride(1)]);
    }
    partial[chunk * columns + column] = sum;
}

/// One cube per (run of `units` elements, group `e`): `output[e] = Σ_c partial[c]` over the
/// group's chunks `c`, in chunk order, in f32 (zero for an empty group). Unit 0 finds the
/// group's chunks for the cube.
#[cube(launch)]
fn reduce_chunks_kernel<F: Float, I: Int>(
    partial: &Tensor<f32>,
    offsets: &Tensor<I>,
    output: &mut Tensor<F>,
    rows: usize,
    chunk_rows: usize,
    #[comptime] units: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let expert = CUBE_POS_Y as usize;
    let elements = partial.shape(1);
    let mut range = Shared::<[u32]>::new_slice(2usize);
    if UNIT_POS == 0 {
        let (before, own) = group_chunks(offsets, expert, chunk_rows, rows);
        range[0] = u32::cast_from(before);
        range[1] = u32::cast_from(own);
    }
    sync_cube();
    let element = CUBE_POS_X as usize * units + UNIT_POS as usize;
    if element >= elements {
        terminate!();
    }
    let (first, count) = (range[0] as usize, range[1] as usize);
    let mut sum = 0.0f32;
    for c in 0..count {
        sum += partial[(first + c) * elements + element];
    }
    output[expert * elements + element] = F::cast_from(sum);
}

/// One cube per row (`CUBE_POS_Y * 65,535 + CUBE_POS_X`), its `units` units along the
/// columns: unit 0 finds the row's group, then each unit adds the group's bias to the columns
/// `u, u + units, ...` (rows in no group are copied).
#[cube(launch)]
fn grouped_bias_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    bias: &Tensor<F>,
    offsets: &Tensor<I>,
    output: &mut Tensor<F>,
    #[comptime] units: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let rows = x.shape(0);
    let row = cube_row();
    if row >= rows {
        terminate!();
    }
    let experts = bias.shape(0);
    let mut group = Shared::<[u32]>::new_slice(1usize);
    if UNIT_POS == 0 {
        let mut expert = experts;
        let mut start = bound(offsets, 0, rows);
        for e in 0..experts {
            let upper = bound(offsets, e + 1, rows);
            let end = select(upper > start, upper, start);
            if row >= start && row < end {
                expert = e;
            }
            start = end;
        }
        group[0] = u32::cast_from(expert);
    }
    sync_cube();
    let expert = group[0] as usize;
    let columns = x.shape(1);
    for column in range_stepped(UNIT_POS as usize, columns, units) {
        let mut value = x[row * x.stride(0) + column * x.stride(1)];
        if expert < experts {
            value += bias[expert * bias.stride(0) + column * bias.stride(1)];
        }
        output[row * columns + column] = value;
    }
}
