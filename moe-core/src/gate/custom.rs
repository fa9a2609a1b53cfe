//! The extension point for routing functions of the user's own.

use std::fmt::Debug;
use std::sync::Arc;

use super::{GateInput, GateOutput};

/// A routing function of your own, plugged into the same dispatch, capacity limits, losses and
/// statistics as the built-in gates ([`crate::Moe::with_gate`]).
///
/// `route` reads the tokens (and, if it wants them, the layer's [`crate::Router`] parameters
/// and `top_k`) and returns a [`GateOutput`]: which experts each token asks for and with what
/// weight. Ask for at most `input.top_k` experts per token: a dropless layer's buffer has
/// `tokens * top_k` rows. Build the output with the helpers the built-in gates use:
/// [`top_k_indices`](super::top_k_indices), [`to_expert_matrix`](super::to_expert_matrix),
/// [`assignment_fraction`](super::assignment_fraction) and
/// [`crate::losses::load_balancing_loss`]. The gradient reaches whatever `weights` is computed
/// from.
///
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use moe_core::gate::{to_expert_matrix, top_k_indices, Gate, GateInput, GateOutput};
/// use moe_core::{ExpertConfig, MoeConfig};
///
/// /// DeepSeek-V3's scoring: sigmoid affinities, the top k renormalised; no balancing loss.
/// #[derive(Debug)]
/// struct SigmoidGate;
///
/// impl Gate for SigmoidGate {
///     fn route(&self, input: GateInput<'_>) -> GateOutput {
///         let logits = input.router.logits(input.x);
///         let scores = burn::tensor::activation::sigmoid(logits.clone());
///         let indices = top_k_indices(scores.clone(), input.top_k);
///         let chosen = scores.clone().gather(1, indices.clone());
///         let chosen = chosen.clone() / chosen.sum_dim(1);
///         let (weights, candidates) =
///             to_expert_matrix(indices, chosen, input.router.num_experts());
///         let probs = burn::tensor::activation::softmax(logits.clone(), 1);
///         GateOutput { logits, probs, candidates, weights, balance_loss: None }
///     }
/// }
///
/// let device = Device::default();
/// let moe = MoeConfig::new(16, 4, ExpertConfig::new(32))
///     .init(&device)
///     .unwrap()
///     .with_gate(SigmoidGate);
/// let out = moe.forward(Tensor::<2>::random([10, 16], Distribution::Default, &device));
/// assert_eq!(out.output.dims(), [10, 16]);
/// ```
pub trait Gate: Debug + Send + Sync {
    /// Routes `input.x`, `[tokens, d_model]`.
    fn route(&self, input: GateInput<'_>) -> GateOutput;

    /// Whether a token's routing depends only on that token, as a decoder needs (default:
    /// yes; a gate that compares tokens with each other must say no).
    fn is_causal(&self) -> bool {
        true
    }
}

/// A user's gate held by a layer: shared, so that cloning the layer (or the model) keeps it.
#[derive(Debug, Clone)]
pub struct CustomGate(pub Arc<dyn Gate>);

/// A shared gate routes as the gate it points to, so one gate can serve every layer of a model.
impl<G: Gate + ?Sized> Gate for Arc<G> {
    fn route(&self, input: GateInput<'_>) -> GateOutput {
        (**self).route(input)
    }

    fn is_causal(&self) -> bool {
        (**self).is_causal()
    }
}
