//! Auxiliary-loss-free balancing evens out a router that starts heavily skewed.

use burn::module::Param;
use burn::tensor::Tensor;
use moe_core::{BiasBalancingConfig, CapacityConfig, ExpertConfig, GateConfig, MoeConfig};

use crate::common::{cpu, ints, matrix, random_values, values};

#[test]
fn a_skewed_router_becomes_balanced() {
    let device = cpu();
    let (tokens, d_model, experts) = (256, 8, 4);
    let mut moe = MoeConfig::new(d_model, experts, ExpertConfig::new(8))
        .with_top_k(1)
        .with_gate(GateConfig::softmax_top_k())
        .with_capacity(CapacityConfig::dropless())
        .with_balance_bias(Some(BiasBalancingConfig::new().with_update_rate(0.02)))
        .init(&device)
        .unwrap();
    // Feature 0 is a constant 1 that adds 2.0 to expert 0's logit: almost every token picks e0.
    let mut router = random_values(d_model * experts, 5);
    for (i, w) in router.iter_mut().enumerate() {
        *w *= 0.3;
        if i == 0 {
            *w = 2.0;
        }
    }
    moe.router.weight = Param::from_tensor(matrix(&router, d_model, experts, &device));
    let mut x = random_values(tokens * d_model, 6);
    for n in 0..tokens {
        x[n * d_model] = 1.0;
    }
    let x: Tensor<2> = matrix(&x, tokens, d_model, &device);

    let imbalance = |load: Vec<i64>| {
        let max = *load.iter().max().unwrap() as f64;
        max * experts as f64 / tokens as f64
    };
    let first = moe.forward(x.clone());
    let start = imbalance(ints(first.stats.tokens_per_expert.clone()));
    assert!(
        start > 2.5,
        "the crafted router should be skewed, max/mean = {start}"
    );

    let mut stats = first.stats;
    for _ in 0..200 {
        moe.update_balance_bias(&stats);
        stats = moe.forward(x.clone()).stats;
    }
    let end = imbalance(ints(stats.tokens_per_expert.clone()));
    assert!(
        end < 1.25,
        "after 200 updates max/mean load is {end} (started at {start})"
    );
    // The bias moved against expert 0.
    let bias = values(moe.balance_bias().unwrap());
    assert!(
        bias[0] < bias[1] && bias[0] < bias[2] && bias[0] < bias[3],
        "{bias:?}"
    );
}
