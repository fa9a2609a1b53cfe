use burn::config::Config;
use burn::tensor::activation::softplus;
use burn::tensor::{Distribution, Tensor};
use moe_kernels::softmax;

use super::{to_expert_matrix, top_k_indices, GateInput, GateOutput};
use crate::error::{check_non_negative, MoeError};
use crate::losses::{cv_squared, smooth_load};
use crate::RoutingMode;

/// Noisy top-k gating.
///
/// In training `H = x W_g + N(0, 1) * (softplus(x W_noise) + noise_epsilon)`; in evaluation
/// `H = x W_g`. The token goes to the `k` largest `H` with weights `softmax(H[top k])`.
///
/// Balancing loss `CV^2(importance) + CV^2(load)`, with `importance_e = sum_x g_e(x)` and the
/// smooth load estimate `load_e = sum_x Phi((clean_e(x) - threshold_e(x)) / sigma_e(x))`:
/// `Phi` is the normal CDF and `threshold_e(x)` the `k`-th largest noisy score among the other
/// experts, so `Phi(..)` is the probability that `e` stays in the top `k` when only its own
/// noise is redrawn. Without noise (evaluation, or `k == E`) the load is the plain count.
///
/// Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
/// Layer" (ICLR 2017), sections 2.1 and 4, appendix A.
#[derive(Config, Debug, PartialEq)]
pub struct NoisyGate {
    /// Added to the learned noise scale so the noise never vanishes.
    #[config(default = 0.01)]
    pub noise_epsilon: f64,
}

impl NoisyGate {
    pub(crate) fn validate(&self) -> Result<(), MoeError> {
        check_non_negative("gate.noise_epsilon", self.noise_epsilon)
    }

    pub(crate) fn route(&self, input: GateInput<'_>) -> GateOutput {
        let router = input.router;
        let num_experts = router.num_experts();
        let k = input.top_k;
        let clean = router.logits(input.x.clone());
        let noise_scale = match (&router.noise_weight, input.mode) {
            (Some(noise_weight), RoutingMode::Train) => Some(
                softplus(input.x.matmul(noise_weight.val()), 1.0).add_scalar(self.noise_epsilon),
            ),
            _ => None,
        };
        let noisy = match &noise_scale {
            Some(scale) => {
                clean.clone() + scale.clone() * scale.random_like(Distribution::Normal(0.0, 1.0))
            }
            None => clean.clone(),
        };

        let scores = router.selection_scores(noisy.clone());
        let indices = top_k_indices(scores.clone(), k);
        let chosen = softmax(noisy.gather(1, indices.clone()), 1);
        let (weights, candidates) = to_expert_matrix(indices, chosen, num_experts);

        let importance: Tensor<1> = weights.clone().sum_dim(0).squeeze_dim(0);
        let load: Tensor<1> = match noise_scale {
            Some(scale) if k < num_experts => {
                let clean_scores = router.selection_scores(clean.clone());
                smooth_load(clean_scores, scores, scale, candidates.clone(), k)
            }
            _ => candidates.clone().float().sum_dim(0).squeeze_dim(0),
        };
        let balance_loss = cv_squared(importance) + cv_squared(load);
        GateOutput {
            probs: softmax(clean.clone(), 1),
            logits: clean,
            candidates,
            weights,
            balance_loss: Some(balance_loss),
        }
    }
}
