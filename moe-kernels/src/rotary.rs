//! Rotary position encoding (Su et al., "RoFormer", 2021) as one operation.
//!
//! Each pair `(a, b) = (x[2i], x[2i + 1])` of a row at position `p` is turned by the angle
//! `θ_i p`:
//!
//! `y[2i] = a cos θ_i p - b sin θ_i p`, `y[2i + 1] = a sin θ_i p + b cos θ_i p`
//!
//! (the pairing of Burn's `RotaryEncoding`). The rotation is orthogonal, so the gradient is the
//! same rotation by `-θ_i p`: the backward pass keeps only the `[positions, d / 2]` tables, no
//! activation. Burn's `RotaryEncoding::apply` builds it from a batched matmul with a `[2, 4]`
//! sign matrix, a product with a `[positions, d, 2]` table and a sum, each an autodiff node that
//! keeps a tensor twice the input's size; flex runs it as one pass ([`RotaryBackend`]).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, TensorMetadata};
use burn::tensor::{Shape, Slice, Tensor};
use moe_macros::moe_extension;

/// `x: [..., positions, d]` with each pair `(x[2i], x[2i + 1])` of the row at position `p`
/// rotated by the angle whose cosine and sine are `cos[p, i mod pairs]` and
/// `sin[p, i mod pairs]` (`[positions, pairs]` each, `pairs` dividing `d / 2`), differentiable
/// in `x` (the tables are constants). Tables shorter than the row serve rows that hold several
/// heads side by side: `d = heads x 2 pairs`, every head rotated alike.
///
/// # Panics
///
/// If `x` has fewer than two dimensions, or its last two are not `[positions, 2 k pairs]`
/// (`k >= 1`) for tables of shape `[positions, pairs]`.
pub fn rotary<const D: usize>(x: Tensor<D>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    assert!(
        D >= 2,
        "rotary: x must have a position and a feature dimension"
    );
    let [positions, pairs] = cos.dims();
    let fits = pairs > 0 && dims[D - 1] > 0 && dims[D - 1].is_multiple_of(2 * pairs);
    assert!(
        sin.dims() == [positions, pairs] && dims[D - 2] == positions && fits,
        "rotary: x is {dims:?}, cos {:?} and sin {:?}; expected [.., positions, 2 k pairs] \
         (k >= 1) and [positions, pairs] twice",
        cos.dims(),
        sin.dims()
    );
    Tensor::from_dispatch(<Dispatch as RotaryBackend>::rotate_pairs(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        false,
    ))
}

/// Backends that rotate feature pairs as one operation (see [`rotary`]). The default body
/// composes Burn's ops (correct everywhere); flex overrides it with one pass over the rows,
/// cube with one launch.
#[moe_extension(fusion)]
pub trait RotaryBackend: Backend {
    /// `x: [..., positions, 2 k pairs]` with pair `i` of the row at position `p` rotated by
    /// the angle of cosine `cos[p, i mod pairs]` and sine `sin[p, i mod pairs]`, or by its
    /// opposite (the sine negated) when `inverse`: that undoes the rotation, and is also its
    /// gradient.
    #[fusion(dtype = x, shape = x)]
    fn rotate_pairs(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        composed_rotate_pairs::<Self>(x, cos, sin, inverse)
    }
}

/// [`RotaryBackend::rotate_pairs`] from Burn's ops: `y = x ⊙ C + swap(x) ⊙ S`, where
/// `swap` exchanges the two members of each pair, `C` repeats each cosine twice and `S` holds
/// `(-sin, sin)` for each pair (`(sin, -sin)` for the inverse), both broadcast over the `k`
/// groups of `pairs` pairs in a row.
pub(crate) fn composed_rotate_pairs<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    inverse: bool,
) -> FloatTensor<B> {
    let sin = if inverse { B::float_neg(sin) } else { sin };
    let shape = x.shape();
    let [positions, pairs] = [cos.shape()[0], cos.shape()[1]];
    let groups = shape[shape.num_dims() - 1] / (2 * pairs).max(1);
    let rows = shape.num_elements() / (2 * positions * groups * pairs).max(1);
    let column = |t: FloatTensor<B>| B::float_reshape(t, Shape::new([1, positions, 1, pairs, 1]));
    let both = B::float_cat(vec![column(cos.clone()), column(cos)], 4);
    let signed = B::float_cat(vec![column(B::float_neg(sin.clone())), column(sin)], 4);
    let x = B::float_reshape(x, Shape::new([rows, positions, groups, pairs, 2]));
    // The pair's members exchanged by two slices (not `float_flip`, which Burn 0.22.1's
    // remote backend cannot run: its server fails with "expected int handle").
    let member = |i: usize| {
        let all = |n: usize| Slice::new(0, Some(n as isize), 1);
        let slices = [
            all(rows),
            all(positions),
            all(groups),
            all(pairs),
            Slice::new(i as isize, Some(i as isize + 1), 1),
        ];
        B::float_slice(x.clone(), &slices)
    };
    let swapped = B::float_cat(vec![member(1), member(0)], 4);
    let y = B::float_add(B::float_mul(x, both), B::float_mul(swapped, signed));
    B::float_reshape(y, shape)
}

#[cfg(feature = "ndarray")]
impl RotaryBackend for burn::backend::NdArray {}

/// The backward step of [`rotary`]: the inverse rotation of the output's gradient.
#[derive(Debug)]
struct RotaryBackward;

impl<B: Backend + RotaryBackend> Backward<B, 1> for RotaryBackward {
    /// The tables `(cos, sin)` and whether the forward rotation was the inverse one.
    type State = (FloatTensor<B>, FloatTensor<B>, bool);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (cos, sin, inverse) = ops.state;
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rotate_pairs(grad, cos, sin, !inverse));
        }
    }
}

impl<B: Backend + RotaryBackend, C: CheckpointStrategy> RotaryBackend for Autodiff<B, C> {
    fn rotate_pairs(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RotaryBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::rotate_pairs(x.into_primitive(), cos.clone(), sin.clone(), inverse);
                prep.finish((cos, sin, inverse), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::rotate_pairs(x.into_primitive(), cos, sin, inverse))
            }
        }
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl RotaryBackend for burn::backend::Remote {}
