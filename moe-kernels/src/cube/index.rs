//! Reading an index tensor whose out-of-range values name nothing.

use cubecl::prelude::*;

/// `index[position]` when it lies in `0..bound`, otherwise `bound`, the value that names
/// nothing: a padding slot's token in the gathers and scatter-adds, an out-of-range target's
/// class in the cross-entropy. Each caller then compares against `bound` once.
#[cube]
pub(super) fn index_within<I: Int>(index: &Tensor<I>, position: usize, bound: usize) -> usize {
    let value = index[position * index.stride(0)];
    let inside = value >= I::from_int(0) && usize::cast_from(value) < bound;
    select(inside, usize::cast_from(value), bound)
}
