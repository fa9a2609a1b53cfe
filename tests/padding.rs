//! The dispatch plan's padding belongs to no token, on every backend (wgpu included where a
//! device opens): in a capacity layout that is half padding, every token's row list, which the
//! cube combine and the gather's backward pass walk one unit per token, holds at most `top_k`
//! rows, and the padding rows name the token index `tokens` (one past the last). Before, every
//! padding row named token 0, whose list then held half the buffer and was sorted by a single
//! GPU thread.

use burn::tensor::{Bool, Device, Tensor, TensorData};
use burn_moe::core::dispatch::DispatchPlan;
use burn_moe::core::DropPolicy;

fn devices() -> Vec<(&'static str, Device)> {
    #[allow(deprecated)]
    let mut devices = vec![("ndarray", Device::ndarray()), ("flex", Device::flex())];
    match burn_moe::train::runtime::backend::any_wgpu() {
        Ok(selected) => devices.push(("wgpu", selected.device)),
        Err(error) => {
            let required = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "BURN_MOE_REQUIRE_WGPU=1 but no wgpu device: {error}"
            );
            eprintln!("wgpu: skipped: {error}");
        }
    }
    devices
}

#[test]
fn half_padding_gives_no_token_more_than_top_k_rows() {
    let (tokens, experts, top_k) = (512, 8, 2);
    // Each token asks two different experts; every expert is asked by 128 tokens.
    let mut mask = vec![false; tokens * experts];
    for token in 0..tokens {
        let first = token % experts;
        let second = (first + 1 + (token / experts) % (experts - 1)) % experts;
        mask[token * experts + first] = true;
        mask[token * experts + second] = true;
    }
    let weights: Vec<f32> = mask
        .iter()
        .enumerate()
        .map(|(i, &asked)| {
            if asked {
                0.25 + (i % 7) as f32 / 10.0
            } else {
                0.0
            }
        })
        .collect();
    // Capacity factor 2: 256 rows per expert for the 128 each is asked by.
    let capacity = 2 * tokens * top_k / experts;
    let slots = experts * capacity;
    for (backend, device) in devices() {
        let candidates =
            Tensor::<2, Bool>::from_data(TensorData::new(mask.clone(), [tokens, experts]), &device);
        let weight_matrix =
            Tensor::<2>::from_data(TensorData::new(weights.clone(), [tokens, experts]), &device);
        let plan =
            DispatchPlan::with_capacity(candidates, weight_matrix, capacity, DropPolicy::Position);
        let token_of_slot: Vec<i64> = plan.token_of_slot.clone().try_into_vec_as::<i64>().unwrap();
        let mut rows_of_token = vec![0usize; tokens];
        let mut padding = 0;
        for &token in &token_of_slot {
            match usize::try_from(token) {
                Ok(token) if token < tokens => rows_of_token[token] += 1,
                Ok(token) if token == tokens => padding += 1,
                _ => panic!("{backend}: a slot names {token}, neither a token nor `tokens`"),
            }
        }
        assert_eq!(
            padding,
            slots - tokens * top_k,
            "{backend}: half the buffer is padding"
        );
        let most = rows_of_token.iter().max().copied().unwrap_or(0);
        assert_eq!(most, top_k, "{backend}: the longest row list of a token");
        assert!(
            rows_of_token.iter().all(|&rows| rows == top_k),
            "{backend}: every token kept"
        );

        // The combine of ones sums each token's two weights; padding adds nothing.
        let ones = Tensor::<2>::ones([slots, 1], &device);
        let combined = plan.combine(ones, tokens);
        let sums: Vec<f32> = combined.try_into_vec_as::<f32>().unwrap();
        for (token, sum) in sums.iter().enumerate() {
            let expected: f32 = weights[token * experts..(token + 1) * experts].iter().sum();
            assert!(
                (sum - expected).abs() < 1e-5,
                "{backend}: token {token}: {sum} != {expected}"
            );
        }
    }
}
