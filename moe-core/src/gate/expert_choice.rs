use burn::config::Config;
use burn::tensor::Bool;
use burn::tensor::Tensor;
use moe_kernels::softmax;

use super::{GateInput, GateOutput};

/// Expert choice routing: each expert picks the tokens it wants, instead of tokens picking
/// experts.
///
/// `p = softmax(x W)` over experts, `[S, E]`; expert `e` takes the `C` tokens with the largest
/// `p[:, e]`, `C = ceil(S / E * capacity_factor)` (the paper's `k = S c / E`), and combines them
/// with weight `p[n, e]`. Every expert is full by construction, so no balancing loss is needed;
/// a token may be taken by several experts or by none. Ties go to the earlier token.
///
/// **Not causal.** An expert compares all tokens of the batch, so a later token can push an
/// earlier one out of an expert: decoder-only models must not use it (their configs refuse it),
/// and it routes differently at generation time than in training.
///
/// Zhou et al., "Mixture-of-Experts with Expert Choice Routing" (NeurIPS 2022).
#[derive(Config, Debug, PartialEq)]
pub struct ExpertChoiceGate {}

impl ExpertChoiceGate {
    pub(crate) fn route(&self, input: GateInput<'_>) -> GateOutput {
        let logits = input.router.logits(input.x);
        let probs = softmax(logits.clone(), 1);
        let candidates = Tensor::<2, Bool>::full(probs.dims(), true, &probs.device());
        GateOutput {
            weights: probs.clone(),
            logits,
            probs,
            candidates,
            balance_loss: None,
        }
    }
}
