use burn::config::Config;
use moe_kernels::softmax;

use super::{top_k_indices, GateInput, GateOutput};

/// FastMoE's default ("naive") gate: take the `k` largest router logits and softmax over them.
///
/// `idx = top_k(x W)`, `g = softmax((x W)[idx])`
///
/// No noise and no balancing of its own; its balancing loss is the Switch loss over all `k`
/// choices, `E * sum_e f_e * P_e` with `f_e` the fraction of assignments sent to `e` (weight it
/// to zero with `losses.balance_weight = 0` to get FastMoE's behaviour exactly).
///
/// He et al., "FastMoE: A Fast Mixture-of-Expert Training System" (2021).
#[derive(Config, Debug, PartialEq)]
pub struct NaiveGate {}

impl NaiveGate {
    pub(crate) fn route(&self, input: GateInput<'_>) -> GateOutput {
        let logits = input.router.logits(input.x);
        let indices = top_k_indices(input.router.selection_scores(logits.clone()), input.top_k);
        let chosen = softmax(logits.clone().gather(1, indices.clone()), 1);
        let probs = softmax(logits.clone(), 1);
        GateOutput::token_choice(logits, probs, indices, chosen)
    }
}
