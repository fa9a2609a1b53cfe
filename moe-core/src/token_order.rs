//! The order in which an MoE layer's tokens compete for capacity.

use burn::tensor::{Bool, Tensor};

/// The order in which tokens compete for capacity: sequence position first, then batch row.
///
/// An input `[..., seq, d_model]` is flattened position-major (all first positions of the
/// batch, then all second positions, ...), so under [`DropPolicy::Position`] a token competes
/// only with tokens at the same or earlier positions: changing a later token of any sequence
/// never changes an earlier token's routing, which keeps decoders causal also in batches.
/// A `[tokens, d_model]` input keeps its order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenOrder {
    batch: usize,
    seq: usize,
}

impl TokenOrder {
    pub(crate) fn new(shape: &[usize]) -> Self {
        let rank = shape.len();
        if rank >= 3 {
            Self {
                batch: shape[..rank - 2].iter().product(),
                seq: shape[rank - 2],
            }
        } else {
            Self {
                batch: 1,
                seq: shape[0],
            }
        }
    }

    /// Whether position-major order differs from the input's order (otherwise the
    /// transposes below are skipped: they would copy for nothing).
    pub(crate) fn reorders(&self) -> bool {
        self.batch > 1 && self.seq > 1
    }

    /// `[..., seq, d] -> [seq * batch, d]`, position-major.
    pub(crate) fn flatten<const D: usize>(&self, x: Tensor<D>) -> Tensor<2> {
        let d_model = x.dims()[D - 1];
        if !self.reorders() {
            return x.reshape([self.batch * self.seq, d_model]);
        }
        x.reshape([self.batch, self.seq, d_model])
            .swap_dims(0, 1)
            .reshape([self.seq * self.batch, d_model])
    }

    /// The inverse of [`flatten`](Self::flatten), back to `shape`.
    pub(crate) fn unflatten<const D: usize>(&self, y: Tensor<2>, shape: [usize; D]) -> Tensor<D> {
        let d_model = shape[D - 1];
        if !self.reorders() {
            return y.reshape(shape);
        }
        y.reshape([self.seq, self.batch, d_model])
            .swap_dims(0, 1)
            .reshape(shape)
    }

    /// Per-token rows `[seq * batch, E]` (position-major) back to the input's token order.
    pub(crate) fn restore_rows(&self, rows: Tensor<2, Bool>) -> Tensor<2, Bool> {
        if !self.reorders() {
            return rows;
        }
        let [_, columns] = rows.dims();
        rows.reshape([self.seq, self.batch, columns])
            .swap_dims(0, 1)
            .reshape([self.batch * self.seq, columns])
    }
}
