//! Routing statistics: what the router did in one forward pass.

use burn::tensor::{Bool, Int, Tensor, TensorData, Transaction};

use crate::token_order::TokenOrder;
use crate::LossKind;

/// What the router did in one forward pass.
///
/// Holding it costs nothing: it keeps tensors the layer computed anyway (the routing decision,
/// the gate's probabilities, the loads that sized the expert buffer), and the statistics
/// derived from them ([`routed_per_expert`](Self::routed_per_expert),
/// [`dropped_assignments`](Self::dropped_assignments), ...) are computed only when asked
/// for, on the device. A training loop asks on the steps it logs, and reads them all with
/// one host synchronisation ([`RoutingStats::register`], [`RoutingStats::summary`]).
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// Which (token, expert) pairs the experts processed, `[tokens, E]`, in the layer's
    /// position-major token order.
    kept: Tensor<2, Bool>,
    /// Which experts each token asked for before capacity, `[tokens, E]`, same order.
    candidates: Tensor<2, Bool>,
    /// The router's probabilities, `[tokens, E]` (detached).
    probs: Tensor<2>,
    order: TokenOrder,
    expert_choice: bool,
    /// Assignments each expert processed, after capacity, `[E]`.
    pub tokens_per_expert: Tensor<1, Int>,
    /// Unweighted value of each auxiliary loss that was computed, `[1]` each.
    pub losses: Vec<(LossKind, Tensor<1>)>,
    /// The most assignments one expert could keep in this pass: the capacity `C`, or the
    /// number of tokens when dropless.
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

/// What the layer hands over to build its [`RoutingStats`].
pub(crate) struct RoutingRecord {
    pub kept: Tensor<2, Bool>,
    pub candidates: Tensor<2, Bool>,
    pub probs: Tensor<2>,
    pub order: TokenOrder,
    pub expert_choice: bool,
    pub tokens_per_expert: Tensor<1, Int>,
    pub losses: Vec<(LossKind, Tensor<1>)>,
    pub capacity: usize,
    pub num_tokens: usize,
}

impl RoutingStats {
    pub(crate) fn new(record: RoutingRecord) -> Self {
        Self {
            kept: record.kept,
            candidates: record.candidates,
            probs: record.probs.detach(),
            order: record.order,
            expert_choice: record.expert_choice,
            tokens_per_expert: record.tokens_per_expert,
            losses: record.losses,
            capacity: record.capacity,
            num_tokens: record.num_tokens,
        }
    }

    /// Which (token, expert) pairs the experts processed, `[tokens, E]`, rows in the input's
    /// token order (batch-major for `[batch, seq, d_model]`): the routing decision after
    /// capacity.
    pub fn assignments(&self) -> Tensor<2, Bool> {
        self.order.restore_rows(self.kept.clone())
    }

    /// Assignments each expert was asked for, before capacity, `[E]`. For expert choice, the
    /// tokens each expert picked.
    pub fn routed_per_expert(&self) -> Tensor<1, Int> {
        if self.expert_choice {
            return self.tokens_per_expert.clone();
        }
        self.candidates.clone().int().sum_dim(0).squeeze_dim(0)
    }

    /// Assignments lost to the capacity limit, `[1]`.
    pub fn dropped_assignments(&self) -> Tensor<1, Int> {
        (self.routed_per_expert() - self.tokens_per_expert.clone()).sum()
    }

    /// Tokens that no expert processed (they pass through the residual only), `[1]`.
    pub fn unrouted_tokens(&self) -> Tensor<1, Int> {
        self.kept.clone().int().sum_dim(1).equal_elem(0).int().sum()
    }

    /// Mean router probability of each expert over the tokens, `[E]`.
    pub fn mean_gate_prob(&self) -> Tensor<1> {
        self.probs.clone().mean_dim(0).squeeze_dim(0)
    }

    /// Adds the tensors of a [`RoutingSummary`] to `transaction`, so that several layers' and
    /// a training step's values are read in one synchronisation; read them back with
    /// [`RoutingStats::summary_from`]. They are registered without autodiff: register the
    /// caller's own tensors so too (`Tensor::without_autodiff`), as Burn reads a transaction on
    /// the backend of its first tensor.
    pub fn register(&self, transaction: Transaction) -> Transaction {
        // Burn reads a transaction on the backend of its first tensor: all of them without
        // autodiff, whatever the tensors a caller registers besides.
        let transaction = transaction
            .register(self.routed_per_expert().without_autodiff())
            .register(self.tokens_per_expert.clone().without_autodiff())
            .register(self.dropped_assignments().without_autodiff())
            .register(self.unrouted_tokens().without_autodiff())
            .register(self.mean_gate_prob().without_autodiff());
        self.losses
            .iter()
            .fold(transaction, |transaction, (_, loss)| {
                transaction.register(loss.clone().without_autodiff())
            })
    }

    /// The summary from the data [`RoutingStats::register`] registered, taken from `data` in
    /// the same order.
    ///
    /// # Panics
    ///
    /// If `data` ends early or holds values of other types (not what `register` registered).
    pub fn summary_from(&self, data: &mut impl Iterator<Item = TensorData>) -> RoutingSummary {
        let mut next = || data.next().expect("the data `register` registered");
        let routed_per_expert = ints(next());
        let tokens_per_expert = ints(next());
        let dropped_assignments = ints(next())[0];
        let unrouted_tokens = ints(next())[0];
        let mean_gate_prob = floats(next());
        let losses = self
            .losses
            .iter()
            .map(|(kind, _)| (*kind, floats(next())[0]))
            .collect();
        RoutingSummary {
            routed_per_expert,
            tokens_per_expert,
            dropped_assignments,
            unrouted_tokens,
            mean_gate_prob,
            losses,
            capacity: self.capacity,
            num_tokens: self.num_tokens,
        }
    }

    /// Reads the statistics back to the host (one synchronisation).
    pub fn summary(&self) -> RoutingSummary {
        let data = self.register(Transaction::default()).execute();
        self.summary_from(&mut data.into_iter())
    }
}

impl RoutingSummary {
    /// Share of the routed assignments lost to the capacity limit (0 when none were routed).
    pub fn drop_rate(&self) -> f64 {
        let routed: u64 = self.routed_per_expert.iter().sum();
        self.dropped_assignments as f64 / routed.max(1) as f64
    }
}

fn ints(data: TensorData) -> Vec<u64> {
    data.iter::<i64>()
        .map(|value| value.max(0) as u64)
        .collect()
}

fn floats(data: TensorData) -> Vec<f32> {
    data.iter::<f32>().collect()
}
