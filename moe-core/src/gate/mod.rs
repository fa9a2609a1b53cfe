//! Gates: how tokens (or experts) choose each other.
//!
//! Every gate reads the [`Router`]'s logits and returns a [`GateOutput`]: which experts each
//! token asks for, with what combine weight, and the gate's own balancing loss. Capacity and
//! the expert buffers are handled afterwards by [`crate::dispatch`], the same way for all gates.
//!
//! | gate | choice | weights | balancing loss |
//! |---|---|---|---|
//! | [`NaiveGate`] | top-k logits | softmax over the k | `E * sum f_e P_e` |
//! | [`SoftmaxTopKGate`] | top-k of softmax | the k probabilities (optionally renormalised) | `E * sum f_e P_e` |
//! | [`NoisyGate`] | top-k of noisy logits | softmax over the k | `CV^2(importance) + CV^2(load)` |
//! | [`GShardGate`] | top-2, random 2nd | normalised top-2 probabilities | `E * sum f_e P_e`, `f` of top-1 |
//! | [`SwitchGate`] | top-1, jittered input | the top probability | `E * sum f_e P_e` |
//! | [`ExpertChoiceGate`] | each expert picks tokens | the picked probabilities | none needed |

mod custom;
mod expert_choice;
mod gshard;
mod naive;
mod noisy;
mod softmax_top_k;
mod switch;

pub use custom::{CustomGate, Gate};
pub use expert_choice::ExpertChoiceGate;
pub use gshard::GShardGate;
pub use naive::NaiveGate;
pub use noisy::NoisyGate;
pub use softmax_top_k::SoftmaxTopKGate;
pub use switch::SwitchGate;

use burn::config::Config;
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor};

use crate::error::MoeError;
use crate::losses::load_balancing_loss;
use crate::precision::to_dtype;
use crate::{Router, RoutingMode};

/// Which gate the layer uses, with that gate's settings.
#[derive(Config, Debug, PartialEq)]
pub enum GateConfig {
    /// FastMoE's default gate: top-k of the raw logits, softmax over the k.
    Naive(NaiveGate),
    /// Softmax over all experts, then top-k (Mixtral, DeepSeek-MoE).
    SoftmaxTopK(SoftmaxTopKGate),
    /// Noisy top-k gating (Shazeer et al. 2017).
    Noisy(NoisyGate),
    /// GShard's top-2 gate with random routing (Lepikhin et al. 2020).
    GShard(GShardGate),
    /// Switch Transformer's top-1 gate (Fedus et al. 2021).
    Switch(SwitchGate),
    /// Expert choice routing (Zhou et al. 2022). Not causal.
    ExpertChoice(ExpertChoiceGate),
}

impl Default for GateConfig {
    fn default() -> Self {
        Self::softmax_top_k()
    }
}

impl GateConfig {
    /// [`NaiveGate`] with its defaults.
    pub fn naive() -> Self {
        Self::Naive(NaiveGate::new())
    }
    /// [`SoftmaxTopKGate`] with its defaults.
    pub fn softmax_top_k() -> Self {
        Self::SoftmaxTopK(SoftmaxTopKGate::new())
    }
    /// [`NoisyGate`] with its defaults.
    pub fn noisy() -> Self {
        Self::Noisy(NoisyGate::new())
    }
    /// [`GShardGate`] with its defaults.
    pub fn gshard() -> Self {
        Self::GShard(GShardGate::new())
    }
    /// [`SwitchGate`] with its defaults.
    pub fn switch() -> Self {
        Self::Switch(SwitchGate::new())
    }
    /// [`ExpertChoiceGate`] with its defaults.
    pub fn expert_choice() -> Self {
        Self::ExpertChoice(ExpertChoiceGate::new())
    }

    /// The gate's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Naive(_) => "naive",
            Self::SoftmaxTopK(_) => "softmax-top-k",
            Self::Noisy(_) => "noisy",
            Self::GShard(_) => "GShard",
            Self::Switch(_) => "Switch",
            Self::ExpertChoice(_) => "expert-choice",
        }
    }

    /// Whether experts choose tokens (the gate sees the whole batch and is not causal).
    pub fn is_expert_choice(&self) -> bool {
        matches!(self, Self::ExpertChoice(_))
    }

    /// Whether a token's routing depends only on that token. Expert choice compares tokens with
    /// each other, so a decoder that uses it would let later tokens change earlier outputs.
    pub fn is_causal(&self) -> bool {
        !self.is_expert_choice()
    }

    /// Checks the gate's own settings against `top_k`.
    pub(crate) fn validate(&self, top_k: usize) -> Result<(), MoeError> {
        let required = match self {
            Self::GShard(_) => Some(2),
            Self::Switch(_) => Some(1),
            _ => None,
        };
        if let Some(required) = required {
            if top_k != required {
                return Err(MoeError::GateNeedsTopK {
                    gate: self.name(),
                    required,
                    top_k,
                });
            }
        }
        match self {
            Self::Noisy(gate) => gate.validate(),
            Self::Switch(gate) => gate.validate(),
            _ => Ok(()),
        }
    }

    /// Routes `x: [tokens, d_model]`: what [`crate::Moe`] does before its dispatch plan.
    pub fn route(&self, input: GateInput<'_>) -> GateOutput {
        match self {
            Self::Naive(gate) => gate.route(input),
            Self::SoftmaxTopK(gate) => gate.route(input),
            Self::Noisy(gate) => gate.route(input),
            Self::GShard(gate) => gate.route(input),
            Self::Switch(gate) => gate.route(input),
            Self::ExpertChoice(gate) => gate.route(input),
        }
    }
}

/// What a gate routes.
pub struct GateInput<'a> {
    /// Tokens, `[tokens, d_model]`.
    pub x: Tensor<2>,
    /// The router parameters.
    pub router: &'a Router,
    /// Experts per token (token-choice gates).
    pub top_k: usize,
    /// Training or evaluation routing.
    pub mode: RoutingMode,
}

/// What a gate decided, before capacity is applied.
pub struct GateOutput {
    /// Router logits without noise, `[tokens, experts]` (input of the z-loss).
    pub logits: Tensor<2>,
    /// Router softmax without noise, `[tokens, experts]` (for statistics).
    pub probs: Tensor<2>,
    /// `true` where token `n` asks for expert `e`, `[tokens, experts]`. For expert choice every
    /// token is a candidate of every expert.
    pub candidates: Tensor<2, Bool>,
    /// Combine weight of each (token, expert) pair, `[tokens, experts]`, zero off `candidates`.
    /// Carries the gradient that trains the router.
    pub weights: Tensor<2>,
    /// The gate's balancing loss (unweighted), if it has one.
    pub balance_loss: Option<Tensor<1>>,
}

impl GateOutput {
    /// The end that token-choice gates with the Switch balancing loss share (naive, softmax
    /// top-k, Switch): each token's `k` chosen weights `chosen: [tokens, k]` at the experts
    /// `indices: [tokens, k]` spread onto the `[tokens, experts]` matrices, and the loss
    /// `E * sum_e f_e P_e` (Fedus et al. 2021, eq. 4; [`load_balancing_loss`]) from the
    /// fraction `f` of assignments each expert received and the router's mean probability
    /// `P`.
    pub(crate) fn token_choice(
        logits: Tensor<2>,
        probs: Tensor<2>,
        indices: Tensor<2, Int>,
        chosen: Tensor<2>,
    ) -> Self {
        let [_, num_experts] = logits.dims();
        let [_, k] = indices.dims();
        let (weights, candidates) = to_expert_matrix(indices, chosen, num_experts);
        let fraction = assignment_fraction(candidates.clone(), k);
        GateOutput {
            balance_loss: Some(load_balancing_loss(probs.clone(), fraction)),
            logits,
            probs,
            candidates,
            weights,
        }
    }
}

/// Indices of the `k` largest scores of each row, `[rows, k]`. `k == columns` is allowed (all
/// experts, in column order). [`moe_kernels::top_k_indices`] stays on the device on every
/// backend, and on flex selects instead of sorting each row.
pub fn top_k_indices(scores: Tensor<2>, k: usize) -> Tensor<2, Int> {
    let [rows, columns] = scores.dims();
    if k >= columns {
        Tensor::<1, Int>::arange(0..columns as i64, &scores.device())
            .unsqueeze_dim::<2>(0)
            .expand([rows, columns])
    } else {
        moe_kernels::top_k_indices(scores, k)
    }
}

/// One-hot encoding of expert indices on the device: `[rows, k] -> [rows, k, experts]` (1.0 at
/// the chosen expert). Burn's `one_hot` reads the indices back to the host; this does not.
pub(crate) fn one_hot(indices: Tensor<2, Int>, num_experts: usize) -> Tensor<3> {
    let [rows, k] = indices.dims();
    let experts = Tensor::<1, Int>::arange(0..num_experts as i64, &indices.device())
        .reshape([1, 1, num_experts])
        .expand([rows, k, num_experts]);
    indices
        .unsqueeze_dim::<3>(2)
        .expand([rows, k, num_experts])
        .equal(experts)
        .float()
}

/// Spreads the `k` chosen weights of each token onto a `[tokens, experts]` matrix:
/// `(weights, mask)` with `weights[n, indices[n, j]] = values[n, j]`.
///
/// Two scatters along the expert axis, `O(tokens * k)` work: the one-hot product
/// (`one_hot_expert_matrix`) costs `O(tokens * k * experts)` forward and backward, which
/// fine-grained layers (64 experts, top-16) paid in every step. The indices of a row are
/// distinct (a top-k), so the scatter-add writes each element at most once and its backward
/// is a plain gather.
///
/// With one expert per token the one-hot product is used (it costs `O(tokens * experts)`
/// then): on wgpu, Burn 0.22.1's fusion scatters a `[tokens, 1]` operand that comes from a
/// `gather` into the wrong places when the expert count is even (found by
/// `tests/backend_parity.rs`; `k >= 2` and odd counts are right).
pub fn to_expert_matrix(
    indices: Tensor<2, Int>,
    values: Tensor<2>,
    num_experts: usize,
) -> (Tensor<2>, Tensor<2, Bool>) {
    let [rows, k] = indices.dims();
    if k == 1 {
        return one_hot_expert_matrix(indices, values, num_experts);
    }
    let device = values.device();
    let dtype = values.dtype();
    let filled =
        |shape: [usize; 2], value: f64| to_dtype(Tensor::<2>::full(shape, value, &device), dtype);
    let weights =
        filled([rows, num_experts], 0.0).scatter(1, indices.clone(), values, IndexingUpdateOp::Add);
    let chosen = filled([rows, num_experts], 0.0)
        .scatter(1, indices, filled([rows, k], 1.0), IndexingUpdateOp::Add)
        .greater_elem(0.5);
    (weights, chosen)
}

/// [`to_expert_matrix`] as a one-hot product: `weights = sum_j one_hot(indices[:, j]) *
/// values[:, j]`.
fn one_hot_expert_matrix(
    indices: Tensor<2, Int>,
    values: Tensor<2>,
    num_experts: usize,
) -> (Tensor<2>, Tensor<2, Bool>) {
    let one_hot = one_hot(indices, num_experts);
    let mask = one_hot
        .clone()
        .sum_dim(1)
        .squeeze_dim::<2>(1)
        .greater_elem(0.5);
    let weights = (one_hot * values.unsqueeze_dim::<3>(2))
        .sum_dim(1)
        .squeeze_dim::<2>(1);
    (weights, mask)
}

/// Fraction of assignments each expert received: `f_e = count_e / (tokens * k)`, `[experts]`.
pub fn assignment_fraction(mask: Tensor<2, Bool>, assignments_per_token: usize) -> Tensor<1> {
    let [tokens, _] = mask.dims();
    mask.float()
        .sum_dim(0)
        .squeeze_dim::<1>(0)
        .div_scalar((tokens * assignments_per_token) as f64)
}
