//! Expert parallelism against the layer on one device: the experts spread over ndarray and flex
//! devices give the same output and the same gradients, for every gate, capacity and dropless.

#![cfg(feature = "flex")]

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use moe_core::placement::ExpertPlacement;
use moe_core::{
    Activation, CapacityConfig, ExpertConfig, ExpertKind, Experts, GateConfig, Moe, MoeConfig,
};

use crate::common::{assert_close, cpu, matrix, random_values, values};

fn gates() -> Vec<GateConfig> {
    vec![
        GateConfig::naive(),
        GateConfig::softmax_top_k(),
        GateConfig::noisy(),
        GateConfig::gshard(),
        GateConfig::switch(),
        GateConfig::expert_choice(),
    ]
}

/// Output, input gradient and every parameter's gradient (experts gathered into one stack)
/// of `sum(y^2) + aux` for `x`, with the noise drawn from `seed`.
fn run(moe: &Moe, x: &[f32], tokens: usize, seed: u64) -> Vec<(String, Vec<f64>)> {
    let device = moe.router.weight.device();
    device.seed(seed);
    let input = matrix(x, tokens, 6, &device).require_grad();
    let out = moe.forward(input.clone());
    let loss = out.output.clone().powi_scalar(2).sum() + out.aux_loss;
    let grads = loss.backward();
    let grad = |param: &Param<Tensor<3>>| values(param.val().grad(&grads).expect("a gradient"));
    let mut found = vec![
        ("output".to_string(), values(out.output)),
        ("d input".to_string(), values(input.grad(&grads).unwrap())),
        (
            "d router".to_string(),
            values(moe.router.weight.val().grad(&grads).unwrap()),
        ),
    ];
    let shards: Vec<&Experts> = std::iter::once(&moe.experts)
        .chain(&moe.placed_experts)
        .collect();
    let gathered = |get: fn(&Experts) -> &Param<Tensor<3>>| -> Vec<f64> {
        shards.iter().flat_map(|shard| grad(get(shard))).collect()
    };
    found.push(("d w_in".into(), gathered(|e| &e.w_in)));
    found.push(("d w_out".into(), gathered(|e| &e.w_out)));
    found
}

#[test]
fn experts_on_several_devices_match_one_device() {
    let home = cpu().autodiff();
    let flex = Device::flex().autodiff();
    let capacities = [
        (
            "capacity",
            CapacityConfig::new()
                .with_train_factor(0.75)
                .with_min_capacity(1),
        ),
        ("dropless", CapacityConfig::dropless()),
    ];
    let tokens = 21;
    let x = random_values(tokens * 6, 3);
    let mut checked = 0;
    for (g, gate) in gates().into_iter().enumerate() {
        for (name, capacity) in capacities.clone() {
            if gate.is_expert_choice() && capacity.dropless {
                continue;
            }
            let top_k = match gate {
                GateConfig::Switch(_) => 1,
                _ => 2,
            };
            let kind = if g % 2 == 0 {
                ExpertKind::SwiGlu
            } else {
                ExpertKind::Ffn(Activation::Gelu)
            };
            home.seed(g as u64);
            let single = MoeConfig::new(6, 5, ExpertConfig::new(8).with_kind(kind))
                .with_top_k(top_k)
                .with_gate(gate.clone())
                .with_capacity(capacity)
                .with_shared_experts(1)
                .init(&home)
                .unwrap();
            // Experts 0-1 on flex, 2 on ndarray, 3-4 on flex: three shards on two backends.
            let placement = ExpertPlacement::with_counts(
                vec![flex.clone(), home.clone(), flex.clone()],
                vec![2, 1, 2],
            )
            .unwrap();
            let placed = single.clone().with_placement(placement).unwrap();
            assert_eq!(placed.placed_experts.len(), 2);
            assert_eq!(placed.experts.w_in.device(), flex);

            let what = format!("{} gate, {name}", gate.name());
            let expected = run(&single, &x, tokens, 9);
            let actual = run(&placed, &x, tokens, 9);
            for ((label, want), (_, got)) in expected.iter().zip(&actual) {
                assert_close(&format!("{what}: {label}"), got, want, 1e-5);
            }
            // Gathered back, the layer is the single-device one again.
            let gathered = placed.gathered();
            assert!(gathered.placed_experts.is_empty());
            assert_close(
                &what,
                &values(gathered.experts.w_in.val()),
                &values(single.experts.w_in.val()),
                0.0,
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 11);
}

#[test]
fn placements_that_cannot_be_are_refused() {
    let device = cpu();
    let moe = MoeConfig::new(6, 4, ExpertConfig::new(8))
        .init(&device)
        .unwrap();
    let error = ExpertPlacement::even(4, Vec::new()).unwrap_err();
    assert!(error.to_string().contains("no device"), "{error}");
    let error =
        ExpertPlacement::with_counts(vec![device.clone(), device.clone()], vec![4, 0]).unwrap_err();
    assert!(error.to_string().contains("device 1"), "{error}");
    let three = ExpertPlacement::even(3, vec![device.clone()]).unwrap();
    let error = moe.clone().with_placement(three).unwrap_err();
    assert!(
        error.to_string().contains("3 experts") && error.to_string().contains("4"),
        "{error}"
    );
    let even = ExpertPlacement::even(4, vec![device.clone(), device.clone(), device]).unwrap();
    assert_eq!(even.ranges(), &[0..2, 2..3, 3..4]);
}
