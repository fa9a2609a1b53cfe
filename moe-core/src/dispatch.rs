//! Dispatch and combine: from the gate's choices to the experts' buffer and back.
//!
//! The experts run on one buffer `[S, d_model]` laid out ragged (MegaBlocks, Gale et al.
//! 2022): the kept (token, expert) pairs sorted by expert, each expert's in token order,
//! contiguous, so expert `e` owns rows `offsets[e]..offsets[e + 1]` and the rows after
//! `offsets[E]` are padding. A padding row names no token (its token index is `tokens`, one
//! past the last), so the gather gives it zeros and the combine and the gather's backward pass
//! leave it out of every token's sum: however much of the buffer is padding, no token is
//! handed more rows than were routed to it. `S` is fixed before routing, so nothing is read
//! back to size it: `E x C` under a capacity limit `C`, `tokens x top_k` when dropless (every
//! assignment a token can make). However unevenly the router spreads the tokens, the buffer
//! holds the routed rows and at most `S - routed` padding rows at its end, and every operation
//! after the dispatch costs what the routed rows cost.
//!
//! 1. [`DispatchPlan::with_capacity`] / [`DispatchPlan::dropless`]: which (token, expert) pairs
//!    survive the capacity limit (by position or by probability), and the row each takes:
//!    `offsets[e]` plus the number of kept pairs of expert `e` before it
//!    ([`moe_kernels::exclusive_cumsum`]); then the pair each row holds
//!    ([`moe_kernels::invert_slots`]);
//! 2. [`DispatchPlan::dispatch`]: gather the tokens into the buffer
//!    ([`moe_kernels::gather_rows`]);
//! 3. the experts run on the buffer, each over its own rows
//!    ([`crate::Experts::forward_grouped`]);
//! 4. [`DispatchPlan::combine`]: weight each row's output by its gate value and add it back to
//!    its token ([`moe_kernels::combine_rows`], one operation).
//!
//! A dropped assignment takes no row and contributes zero; the layer's residual connection
//! carries the token on. Everything stays on the device.

use burn::tensor::{Bool, Int, Tensor};
use moe_kernels::{combine_rows, exclusive_cumsum, gather_rows, invert_slots, permute_rows};

use crate::precision::to_dtype;
use crate::DropPolicy;

/// The expert buffer layout for one forward pass.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// Token feeding each row of the buffer, `[S]`; `tokens` (no token) for padding rows.
    pub token_of_slot: Tensor<1, Int>,
    /// Combine weight of each row, `[S]`; 0 for padding rows. Carries the gate's gradient.
    pub weight_of_slot: Tensor<1>,
    /// Which (token, expert) pairs the experts process, `[tokens, E]`.
    pub kept: Tensor<2, Bool>,
    /// Pairs each expert keeps, `[E]`.
    pub tokens_per_expert: Tensor<1, Int>,
    /// Where each expert's rows start, `[E + 1]`: expert `e` owns rows
    /// `offsets[e]..offsets[e + 1]`, and `offsets[E]` is the number of kept pairs.
    pub offsets: Tensor<1, Int>,
    /// Rows of the buffer, `S`.
    pub slots: usize,
}

impl DispatchPlan {
    /// Keeps at most `capacity` of each expert's `candidates` (`[tokens, E]`, with combine
    /// `weights`) in a buffer of `E x capacity` rows. Under [`DropPolicy::Position`] an expert
    /// keeps its earliest candidates; under [`DropPolicy::Probability`] those with the largest
    /// weight, ties going to the earlier token.
    pub fn with_capacity(
        candidates: Tensor<2, Bool>,
        weights: Tensor<2>,
        capacity: usize,
        policy: DropPolicy,
    ) -> Self {
        let [num_tokens, num_experts] = candidates.dims();
        let kept = match policy {
            _ if capacity >= num_tokens => candidates,
            DropPolicy::Position => {
                let earlier = exclusive_cumsum(candidates.clone().int());
                candidates.bool_and(earlier.lower_elem(capacity as i64))
            }
            DropPolicy::Probability => keep_largest(candidates, weights.clone().detach(), capacity),
        };
        Self::lay_out(kept, weights, num_experts * capacity)
    }

    /// Keeps every candidate (`[tokens, E]`, with combine `weights`) in a buffer of `slots`
    /// rows, which must be at least the number of candidates (`tokens x top_k` for a gate that
    /// picks `top_k` experts per token); candidates beyond it would be dropped.
    pub fn dropless(candidates: Tensor<2, Bool>, weights: Tensor<2>, slots: usize) -> Self {
        Self::lay_out(candidates, weights, slots)
    }

    /// Lays the `kept` pairs out in `slots` rows, sorted by expert, each expert's in token order.
    fn lay_out(kept: Tensor<2, Bool>, weights: Tensor<2>, slots: usize) -> Self {
        let [num_tokens, num_experts] = kept.dims();
        let device = kept.device();
        let kept_count = kept.clone().int();
        // Each kept pair's rank among its expert's pairs; the last row plus its own count is
        // each expert's load (a column sum without a second pass over the matrix).
        let rank = exclusive_cumsum(kept_count.clone());
        let last = num_tokens.saturating_sub(1)..num_tokens;
        let tokens_per_expert = match num_tokens {
            0 => Tensor::<2, Int>::zeros([1, num_experts], &device),
            _ => rank.clone().slice(last.clone()) + kept_count.clone().slice(last),
        };
        // offsets = [0, load_0, load_0 + load_1, ...]: the exclusive prefix sum of the loads.
        let offsets = Tensor::cat(
            vec![
                exclusive_cumsum(tokens_per_expert.clone().reshape([num_experts, 1])),
                tokens_per_expert.clone().sum().reshape([1, 1]),
            ],
            0,
        )
        .reshape([num_experts + 1]);
        let tokens_per_expert = tokens_per_expert.squeeze_dim::<1>(0);

        // Row of each kept pair: its expert's offset plus its rank among that expert's pairs;
        // the dropped pairs get `slots`, which no row has.
        let start = offsets
            .clone()
            .slice(0..num_experts)
            .unsqueeze_dim::<2>(0)
            .expand([num_tokens, num_experts]);
        let slot_of_pair = Tensor::<2, Int>::full([num_tokens, num_experts], slots as i64, &device)
            .mask_where(kept.clone(), rank + start);

        // An empty slot holds the pair `tokens x E`, which names the token `tokens`: no token.
        // The weights are gathered as rows, so an empty slot gets 0, and their gradient is
        // gathered back through `slot_of_pair` (Burn's `select` backward would be a scatter,
        // on cube one thread walking every slot).
        let pair_of_slot = invert_slots(slot_of_pair.clone(), slots);
        let token_of_slot = pair_of_slot.clone().div_scalar(num_experts as i64);
        let pairs = num_tokens * num_experts;
        let weight_of_slot = permute_rows(
            weights.reshape([pairs, 1]),
            pair_of_slot,
            slot_of_pair.reshape([pairs]),
        )
        .reshape([slots]);
        Self {
            token_of_slot,
            weight_of_slot,
            kept,
            tokens_per_expert,
            offsets,
            slots,
        }
    }

    /// Gathers the tokens `x: [tokens, d_model]` into the expert buffer `[S, d_model]`.
    pub fn dispatch(&self, x: Tensor<2>) -> Tensor<2> {
        gather_rows(x, self.token_of_slot.clone())
    }

    /// Weights the expert outputs `[S, d_model]` by their gate values and adds each back to its
    /// token: `y[n] = sum over rows s of token n of weight[s] * expert_output[s]`.
    pub fn combine(&self, expert_output: Tensor<2>, num_tokens: usize) -> Tensor<2> {
        // The gate's weights are in the router's precision; the sum is in the experts'.
        let weight = to_dtype(self.weight_of_slot.clone(), expert_output.dtype());
        combine_rows(
            expert_output,
            weight,
            self.token_of_slot.clone(),
            num_tokens,
        )
    }
}

/// Keeps, in each column, the `capacity` candidates with the largest `scores`; among equal
/// scores at the cut-off the earlier rows win.
fn keep_largest(
    candidates: Tensor<2, Bool>,
    scores: Tensor<2>,
    capacity: usize,
) -> Tensor<2, Bool> {
    let [rows, columns] = scores.dims();
    // Non-candidates score -1 (weights are >= 0), so they never beat a candidate.
    let scores = scores.mask_fill(candidates.clone().bool_not(), -1.0);
    let top = scores
        .clone()
        .gather(0, scores.clone().argtopk(capacity, 0));
    let threshold = top.min_dim(0).expand([rows, columns]);
    let above = scores.clone().greater(threshold.clone());
    let at = scores.equal(threshold).bool_and(candidates);
    let room_at_threshold = above
        .clone()
        .int()
        .sum_dim(0)
        .neg()
        .add_scalar(capacity as i64)
        .expand([rows, columns]);
    let at_kept = at
        .clone()
        .bool_and(exclusive_cumsum(at.int()).lower(room_at_threshold));
    above.bool_or(at_kept)
}
