use burn::config::Config;
use burn::tensor::Distribution;
use moe_kernels::softmax;

use super::{top_k_indices, GateInput, GateOutput};
use crate::error::{check_unit_interval, MoeError};
use crate::RoutingMode;

/// Switch Transformer's top-1 gate.
///
/// In training the router input is jittered, `x' = x * U(1 - eps, 1 + eps)` (elementwise,
/// the paper's form; the experts still see `x`). Then `p = softmax(x' W)`, the token goes to
/// `e = argmax p` with weight `p_e`. Capacity is `ceil(S / E * capacity_factor)`.
///
/// Balancing loss: `E * sum_e f_e * P_e`, `f_e` the fraction of tokens sent to `e`, `P_e` the
/// mean router probability; the layer multiplies it by `losses.balance_weight` (the paper's
/// `alpha = 0.01`).
///
/// Fedus, Zoph, Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
/// and Efficient Sparsity" (2021), section 2.
#[derive(Config, Debug, PartialEq)]
pub struct SwitchGate {
    /// Multiplicative jitter `eps` on the router input in training; 0 turns it off.
    #[config(default = 0.01)]
    pub jitter: f64,
}

impl SwitchGate {
    pub(crate) fn validate(&self) -> Result<(), MoeError> {
        check_unit_interval("gate.jitter", self.jitter)
    }

    pub(crate) fn route(&self, input: GateInput<'_>) -> GateOutput {
        let x = input.x;
        let router_input = if input.mode == RoutingMode::Train && self.jitter > 0.0 {
            let jitter = x.random_like(Distribution::Uniform(1.0 - self.jitter, 1.0 + self.jitter));
            x * jitter
        } else {
            x
        };
        let logits = input.router.logits(router_input);
        let probs = softmax(logits.clone(), 1);
        let indices = top_k_indices(input.router.selection_scores(logits.clone()), 1);
        let chosen = probs.clone().gather(1, indices.clone());
        GateOutput::token_choice(logits, probs, indices, chosen)
    }
}
