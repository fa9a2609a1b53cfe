//! How many tokens each expert may take in one forward pass, and who is dropped when more arrive.

use burn::config::Config;

use crate::error::{check_positive, MoeError};
use crate::RoutingMode;

/// Which assignments an expert keeps when more arrive than its capacity.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// Earlier tokens win: an expert keeps the first `capacity` tokens that chose it, in order
    /// of sequence position, then batch row (for a `[tokens, d_model]` input, in row order).
    /// Deterministic on every backend, and causal: a token never loses its slot to a later
    /// position, so decoders stay causal also in batches. (FastMoE's CUDA kernel keeps tokens
    /// in arrival order, which is not reproducible; GShard gives all first choices priority
    /// over second choices. Here a token's rank among its own choices does not matter.)
    Position,
    /// Highest gate weight wins (V-MoE's batch prioritized routing): an expert keeps the
    /// `capacity` assignments with the largest combine weights; equal weights fall back to
    /// position order, so the result is deterministic.
    Probability,
}

/// Capacity limits of the layer: `capacity = max(min_capacity, ceil(k * tokens / experts * factor))`,
/// at most `tokens` (an expert never receives a token twice).
///
/// For the expert-choice gate `k = 1`: each expert picks `ceil(tokens / experts * factor)`
/// tokens (the paper's capacity factor `c`, the average number of experts per token).
#[derive(Config, Debug, PartialEq)]
pub struct CapacityConfig {
    /// Capacity factor used in training (GShard / Switch use 1.0 - 1.25).
    #[config(default = 1.25)]
    pub train_factor: f64,
    /// Capacity factor used in evaluation and generation (Switch uses 2.0).
    #[config(default = 2.0)]
    pub eval_factor: f64,
    /// Lower bound on the capacity, so tiny batches do not drop everything.
    #[config(default = 4)]
    pub min_capacity: usize,
    /// Who wins when an expert is over capacity.
    #[config(default = "DropPolicy::Position")]
    pub drop_policy: DropPolicy,
    /// No capacity at all: every assignment is processed (MegaBlocks' "dropless" MoE). The expert
    /// buffer is sized by the busiest expert, which costs one read of a single integer from
    /// the device per forward pass; the capacity factors are then ignored.
    #[config(default = false)]
    pub dropless: bool,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl CapacityConfig {
    /// A config with no capacity limit.
    pub fn dropless() -> Self {
        Self::new().with_dropless(true)
    }

    /// Checks the factors.
    pub(crate) fn validate(&self) -> Result<(), MoeError> {
        check_positive("capacity.train_factor", self.train_factor)?;
        check_positive("capacity.eval_factor", self.eval_factor)?;
        Ok(())
    }

    /// The capacity factor for `mode`.
    pub fn factor(&self, mode: RoutingMode) -> f64 {
        match mode {
            RoutingMode::Train => self.train_factor,
            RoutingMode::Eval => self.eval_factor,
        }
    }

    /// Capacity per expert for `num_tokens` tokens each sending `assignments_per_token`
    /// assignments to `num_experts` experts: `max(min_capacity, ceil(k * S / E * factor))`,
    /// clamped to `[1, num_tokens]`. Ignores `dropless` (the caller sizes dropless buffers).
    pub fn capacity(
        &self,
        num_tokens: usize,
        num_experts: usize,
        assignments_per_token: usize,
        mode: RoutingMode,
    ) -> usize {
        let expected = (assignments_per_token * num_tokens) as f64 / num_experts as f64;
        let capacity = (expected * self.factor(mode)).ceil() as usize;
        capacity.max(self.min_capacity).clamp(1, num_tokens.max(1))
    }
}
