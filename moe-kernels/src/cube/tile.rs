//! The tiled product the grouped and multi-head matmul kernels share ([`block_product`]): a
//! cube of `side x side` units computes a `side tm x side tn` block of `A · B`, stepping
//! through the inner dimension `STEP` at a time. Each step stages a `side tm x STEP` block of
//! `A` and a `STEP x side tn` block of `B` in shared memory as vectors of 4 (each unit stages
//! `tm STEP / 4 side` and `tn STEP / 4 side` vectors), then each unit multiplies its own
//! `tm x tn` patch (rows `tm ty..tm (ty + 1)`, columns `tn tx..tn (tx + 1)`) from registers:
//! per step of the inner dimension it reads `tm / 4 + tn / 4` vectors from shared memory for
//! `tm tn` multiply-adds.
//!
//! Products are formed in the operands' type and summed in f32: with f16 operands the
//! multiplies are f16 (half the conversions of widening each operand) and the sums keep f32's
//! precision. Operands are read through their strides, in the order that reads global memory
//! consecutively (along a row of a row-major operand, down a column of a transposed one), so
//! the backward pass's transposed views are read coalesced without a copy.

use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::CubeDim;

use crate::adapter::SHARED_MEMORY_BYTES;

/// The inner-dimension step: each staged block is `side t x STEP`.
pub(super) const STEP: usize = 16;
/// Values in one staged vector.
pub(super) const WIDTH: usize = 4;

/// A staged vector of 4 values.
pub(super) type Quad<F> = Vector<F, Const<4>>;

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
pub(super) struct Tiling {
    /// Units along each side of the cube.
    pub side: usize,
    /// Rows of each unit's patch.
    pub tm: usize,
    /// Columns of each unit's patch.
    pub tn: usize,
}

impl Tiling {
    /// The tiling for an output of about `rows` rows per group and `columns` columns on
    /// `client`'s device: patches no taller or wider than the output needs.
    pub(super) fn choose(client: &Client, rows: usize, columns: usize) -> Self {
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

    pub(super) fn block_rows(&self) -> usize {
        self.side * self.tm
    }

    pub(super) fn block_columns(&self) -> usize {
        self.side * self.tn
    }

    pub(super) fn cube_dim(&self) -> CubeDim {
        CubeDim::new_2d(self.side as u32, self.side as u32)
    }
}

/// One operand block's place in global memory: element `(m, s)` of the block (`m` along the
/// block's outer side, `s` along the inner dimension) is `source[base + m * m_stride + s *
/// s_stride]` for `m < m_count` and `s < s_count`, and zero beyond them.
#[derive(CubeType, Clone, Copy)]
pub(super) struct BlockView {
    /// Offset of element `(0, 0)`.
    pub base: usize,
    /// Step between consecutive `m`.
    pub m_stride: usize,
    /// Step between consecutive `s`.
    pub s_stride: usize,
    /// Valid `m` (the rest of the block is zero).
    pub m_count: usize,
    /// Valid `s`.
    pub s_count: usize,
}

/// Stages `block[s * extent / 4 + m / 4][m % 4] = view(m, s)` for `m < extent`, `s < STEP`:
/// each unit takes vectors of 4 consecutive `m`. Consecutive units take consecutive vectors
/// when `along_m` (the view's `m_stride` is 1), consecutive `s` otherwise, so that a warp's
/// reads fall on consecutive addresses.
#[cube]
fn stage<F: Float>(
    source: &Tensor<F>,
    view: BlockView,
    block: &mut Shared<[Quad<F>]>,
    #[comptime] extent: usize,
    #[comptime] along_m: bool,
    #[comptime] side: usize,
) {
    let unit = UNIT_POS as usize;
    let quads = comptime!(extent / WIDTH);
    #[unroll]
    for load in 0..comptime!(quads * STEP / (side * side)) {
        let element = unit + load * comptime!(side * side);
        let mut quad = element / STEP;
        let mut s = element % STEP;
        if along_m {
            quad = element % quads;
            s = element / quads;
        }
        let mut value = Quad::<F>::empty();
        #[unroll]
        for lane in 0..WIDTH {
            let m = quad * WIDTH + lane;
            let mut x = F::from_int(0);
            if m < view.m_count && s < view.s_count {
                x = source[view.base + m * view.m_stride + s * view.s_stride];
            }
            value.insert(lane, x);
        }
        block[s * quads + quad] = value;
    }
}

/// The unit's `tm x tn` patch of `A · B` for a cube's `side tm x side tn` block, in f32: `A`'s
/// block is `a_view` (`m` along the block's rows, `s` along the inner dimension, `s_count`
/// long) and `B`'s is `b_view` (`m` along its columns, `s` along the same inner dimension), staged `STEP` at a time
/// and multiplied. `a_along_m` / `b_along_m` say which side of each view is contiguous in
/// memory ([`stage`]). Every unit of the cube must call it (it synchronises the cube).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn block_product<F: Float>(
    a: &Tensor<F>,
    a_view: BlockView,
    b: &Tensor<F>,
    b_view: BlockView,
    #[comptime] side: usize,
    #[comptime] tm: usize,
    #[comptime] tn: usize,
    #[comptime] a_along_m: bool,
    #[comptime] b_along_m: bool,
) -> Array<Quad<f32>> {
    let mut a_block = Shared::<[Quad<F>]>::new_slice(comptime!(side * tm * STEP / WIDTH));
    let mut b_block = Shared::<[Quad<F>]>::new_slice(comptime!(side * tn * STEP / WIDTH));
    let mut sums = zero_sums(tm, tn);
    // The views' fields as plain values: the loop body reads them on every step.
    let (a_base, a_m_stride, a_s_stride, a_m_count) = (
        a_view.base,
        a_view.m_stride,
        a_view.s_stride,
        a_view.m_count,
    );
    let (b_base, b_m_stride, b_s_stride, b_m_count) = (
        b_view.base,
        b_view.m_stride,
        b_view.s_stride,
        b_view.m_count,
    );
    let inner = a_view.s_count;
    for s0 in range_stepped(0, inner, STEP) {
        let a_step = BlockView {
            base: a_base + s0 * a_s_stride,
            m_stride: a_m_stride,
            s_stride: a_s_stride,
            m_count: a_m_count,
            s_count: inner - s0,
        };
        let b_step = BlockView {
            base: b_base + s0 * b_s_stride,
            m_stride: b_m_stride,
            s_stride: b_s_stride,
            m_count: b_m_count,
            s_count: inner - s0,
        };
        stage(
            a,
            a_step,
            &mut a_block,
            comptime!(side * tm),
            a_along_m,
            side,
        );
        stage(
            b,
            b_step,
            &mut b_block,
            comptime!(side * tn),
            b_along_m,
            side,
        );
        sync_cube();
        multiply(&a_block, &b_block, &mut sums, tm, tn, side);
        sync_cube();
    }
    sums
}

/// `sums[i][j] += Σ_s a_block[s][tm ty + i] · b_block[s][tn tx + j]` over one staged step: the
/// unit's `tm x tn` patch, kept as `tm x tn / 4` vectors of f32 sums.
#[cube]
fn multiply<F: Float>(
    a_block: &Shared<[Quad<F>]>,
    b_block: &Shared<[Quad<F>]>,
    sums: &mut Array<Quad<f32>>,
    #[comptime] tm: usize,
    #[comptime] tn: usize,
    #[comptime] side: usize,
) {
    let (ty, tx) = (UNIT_POS_Y as usize, UNIT_POS_X as usize);
    let (a_quads, b_quads) = (comptime!(tm / WIDTH), comptime!(tn / WIDTH));
    let mut a = Array::<Quad<F>>::new(a_quads);
    let mut b = Array::<Quad<F>>::new(b_quads);
    #[unroll]
    for s in 0..STEP {
        #[unroll]
        for i in 0..a_quads {
            a[i] = a_block[s * comptime!(side * tm / WIDTH) + ty * a_quads + i];
        }
        #[unroll]
        for j in 0..b_quads {
            b[j] = b_block[s * comptime!(side * tn / WIDTH) + tx * b_quads + j];
        }
        #[unroll]
        for i in 0..tm {
            let a_value = Quad::<F>::new(a[comptime!(i / WIDTH)].extract(comptime!(i % WIDTH)));
            #[unroll]
            for j in 0..b_quads {
                let product = Quad::<f32>::cast_from(a_value * b[j]);
                sums[i * b_quads + j] += product;
            }
        }
    }
}

/// A zeroed `tm x tn` patch of f32 sums, as `tm x tn / 4` vectors.
#[cube]
fn zero_sums(#[comptime] tm: usize, #[comptime] tn: usize) -> Array<Quad<f32>> {
    let count = comptime!(tm * tn / WIDTH);
    let mut sums = Array::<Quad<f32>>::new(count);
    #[unroll]
    for i in 0..count {
        sums[i] = Quad::<f32>::new(0.0f32);
    }
    sums
}

/// Sum `(i, j)` of the patch.
#[cube]
pub(super) fn patch_sum(
    sums: &Array<Quad<f32>>,
    #[comptime] i: usize,
    #[comptime] j: usize,
    #[comptime] tn: usize,
) -> f32 {
    sums[comptime!(i * (tn / WIDTH) + j / WIDTH)].extract(comptime!(j % WIDTH))
}
