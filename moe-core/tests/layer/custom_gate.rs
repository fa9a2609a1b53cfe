//! A gate that is not one of ours, through `Moe::with_gate`: its output against the experts
//! run one by one, its routing in the statistics, and its gradient path.

use burn::tensor::{Int, Tensor, TensorData};
use moe_core::gate::{to_expert_matrix, Gate, GateInput, GateOutput};
use moe_core::{CapacityConfig, ExpertConfig, MoeConfig};

use crate::common::{assert_close, cpu, ints, matrix, random_values};

/// Round-robin routing: token `n` goes to experts `n mod E` and `(n + 1) mod E`, with weights
/// 0.75 and 0.25, whatever it holds (a fixed, learning-free routing in the spirit of hash
/// layers, Roller et al. 2021).
#[derive(Debug)]
struct RoundRobin;

impl Gate for RoundRobin {
    fn route(&self, input: GateInput<'_>) -> GateOutput {
        let [tokens, _] = input.x.dims();
        let experts = input.router.num_experts();
        let device = input.x.device();
        let indices: Vec<i64> = (0..tokens)
            .flat_map(|n| [(n % experts) as i64, ((n + 1) % experts) as i64])
            .collect();
        let indices = Tensor::<2, Int>::from_data(TensorData::new(indices, [tokens, 2]), &device);
        let values = Tensor::<2>::from_data(
            TensorData::new([0.75f32, 0.25].repeat(tokens), [tokens, 2]),
            &device,
        );
        let (weights, candidates) = to_expert_matrix(indices, values, experts);
        let logits = input.router.logits(input.x);
        GateOutput {
            probs: burn::tensor::activation::softmax(logits.clone(), 1),
            logits,
            candidates,
            weights,
            balance_loss: None,
        }
    }
}

#[test]
fn a_users_gate_routes_through_the_same_dispatch() {
    let device = cpu();
    let (tokens, d, experts) = (9, 6, 4);
    for capacity in [
        CapacityConfig::dropless(),
        CapacityConfig::new().with_train_factor(4.0),
    ] {
        device.seed(3);
        let moe = MoeConfig::new(d, experts, ExpertConfig::new(10))
            .with_capacity(capacity)
            .init(&device)
            .unwrap()
            .with_gate(RoundRobin);
        assert!(moe.custom_gate().is_some());
        let x = random_values(tokens * d, 7);
        let out = moe.forward(matrix(&x, tokens, d, &device));

        // Every expert on every token (the batched form, no dispatch), then the mix by hand.
        let all = moe.experts.forward(
            matrix(&x, tokens, d, &device)
                .unsqueeze_dim::<3>(0)
                .repeat_dim(0, experts),
        );
        let all = crate::common::values(all);
        let mut expected = vec![0.0; tokens * d];
        for n in 0..tokens {
            for (e, w) in [(n % experts, 0.75), ((n + 1) % experts, 0.25)] {
                for i in 0..d {
                    expected[n * d + i] += w * all[(e * tokens + n) * d + i];
                }
            }
        }
        assert_close(
            "round robin",
            &crate::common::values(out.output),
            &expected,
            1e-5,
        );
        // Each expert gets the tokens the rule sends it: 9 tokens, two each, over 4 experts.
        assert_eq!(ints(out.stats.tokens_per_expert), vec![5, 5, 4, 4]);
    }
}
