//! The autodiff side of a one-input operation: one graph node that saves its input (or its
//! output) and calls the backend's own backward kernel.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::Backend;

/// `grad_x = backward(saved, grad_y)` for `y = f(x)`, where `saved` is `x` or `y`.
type BackwardKernel<B> = fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>;

/// The backward step of a one-input operation, from its saved input or output.
#[derive(Debug)]
struct UnaryBackward<B: Backend> {
    backward: BackwardKernel<B>,
}

impl<B: Backend> Backward<B, 1> for UnaryBackward<B> {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [input_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = input_node {
            grads.register::<B>(node.id, (self.backward)(ops.state, grad));
        }
    }
}

/// What the backward kernel of a one-input operation is given besides the gradient.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Saved {
    /// The input `x` (element-wise operations: `grad_x = grad_y f'(x)`).
    Input,
    /// The output `y` (operations such as softmax, whose gradient is simplest in terms of it).
    Output,
}

/// Runs `forward` on the inner backend and, when `x` is tracked, records one node whose
/// backward pass is `backward(saved, grad)`, `saved` being `x` or `y` as `saved` says.
pub(crate) fn unary<B: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    forward: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
    backward: BackwardKernel<B>,
    saved: Saved,
) -> FloatTensor<Autodiff<B, C>> {
    match (UnaryBackward { backward })
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => match saved {
            Saved::Input => {
                let input = x.primitive().clone();
                let output = forward(input.clone());
                prep.finish(input, output)
            }
            Saved::Output => {
                let output = forward(x.into_primitive());
                prep.finish(output.clone(), output)
            }
        },
        OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
    }
}
