use burn::config::Config;
use burn::tensor::{Distribution, Tensor};
use moe_kernels::softmax;

use super::{one_hot, top_k_indices, GateInput, GateOutput};
use crate::losses::load_balancing_loss;
use crate::RoutingMode;

/// GShard's top-2 gate with random routing.
///
/// `p = softmax(x W)`; the token's best two experts `e1, e2` get weights
/// `g1 = p_e1 / (p_e1 + p_e2)` and `g2 = p_e2 / (p_e1 + p_e2)`. In training the second expert is
/// kept only with probability `2 * g2` (so a weak second choice is usually skipped and frees
/// capacity); in evaluation it is always kept. A skipped second choice takes no capacity and
/// its weight is not given to the first. Capacity is `ceil(2 * S / E * capacity_factor)`.
///
/// Balancing loss: `E * sum_e f_e * P_e` with `f_e` the fraction of tokens whose **first**
/// choice is `e` and `P_e` the mean router probability.
///
/// Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic
/// Sharding" (2020), algorithm 1.
#[derive(Config, Debug, PartialEq)]
pub struct GShardGate {
    /// Keep the second expert with probability `2 * g2` in training.
    #[config(default = true)]
    pub random_routing: bool,
}

impl GShardGate {
    pub(crate) fn route(&self, input: GateInput<'_>) -> GateOutput {
        let logits = input.router.logits(input.x);
        let num_experts = input.router.num_experts();
        let [tokens, _] = logits.dims();
        let probs = softmax(logits.clone(), 1);
        let indices = top_k_indices(input.router.selection_scores(logits.clone()), 2);
        let top_two = probs.clone().gather(1, indices.clone());
        let normalized = top_two.clone() / top_two.sum_dim(1);

        // Which of the two choices stay: the first always, the second with probability 2 * g2.
        let mut keep = Tensor::<2>::ones([tokens, 2], &logits.device());
        if input.mode == RoutingMode::Train && self.random_routing {
            let second = normalized
                .clone()
                .slice([0..tokens, 1..2])
                .detach()
                .mul_scalar(2.0);
            let draw = second.random_like(Distribution::Default);
            let keep_second = draw.lower(second).float();
            keep = keep.slice_assign([0..tokens, 1..2], keep_second);
        }

        let one_hot = one_hot(indices, num_experts) * keep.clone().unsqueeze_dim::<3>(2);
        let candidates = one_hot
            .clone()
            .sum_dim(1)
            .squeeze_dim::<2>(1)
            .greater_elem(0.5);
        let weights = (one_hot.clone() * (normalized * keep).unsqueeze_dim::<3>(2))
            .sum_dim(1)
            .squeeze_dim::<2>(1);
        let first_choice_fraction = one_hot
            .slice([0..tokens, 0..1, 0..num_experts])
            .sum_dims_squeeze::<1, usize>(&[0, 1])
            .div_scalar(tokens as f64);
        GateOutput {
            balance_loss: Some(load_balancing_loss(probs.clone(), first_choice_fraction)),
            logits,
            probs,
            candidates,
            weights,
        }
    }
}
