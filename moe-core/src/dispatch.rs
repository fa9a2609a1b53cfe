//! Dispatch and combine: from the gate's choices to the experts' buffers and back.
//!
//! The experts run on a capacity-padded buffer `[E, C, d_model]`: slot `c` of expert `e` holds
//! the `c`-th token that expert keeps (in token order), empty slots hold token 0 with weight 0.
//! Everything below stays on the device; there is no loop over experts on the host.
//!
//! 1. [`DispatchPlan::new`]: which (token, expert) pairs survive the capacity limit (by
//!    position or by probability), and the slot each one takes, computed with prefix sums
//!    over tokens;
//! 2. [`DispatchPlan::dispatch`]: gather the tokens into the buffer
//!    ([`moe_kernels::gather_rows`]);
//! 3. the experts run on the buffer, each over its filled slots only
//!    ([`crate::Experts::forward_filled`]);
//! 4. [`DispatchPlan::combine`]: weight each slot's output by its gate value and scatter-add it
//!    back to its token ([`moe_kernels::combine_rows`], one operation).
//!
//! A dropped assignment takes no slot and contributes zero; the layer's residual connection
//! carries the token on.

use burn::tensor::ops::IndexingUpdateOp;
use burn::tensor::{Bool, Int, Tensor};
use moe_kernels::{combine_rows, gather_rows};

use crate::DropPolicy;

/// The expert buffer layout for one forward pass.
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// Token feeding each slot, `[E * C]` (slot `e * C + c`); 0 for empty slots.
    pub token_of_slot: Tensor<1, Int>,
    /// Combine weight of each slot, `[E * C]`; 0 for empty slots. Carries the gate's gradient.
    pub weight_of_slot: Tensor<1>,
    /// Which (token, expert) pairs the experts process, `[tokens, E]`.
    pub kept: Tensor<2, Bool>,
    /// Tokens each expert keeps, `[E]`: expert `e` fills its first `tokens_per_expert[e]`
    /// slots, the rest are empty.
    pub tokens_per_expert: Tensor<1, Int>,
    /// Slots per expert.
    pub capacity: usize,
}

impl DispatchPlan {
    /// Lays out the `candidates` (`[tokens, E]`, with combine `weights`) into `capacity` slots
    /// per expert. Under [`DropPolicy::Position`] an expert keeps its earliest candidates; under
    /// [`DropPolicy::Probability`] those with the largest weight, ties going to the earlier
    /// token.
    pub fn new(
        candidates: Tensor<2, Bool>,
        weights: Tensor<2>,
        capacity: usize,
        policy: DropPolicy,
    ) -> Self {
        let [num_tokens, num_experts] = candidates.dims();
        let device = candidates.device();
        let kept = match policy {
            _ if capacity >= num_tokens => candidates,
            DropPolicy::Position => {
                let earlier = exclusive_count(candidates.clone());
                candidates.bool_and(earlier.lower_elem(capacity as i64))
            }
            DropPolicy::Probability => keep_largest(candidates, weights.clone().detach(), capacity),
        };

        // Slot of each kept pair: expert * C + (number of kept pairs of that expert before it).
        let position = exclusive_count(kept.clone());
        let expert_offset =
            Tensor::<1, Int>::arange_step(0..(num_experts * capacity) as i64, capacity, &device)
                .unsqueeze_dim::<2>(0)
                .expand([num_tokens, num_experts]);
        let overflow_slot = (num_experts * capacity) as i64;
        let slot = Tensor::<2, Int>::full([num_tokens, num_experts], overflow_slot, &device)
            .mask_where(kept.clone(), position + expert_offset);

        // Invert the map: for each slot, 1 + the flat index (token * E + expert) of the pair in
        // it, or 0 if empty. Every kept pair has a slot of its own, so `Add` only ever adds to
        // zero; the overflow slot collects zeros from the dropped pairs and is cut off.
        let pair_count = (num_tokens * num_experts) as i64;
        let pair_code = Tensor::<1, Int>::arange(1..pair_count + 1, &device)
            .reshape([num_tokens, num_experts])
            .mask_fill(kept.clone().bool_not(), 0);
        let slot_code = Tensor::<1, Int>::zeros([num_experts * capacity + 1], &device)
            .select_assign(
                0,
                slot.reshape([num_tokens * num_experts]),
                pair_code.reshape([num_tokens * num_experts]),
                IndexingUpdateOp::Add,
            )
            .slice(0..num_experts * capacity);
        let occupied = slot_code.clone().greater_elem(0);
        let pair_of_slot = slot_code.sub_scalar(1).clamp_min(0);
        let token_of_slot = pair_of_slot.clone().div_scalar(num_experts as i64);
        let weight_of_slot = weights
            .reshape([num_tokens * num_experts])
            .select(0, pair_of_slot)
            .mask_fill(occupied.bool_not(), 0.0);

        let tokens_per_expert = kept.clone().int().sum_dim(0).squeeze_dim(0);
        Self {
            token_of_slot,
            weight_of_slot,
            kept,
            tokens_per_expert,
            capacity,
        }
    }

    /// Gathers the tokens `x: [tokens, d_model]` into the expert buffer `[E, C, d_model]`.
    pub fn dispatch(&self, x: Tensor<2>) -> Tensor<3> {
        let [_, d_model] = x.dims();
        let num_experts = self.token_of_slot.dims()[0] / self.capacity;
        gather_rows(x, self.token_of_slot.clone()).reshape([num_experts, self.capacity, d_model])
    }

    /// Weights the expert outputs `[E, C, d_model]` by their gate values and adds each back to
    /// its token: `y[n] = sum over slots s of token n of weight[s] * expert_output[s]`.
    pub fn combine(&self, expert_output: Tensor<3>, num_tokens: usize) -> Tensor<2> {
        let [num_experts, capacity, d_model] = expert_output.dims();
        combine_rows(
            expert_output.reshape([num_experts * capacity, d_model]),
            self.weight_of_slot.clone(),
            self.token_of_slot.clone(),
            num_tokens,
        )
    }
}

/// Rows below which the prefix sum runs in one pass.
const SCAN_BLOCK: usize = 64;

/// For each `[token, expert]` cell, how many `true` cells come before it in the same column:
/// an exclusive prefix count over tokens.
///
/// Burn's `cumsum` costs `O(n^2)` along the scanned dimension on cubecl (wgpu) backends, so
/// long columns are scanned in blocks of 64 rows, then the block totals are scanned.
pub fn exclusive_count(mask: Tensor<2, Bool>) -> Tensor<2, Int> {
    let counts = mask.int();
    let [rows, columns] = counts.dims();
    let inclusive = if rows <= SCAN_BLOCK {
        counts.clone().cumsum(0)
    } else {
        let blocks = rows.div_ceil(SCAN_BLOCK);
        let padded = blocks * SCAN_BLOCK;
        let device = counts.device();
        let blocked = Tensor::cat(
            vec![
                counts.clone(),
                Tensor::<2, Int>::zeros([padded - rows, columns], &device),
            ],
            0,
        )
        .reshape([blocks, SCAN_BLOCK, columns]);
        let within = blocked.cumsum(1);
        let totals = within.clone().narrow(1, SCAN_BLOCK - 1, 1);
        let before = totals.clone().cumsum(0) - totals;
        (within + before)
            .reshape([padded, columns])
            .narrow(0, 0, rows)
    };
    inclusive - counts
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
        .bool_and(exclusive_count(at).lower(room_at_threshold));
    above.bool_or(at_kept)
}
