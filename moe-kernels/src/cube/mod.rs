//! The cube backend's implementations of this crate's operations (wgpu, and every other
//! CubeCL runtime): kernels written in CubeCL, the language Burn's own kernels are written in.
//!
//! Each operation is implemented for [`CubeBackend`](burn::backend::wgpu::CubeBackend), the
//! unfused backend; the `Fusion` entry of its `#[backend_extension]` makes Burn's fusion
//! backend (what wgpu runs by default) record the operation lazily in its stream and call this
//! implementation when the stream runs. No kernel reads anything back to the host: sizes that
//! depend on the data (an expert's rows) are found on the device, and grids are sized for the
//! most work the data could ask for.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::wgpu::CubeTensor;
use burn::tensor::Shape;
use burn_cubecl::ops::numeric::{empty_device_contiguous_dtype, zeros_client};
use cubecl::client::Client;
use cubecl::ir::ElemType;
use cubecl::CubeCount;

mod adamw;
mod cross_entropy;
mod gather_scatter;
mod grouped_matmul;
mod index;
mod rms_norm;
mod rotary;
mod routing;
mod rows;
mod softmax;
mod tile;

/// The most cubes along one grid axis that every wgpu adapter accepts: kernels with one cube
/// per row spread larger counts over a second axis.
const GRID_AXIS: usize = 65_535;

/// One cube per row for `rows` rows, `GRID_AXIS` along x and the rest along y: the kernel
/// finds its row with [`cube_row`] (and stops past `rows`).
fn one_cube_per_row(rows: usize) -> CubeCount {
    CubeCount::Static(
        rows.min(GRID_AXIS) as u32,
        rows.div_ceil(GRID_AXIS) as u32,
        1,
    )
}

/// The row of this unit's cube in a grid laid out by [`one_cube_per_row`]:
/// `CUBE_POS_Y * GRID_AXIS + CUBE_POS_X`.
#[cubecl::cube]
fn cube_row() -> usize {
    use cubecl::prelude::*;
    CUBE_POS_Y as usize * GRID_AXIS + CUBE_POS_X as usize
}

/// The float and integer storage types of a kernel's `#[define(F, I)]`, in that order.
fn float_and_int_dtypes(float: &CubeTensor, int: &CubeTensor) -> [ElemType; 2] {
    [
        dtype_to_storage_type(float.dtype),
        dtype_to_storage_type(int.dtype),
    ]
}

/// Whether a kernel that computes in f32 serves `dtype`: f32 and the 16-bit floats (read and
/// written in their own type). f64, which some adapters have, keeps Burn's composed ops, which
/// compute in it.
fn computes_in_f32(dtype: burn::tensor::DType) -> bool {
    use burn::tensor::DType;
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// A new contiguous tensor of `like`'s dtype on its device, uninitialised.
fn empty_like_shape(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}

/// A new zero tensor of `like`'s dtype on its device (its rows may be padded: write it through
/// its strides).
fn zeros_like_shape(like: &CubeTensor, shape: Shape) -> CubeTensor {
    zeros_client(like.client.clone(), like.device.clone(), shape, like.dtype)
}

/// Units per cube for the kernels that share a scan in one cube: 256, or the largest power of
/// two the device allows in a cube (a CPU runtime may allow as few as its core count).
fn scan_units(client: &Client) -> usize {
    let limit = client
        .properties()
        .hardware
        .max_units_per_cube
        .clamp(1, 256);
    1 << (31 - limit.leading_zeros())
}
