//! Routing statistics: what the router did in one forward pass.

use burn::tensor::{Bool, Int, Tensor};

use crate::LossKind;

/// What the router did in one forward pass, as device tensors. Building it costs a few small
/// reductions and no host synchronisation; call [`RoutingStats::summary`] to read it.
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// Which (token, expert) pairs the experts processed, `[tokens, E]`, rows in the input's
    /// token order (batch-major for `[batch, seq, d_model]`): the routing decision after
    /// capacity.
    pub assignments: Tensor<2, Bool>,
    /// Assignments each expert was asked for, before capacity, `[E]`. For expert choice, the
    /// tokens each expert picked.
    pub routed_per_expert: Tensor<1, Int>,
    /// Assignments each expert processed, after capacity, `[E]`.
    pub tokens_per_expert: Tensor<1, Int>,
    /// Assignments lost to the capacity limit, `[1]`.
    pub dropped_assignments: Tensor<1, Int>,
    /// Tokens that no expert processed (they pass through the residual only), `[1]`.
    pub unrouted_tokens: Tensor<1, Int>,
    /// Mean router probability of each expert over the tokens, `[E]`.
    pub mean_gate_prob: Tensor<1>,
    /// Unweighted value of each auxiliary loss that was computed, `[1]` each.
    pub losses: Vec<(LossKind, Tensor<1>)>,
    /// Slots per expert in this pass.
    pub capacity: usize,
    /// Tokens in this pass.
    pub num_tokens: usize,
}

/// [`RoutingStats`] read back to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSummary {
    /// See [`RoutingStats::routed_per_expert`].
    pub routed_per_expert: Vec<u64>,
    /// See [`RoutingStats::tokens_per_expert`].
    pub tokens_per_expert: Vec<u64>,
    /// See [`RoutingStats::dropped_assignments`].
    pub dropped_assignments: u64,
    /// See [`RoutingStats::unrouted_tokens`].
    pub unrouted_tokens: u64,
    /// See [`RoutingStats::mean_gate_prob`].
    pub mean_gate_prob: Vec<f32>,
    /// See [`RoutingStats::losses`].
    pub losses: Vec<(LossKind, f32)>,
    /// See [`RoutingStats::capacity`].
    pub capacity: usize,
    /// See [`RoutingStats::num_tokens`].
    pub num_tokens: usize,
}

impl RoutingStats {
    /// Reads the statistics back to the host (one synchronisation).
    pub fn summary(&self) -> RoutingSummary {
        RoutingSummary {
            routed_per_expert: ints(&self.routed_per_expert),
            tokens_per_expert: ints(&self.tokens_per_expert),
            dropped_assignments: ints(&self.dropped_assignments)[0],
            unrouted_tokens: ints(&self.unrouted_tokens)[0],
            mean_gate_prob: floats(&self.mean_gate_prob),
            losses: self
                .losses
                .iter()
                .map(|(kind, value)| (*kind, floats(value)[0]))
                .collect(),
            capacity: self.capacity,
            num_tokens: self.num_tokens,
        }
    }
}

impl RoutingSummary {
    /// Load imbalance `max_e load_e / mean_e load_e` of the processed assignments (1 is perfect).
    pub fn max_over_mean_load(&self) -> f64 {
        let total: u64 = self.tokens_per_expert.iter().sum();
        let max = self.tokens_per_expert.iter().copied().max().unwrap_or(0);
        if total == 0 {
            return 0.0;
        }
        max as f64 * self.tokens_per_expert.len() as f64 / total as f64
    }
}

fn ints(tensor: &Tensor<1, Int>) -> Vec<u64> {
    tensor
        .try_to_vec_as::<i64>()
        .expect("an Int tensor converts to i64")
        .into_iter()
        .map(|value| value.max(0) as u64)
        .collect()
}

fn floats(tensor: &Tensor<1>) -> Vec<f32> {
    tensor
        .try_to_vec_as::<f32>()
        .expect("a Float tensor converts to f32")
}
