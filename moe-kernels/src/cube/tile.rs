//! The tiled product the grouped matmul kernels share: a cube of `side x side` units computes a
//! `side tm x side tn` block of `A · B`, stepping through the inner dimension `STEP` at a
//! time. Each step stages a `side tm x STEP` block of `A` and a `STEP x side tn` block of `B`
//! in shared memory as vectors of 4 (each unit stages `tm STEP / 4 side` and
//! `tn STEP / 4 side` vectors), then each unit multiplies its own `tm x tn` patch (rows
//! `tm ty..tm (ty + 1)`, columns `tn tx..tn (tx + 1)`) from registers: per step of the inner
//! dimension it reads `tm / 4 + tn / 4` vectors from shared memory for `tm tn` multiply-adds.
//!
//! Products are formed in the operands' type and summed in f32: with f16 operands the
//! multiplies are f16 (half the conversions of widening each operand) and the sums keep f32's
//! precision. Operands are read through their strides, in the order that reads global memory
//! consecutively (along a row of a row-major operand, down a column of a transposed one), so
//! the backward pass's transposed views are read coalesced without a copy.

use cubecl::prelude::*;

/// The inner-dimension step: each staged block is `side t x STEP`.
pub(super) const STEP: usize = 16;
/// Values in one staged vector.
pub(super) const WIDTH: usize = 4;

/// A staged vector of 4 values.
pub(super) type Quad<F> = Vector<F, Const<4>>;

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
pub(super) fn stage<F: Float>(
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

/// `sums[i][j] += Σ_s a_block[s][tm ty + i] · b_block[s][tn tx + j]` over one staged step: the
/// unit's `tm x tn` patch, kept as `tm x tn / 4` vectors of f32 sums.
#[cube]
pub(super) fn multiply<F: Float>(
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
pub(super) fn zero_sums(#[comptime] tm: usize, #[comptime] tn: usize) -> Array<Quad<f32>> {
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
