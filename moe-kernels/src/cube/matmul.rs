//! Attention's multi-head product on cube: `y[b, h] = x[b, h] · w[b, h]` for every batch entry
//! and head in one launch, the operands read through their strides and the output written in
//! the storage order asked for.
//!
//! Attention's queries, keys and values are `swap_dims` views of `[B, L, H, d]` projections,
//! and its context is merged back into `[B, L, H d]`. Burn's matmul copies such views into
//! contiguous tensors before multiplying and the merged context again after: on the tiny
//! preset, 12 of the 52 launches of an attention layer's forward and backward pass. This
//! kernel reads the views where they lie ([`super::tile`]'s staged blocks take any strides) and
//! stores the output as `[B, H, M, N]` or `[B, M, H, N]`, so neither the split nor the merge
//! copies anything.
//!
//! Work: `ceil(M / b tm) x ceil(N / b tn) x B H` cubes of `b x b` units ([`Tiling`]); one unit
//! does `ceil(K / 16)` steps of `16 tm tn` multiply-adds, summed in f32.
//!
//! The 2D and batched products keep Burn's matmul (autotuned, and fused with what follows it
//! under Burn's fusion): their operands are contiguous.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::wgpu::{CubeBackend, CubeTensor};
use burn::backend::TensorMetadata;
use burn::tensor::Shape;
use cubecl::prelude::*;
use cubecl::CubeCount;

use super::tile::{block_product, patch_sum, BlockView, Tiling};
use super::{computes_in_f32, empty_like_shape, GRID_AXIS};
use crate::matmul::MatmulBackend;

impl MatmulBackend for CubeBackend {
    fn multi_head_matmul(x: CubeTensor, w: CubeTensor, orders: [[usize; 4]; 3]) -> CubeTensor {
        let order = orders[0];
        let (x_shape, w_shape) = (x.shape(), w.shape());
        let [batch, heads, rows] = [x_shape[0], x_shape[1], x_shape[2]];
        let columns = w_shape[3];
        let products = batch * heads;
        if x.dtype != w.dtype || !computes_in_f32(x.dtype) || products > GRID_AXIS {
            return CubeBackend::float_matmul(x, w);
        }
        let logical = [batch, heads, rows, columns];
        let storage = Shape::new(order.map(|dim| logical[dim]));
        let stored = empty_like_shape(&x, storage);
        // The logical dimension `i` is storage dimension `axes[i]`.
        let mut axes = [0usize; 4];
        for (position, &dim) in order.iter().enumerate() {
            axes[dim] = position;
        }
        let output = CubeBackend::float_permute(stored, &axes);
        if products * rows * columns == 0 {
            return output;
        }
        let tiling = Tiling::choose(&x.client, rows, columns);
        let along = |t: &CubeTensor, dim: usize| t.meta.strides()[dim] == 1;
        let (x_along_rows, w_along_columns) = (!along(&x, 3) && along(&x, 2), along(&w, 3));
        let dtype = dtype_to_storage_type(x.dtype);
        // SAFETY: every read is guarded by the operands' shapes (`stage`), every write by the
        // output's, and the grid covers exactly the tiles and products the kernel checks for.
        unsafe {
            multi_head_matmul_kernel::launch_unchecked(
                &x.client.clone(),
                CubeCount::Static(
                    rows.div_ceil(tiling.block_rows()) as u32,
                    columns.div_ceil(tiling.block_columns()) as u32,
                    products as u32,
                ),
                tiling.cube_dim(),
                x.into_tensor_arg(),
                w.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                tiling.side,
                tiling.tm,
                tiling.tn,
                x_along_rows,
                w_along_columns,
                dtype,
            );
        }
        output
    }

    fn storage_order(x: &CubeTensor) -> Option<[usize; 4]> {
        let strides = x.meta.strides();
        if strides.len() != 4 {
            return Some([0, 1, 2, 3]);
        }
        // Largest stride first; a tie (a dimension of size 1) keeps the logical order.
        let mut order = [0, 1, 2, 3];
        order.sort_by_key(|&dim| std::cmp::Reverse(strides[dim]));
        Some(order)
    }
}

/// One cube per (row tile, column tile, product `b H + h`): accumulates `x[b, h, rows of the
/// tile] · w[b, h]` ([`block_product`]), each unit a `tm x tn` patch summed in f32, and writes it through the output's strides. `x_along_rows` /
/// `w_along_columns` say which side of each operand is contiguous in memory (the order its
/// blocks are read in).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn multi_head_matmul_kernel<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] side: usize,
    #[comptime] tm: usize,
    #[comptime] tn: usize,
    #[comptime] x_along_rows: bool,
    #[comptime] w_along_columns: bool,
    #[define(F)] _dtype: ElemType,
) {
    let (bm, bn) = (comptime!(side * tm), comptime!(side * tn));
    let (heads, rows, inner, columns) = (x.shape(1), x.shape(2), x.shape(3), w.shape(3));
    let product = CUBE_POS_Z as usize;
    let (b, h) = (product / heads, product % heads);
    let first_row = CUBE_POS_X as usize * bm;
    let first_column = CUBE_POS_Y as usize * bn;
    let (x_row, x_column) = (x.stride(2), x.stride(3));
    let (w_row, w_column) = (w.stride(2), w.stride(3));
    let x_view = BlockView {
        base: b * x.stride(0) + h * x.stride(1) + first_row * x_row,
        m_stride: x_row,
        s_stride: x_column,
        m_count: rows - first_row,
        s_count: inner,
    };
    let w_view = BlockView {
        base: b * w.stride(0) + h * w.stride(1) + first_column * w_column,
        m_stride: w_column,
        s_stride: w_row,
        m_count: columns - first_column,
        s_count: inner,
    };
    let sums = block_product(
        x,
        x_view,
        w,
        w_view,
        side,
        tm,
        tn,
        x_along_rows,
        w_along_columns,
    );
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let out_start = b * output.stride(0) + h * output.stride(1);
    let (out_row, out_column) = (output.stride(2), output.stride(3));
    #[unroll]
    for i in 0..tm {
        let row = first_row + ty * tm + i;
        #[unroll]
        for j in 0..tn {
            let column = first_column + tx * tn + j;
            if row < rows && column < columns {
                output[out_start + row * out_row + column * out_column] =
                    F::cast_from(patch_sum(&sums, i, j, tn));
            }
        }
    }
}
