//! Exactly which assignments each drop policy keeps, on a crafted input.

use burn::tensor::{Bool, Tensor, TensorData};
use moe_core::dispatch::DispatchPlan;
use moe_core::DropPolicy;

use crate::common::{bools, cpu, ints, matrix, values};

/// Five tokens, two experts. Weights (0 = not a candidate):
///
/// | token | e0   | e1  |
/// |-------|------|-----|
/// | 0     | 0.9  | -   |
/// | 1     | 0.6  | 0.4 |
/// | 2     | 0.95 | -   |
/// | 3     | -    | 0.7 |
/// | 4     | 0.6  | 0.3 |
fn crafted() -> (Tensor<2, Bool>, Tensor<2>) {
    let device = cpu();
    let weights = [0.9, 0.0, 0.6, 0.4, 0.95, 0.0, 0.0, 0.7, 0.6, 0.3];
    let mask: Vec<bool> = weights.iter().map(|&w| w > 0.0).collect();
    (
        Tensor::from_data(TensorData::new(mask, [5, 2]), &device),
        matrix(&weights, 5, 2, &device),
    )
}

fn kept(plan: &DispatchPlan) -> Vec<bool> {
    bools(plan.kept.clone())
}

#[test]
fn position_policy_keeps_the_earliest_tokens() {
    let (candidates, weights) = crafted();
    let plan = DispatchPlan::with_capacity(candidates, weights, 2, DropPolicy::Position);
    // e0 is asked by tokens 0, 1, 2, 4 and keeps 0, 1; e1 by 1, 3, 4 and keeps 1, 3.
    #[rustfmt::skip]
    let expected = vec![
        true, false,
        true, true,
        false, false,
        false, true,
        false, false,
    ];
    assert_eq!(kept(&plan), expected);
    // Slots: e0 = [token 0, token 1], e1 = [token 1, token 3].
    assert_eq!(ints(plan.token_of_slot.clone()), vec![0, 1, 1, 3]);
    let w = values(plan.weight_of_slot.clone());
    crate::common::assert_close("slot weights", &w, &[0.9, 0.6, 0.4, 0.7], 1e-6);
}

#[test]
fn probability_policy_keeps_the_largest_weights() {
    let (candidates, weights) = crafted();
    let plan = DispatchPlan::with_capacity(candidates, weights, 2, DropPolicy::Probability);
    // e0: 0.95 (token 2) and 0.9 (token 0); e1: 0.7 (token 3) and 0.4 (token 1).
    #[rustfmt::skip]
    let expected = vec![
        true, false,
        false, true,
        true, false,
        false, true,
        false, false,
    ];
    assert_eq!(kept(&plan), expected);
    // Within an expert the slots stay in token order.
    assert_eq!(ints(plan.token_of_slot.clone()), vec![0, 2, 1, 3]);
}

#[test]
fn probability_policy_breaks_ties_by_position() {
    let device = cpu();
    // One expert, tokens 1, 2 and 4 tie at 0.5; token 0 has 0.9; capacity 2.
    let weights = [0.9, 0.5, 0.5, 0.0, 0.5];
    let mask: Vec<bool> = weights.iter().map(|&w| w > 0.0).collect();
    let candidates = Tensor::from_data(TensorData::new(mask, [5, 1]), &device);
    let plan = DispatchPlan::with_capacity(
        candidates,
        matrix(&weights, 5, 1, &device),
        2,
        DropPolicy::Probability,
    );
    assert_eq!(kept(&plan), vec![true, true, false, false, false]);
}

#[test]
fn empty_slots_have_zero_weight_and_the_capacity_never_overflows() {
    let (candidates, weights) = crafted();
    // Capacity 4: e0 takes all four candidates, e1 its three and one empty slot, which names
    // no token (5: one past the last).
    let plan = DispatchPlan::with_capacity(candidates, weights, 4, DropPolicy::Position);
    assert_eq!(
        ints(plan.token_of_slot.clone()),
        vec![0, 1, 2, 4, 1, 3, 4, 5]
    );
    let w = values(plan.weight_of_slot.clone());
    crate::common::assert_close(
        "slot weights",
        &w,
        &[0.9, 0.6, 0.95, 0.6, 0.4, 0.7, 0.3, 0.0],
        1e-6,
    );
}

#[test]
fn long_columns_are_counted_exactly() {
    // 200 tokens all asking expert 0 (longer than one scan block): with capacity 130 the first
    // 130 are kept.
    let device = cpu();
    let candidates =
        Tensor::<2, Bool>::from_data(TensorData::new(vec![true; 200], [200, 1]), &device);
    let weights = Tensor::<2>::ones([200, 1], &device);
    let plan = DispatchPlan::with_capacity(candidates, weights, 130, DropPolicy::Position);
    let kept = kept(&plan);
    assert!(kept[..130].iter().all(|&k| k));
    assert!(kept[130..].iter().all(|&k| !k));
    let expected: Vec<i64> = (0..130).collect();
    assert_eq!(ints(plan.token_of_slot.clone()), expected);
}

#[test]
fn dropless_plans_lay_the_candidates_out_ragged() {
    let (candidates, weights) = crafted();
    // 5 tokens x top-2: 10 rows for the 7 candidates. e0 takes rows 0..4 (tokens 0, 1, 2, 4),
    // e1 rows 4..7 (tokens 1, 3, 4); rows 7..10 are padding (no token: 5, weight 0).
    let plan = DispatchPlan::dropless(candidates, weights, 10);
    assert_eq!(ints(plan.offsets.clone()), vec![0, 4, 7]);
    assert_eq!(ints(plan.tokens_per_expert.clone()), vec![4, 3]);
    assert_eq!(
        ints(plan.token_of_slot.clone()),
        vec![0, 1, 2, 4, 1, 3, 4, 5, 5, 5]
    );
    let w = values(plan.weight_of_slot.clone());
    crate::common::assert_close(
        "slot weights",
        &w,
        &[0.9, 0.6, 0.95, 0.6, 0.4, 0.7, 0.3, 0.0, 0.0, 0.0],
        1e-6,
    );
    assert!(kept(&plan)
        .iter()
        .zip(bools(crafted().0))
        .all(|(&k, c)| k == c));
}

#[test]
fn a_dropless_buffer_does_not_grow_with_the_busiest_expert() {
    // Every one of 300 tokens asks expert 2 of 4: one group of 300 rows, the others empty, in
    // a buffer of exactly 300 rows.
    let device = cpu();
    let mut mask = vec![false; 300 * 4];
    for token in 0..300 {
        mask[token * 4 + 2] = true;
    }
    let candidates = Tensor::<2, Bool>::from_data(TensorData::new(mask, [300, 4]), &device);
    let plan = DispatchPlan::dropless(candidates, Tensor::ones([300, 4], &device), 300);
    assert_eq!(ints(plan.offsets.clone()), vec![0, 0, 0, 300, 300]);
    assert_eq!(plan.slots, 300);
    let expected: Vec<i64> = (0..300).collect();
    assert_eq!(ints(plan.token_of_slot.clone()), expected);
}
