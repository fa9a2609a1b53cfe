//! Cross-entropy of logits against target classes, one operation with its own backward pass.
//!
//! For each row `r` of `x: [rows, classes]` with target `t = targets[r]`:
//! `loss[r] = -ln softmax(x[r])[t] = ln Σ_j e^{x[r, j]} - x[r, t]` (computed as
//! `m + ln Σ_j e^{x[r, j] - m} - x[r, t]`, `m = max_j x[r, j]`), and
//! `grad_x[r, j] = grad_loss[r] (e^{x[r, j] - lse[r]} - [j = t])`, where `lse[r]` is the
//! log-normaliser `ln Σ_j e^{x[r, j]}` that the forward pass keeps (one number per row).
//!
//! Composed as `log_softmax` then `gather`, the loss writes a `[rows, classes]` tensor of
//! log-probabilities forward, and backward zero-fills another `[rows, classes]` tensor for the
//! gather's gradient before the log-softmax's backward pass reads both. Here the forward pass
//! writes `2 · rows` numbers and the backward pass writes the gradient once; flex runs each
//! direction as one parallel pass over the rows ([`CrossEntropyBackend`]).

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, TensorMetadata};
use burn::tensor::ops::IndexingUpdateOp;
use burn::tensor::{Int, Shape, Tensor};
use moe_macros::moe_extension;

/// `-ln softmax(logits[r])[targets[r]]` for each row `r` of `logits: [rows, classes]`, as
/// `[rows]`; differentiable in `logits`. Average it (over the rows that count) for the usual
/// loss.
///
/// # Panics
///
/// If `targets` is not `[rows]`, or (on flex; other backends follow their `gather`) a target is
/// outside `0..classes`.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [rows, _] = logits.dims();
    assert!(
        targets.dims() == [rows],
        "cross_entropy: logits are {:?} but targets {:?}; expected [rows, classes] and [rows]",
        logits.dims(),
        targets.dims()
    );
    Tensor::from_dispatch(<Dispatch as CrossEntropyBackend>::cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// Backends that compute a cross-entropy as one operation. The default bodies compose Burn's
/// ops (correct everywhere); flex overrides both with one pass over the rows, cube with one
/// launch each.
#[moe_extension(fusion)]
pub trait CrossEntropyBackend: Backend {
    /// [`cross_entropy`]: the loss of each row, `[rows]`.
    #[fusion(default)]
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::cross_entropy_forward(logits, targets).0
    }

    /// `(loss, lse)`, both `[rows]`: the loss of each row and its log-normaliser
    /// `ln Σ_j e^{logits[r, j]}`, which the backward pass needs.
    #[fusion(meta = |logits, _targets| (rows_like(logits), rows_like(logits)))]
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_cross_entropy_forward::<Self>(logits, targets)
    }

    /// `grad[r] (e^{logits[r, j] - lse[r]} - [j = targets[r]])`, `[rows, classes]`: the
    /// gradient of [`cross_entropy`](Self::cross_entropy) with respect to `logits`, given the
    /// gradient `grad: [rows]` of its output.
    #[fusion(dtype = logits, shape = logits)]
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_cross_entropy_backward::<Self>(logits, lse, targets, grad)
    }
}

/// [`CrossEntropyBackend::cross_entropy_forward`] from Burn's ops: the row maximum, the sum
/// of the shifted exponentials, and a `gather` of the target logits.
pub(crate) fn composed_cross_entropy_forward<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let rows = logits.shape()[0];
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_sub(logits.clone(), max.clone());
    let sum = B::float_sum_dim(B::float_exp(shifted), 1);
    let lse = B::float_add(max, B::float_log(sum));
    let picked = B::float_gather(1, logits, column::<B>(targets, rows));
    let loss = B::float_sub(lse.clone(), picked);
    (
        B::float_reshape(loss, Shape::new([rows])),
        B::float_reshape(lse, Shape::new([rows])),
    )
}

/// [`CrossEntropyBackend::cross_entropy_backward`] from Burn's ops: the probabilities scaled
/// by the row's gradient, then `-grad[r]` scatter-added at each row's target.
pub(crate) fn composed_cross_entropy_backward<B: Backend>(
    logits: FloatTensor<B>,
    lse: FloatTensor<B>,
    targets: IntTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let rows = logits.shape()[0];
    let lse = B::float_reshape(lse, Shape::new([rows, 1]));
    let grad = B::float_reshape(grad, Shape::new([rows, 1]));
    let probs = B::float_exp(B::float_sub(logits, lse));
    let scaled = B::float_mul(probs, grad.clone());
    B::float_scatter(
        1,
        scaled,
        column::<B>(targets, rows),
        B::float_neg(grad),
        IndexingUpdateOp::Add,
    )
}

/// `[rows]` indices as `[rows, 1]`, for `gather` and `scatter` along dimension 1.
fn column<B: Backend>(targets: IntTensor<B>, rows: usize) -> IntTensor<B> {
    B::int_reshape(targets, Shape::new([rows, 1]))
}

#[cfg(feature = "ndarray")]
impl CrossEntropyBackend for burn::backend::NdArray {}

/// The spec of a `[rows]` tensor of `logits`' dtype (the fused forward pass's outputs).
#[cfg(feature = "wgpu")]
fn rows_like(
    logits: &burn::backend::fusion::custom::TensorSpec,
) -> burn::backend::fusion::custom::TensorSpec {
    burn::backend::fusion::custom::TensorSpec::new(Shape::new([logits.shape[0]]), logits.dtype)
}

/// The backward step of [`cross_entropy`]: the logits, their log-normalisers and the targets.
#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: Backend + CrossEntropyBackend> Backward<B, 1> for CrossEntropyBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (logits, lse, targets) = ops.state;
        let [logits_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = logits_node {
            grads.register::<B>(
                node.id,
                B::cross_entropy_backward(logits, lse, targets, grad),
            );
        }
    }
}

impl<B: Backend + CrossEntropyBackend, C: CheckpointStrategy> CrossEntropyBackend
    for Autodiff<B, C>
{
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = logits.into_primitive();
                let (loss, lse) = B::cross_entropy_forward(logits.clone(), targets.clone());
                prep.finish((logits, lse, targets), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::cross_entropy(logits.into_primitive(), targets))
            }
        }
    }
}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl CrossEntropyBackend for burn::backend::Remote {}
