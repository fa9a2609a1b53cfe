use burn::config::Config;
use moe_kernels::softmax;

use super::{top_k_indices, GateInput, GateOutput};

/// Softmax over all experts, then the top `k` probabilities as combine weights.
///
/// `p = softmax(x W)`, `idx = top_k(p)`, `g = p[idx]`, and with `renormalize`,
/// `g = g / sum(g)` (Mixtral renormalises; DeepSeek-MoE and Qwen-MoE do not).
///
/// Balancing loss: `E * sum_e f_e * P_e`, `f_e` the fraction of all `k` assignments sent to `e`.
///
/// Jiang et al., "Mixtral of Experts" (2024); Dai et al., "DeepSeekMoE" (2024).
#[derive(Config, Debug, PartialEq)]
pub struct SoftmaxTopKGate {
    /// Rescale the `k` chosen probabilities to sum to one.
    #[config(default = true)]
    pub renormalize: bool,
}

impl SoftmaxTopKGate {
    pub(crate) fn route(&self, input: GateInput<'_>) -> GateOutput {
        let logits = input.router.logits(input.x);
        let probs = softmax(logits.clone(), 1);
        let indices = top_k_indices(input.router.selection_scores(logits.clone()), input.top_k);
        let mut chosen = probs.clone().gather(1, indices.clone());
        if self.renormalize {
            chosen = chosen.clone() / chosen.sum_dim(1);
        }
        GateOutput::token_choice(logits, probs, indices, chosen)
    }
}
