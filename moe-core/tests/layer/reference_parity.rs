//! The layer's tensor dispatch against the loop-over-tokens reference, for every gate.

use moe_core::reference::ReferenceMoe;
use moe_core::{
    Activation, CapacityConfig, DropPolicy, ExpertConfig, ExpertKind, GateConfig, MoeConfig,
};

use crate::common::{assert_close, cpu, ints, matrix, random_values};

/// One shape to test: tokens, experts, experts per token, capacity.
struct Shape {
    name: &'static str,
    tokens: usize,
    experts: usize,
    top_k: usize,
    capacity: CapacityConfig,
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "fewer tokens than experts",
            tokens: 3,
            experts: 8,
            top_k: 2,
            capacity: CapacityConfig::new(),
        },
        Shape {
            name: "k equals E",
            tokens: 10,
            experts: 4,
            top_k: 4,
            capacity: CapacityConfig::new(),
        },
        Shape {
            name: "capacity drops, position policy",
            tokens: 70,
            experts: 4,
            top_k: 2,
            capacity: CapacityConfig::new()
                .with_eval_factor(0.5)
                .with_min_capacity(1),
        },
        Shape {
            name: "capacity drops, probability policy",
            tokens: 70,
            experts: 4,
            top_k: 2,
            capacity: CapacityConfig::new()
                .with_eval_factor(0.5)
                .with_min_capacity(1)
                .with_drop_policy(DropPolicy::Probability),
        },
        Shape {
            name: "dropless",
            tokens: 33,
            experts: 5,
            top_k: 2,
            capacity: CapacityConfig::dropless(),
        },
    ]
}

fn gates() -> Vec<GateConfig> {
    vec![
        GateConfig::naive(),
        GateConfig::softmax_top_k(),
        GateConfig::SoftmaxTopK(moe_core::gate::SoftmaxTopKGate::new().with_renormalize(false)),
        GateConfig::noisy(),
        GateConfig::gshard(),
        GateConfig::switch(),
        GateConfig::expert_choice(),
    ]
}

fn kinds() -> Vec<ExpertKind> {
    vec![ExpertKind::Ffn(Activation::Gelu), ExpertKind::SwiGlu]
}

#[test]
fn fast_dispatch_matches_reference_for_every_gate_kind_and_shape() {
    let device = cpu();
    let (d_model, d_hidden) = (6, 10);
    let mut checked = 0;
    let mut dropping_cases = 0;
    for (g, gate) in gates().into_iter().enumerate() {
        for (k, kind) in kinds().into_iter().enumerate() {
            for (s, shape) in shapes().into_iter().enumerate() {
                let top_k = match gate {
                    GateConfig::GShard(_) => 2,
                    GateConfig::Switch(_) => 1,
                    _ => shape.top_k,
                };
                if top_k > shape.experts || (gate.is_expert_choice() && shape.capacity.dropless) {
                    continue;
                }
                let config = MoeConfig::new(
                    d_model,
                    shape.experts,
                    ExpertConfig::new(d_hidden).with_kind(kind),
                )
                .with_top_k(top_k)
                .with_gate(gate.clone())
                .with_capacity(shape.capacity.clone())
                .with_shared_experts(usize::from(s == 1 || s == 3))
                // Qwen2-MoE's shared block: its own width, behind a sigmoid gate.
                .with_shared_d_hidden((s == 3).then_some(7))
                .with_shared_gate(s == 3)
                // DeepSeek's factor on the routed sum, on one shape of each gate and kind.
                .with_routed_scale(if s == 2 { 2.5 } else { 1.0 });
                let seed = (g * 100 + k * 10 + s) as u64;
                device.seed(seed);
                let moe = config.init(&device).unwrap();
                let x = random_values(shape.tokens * d_model, seed + 1000);
                let out = moe.forward(matrix(&x, shape.tokens, d_model, &device));

                let reference = ReferenceMoe::from_module(&moe)
                    .forward(&x.iter().map(|&v| v as f64).collect::<Vec<_>>());
                let what = format!("{} gate, {kind:?}, {}", gate.name(), shape.name);
                assert_close(
                    &what,
                    &crate::common::values(out.output),
                    &reference.output,
                    1e-5,
                );

                let mut expected_per_expert = vec![0i64; shape.experts];
                for &(_, e) in &reference.kept {
                    expected_per_expert[e] += 1;
                }
                assert_eq!(
                    ints(out.stats.tokens_per_expert.clone()),
                    expected_per_expert,
                    "{what}: tokens per expert"
                );
                let dropped = ints(out.stats.dropped_assignments())[0];
                if !gate.is_expert_choice() {
                    // Evaluation keeps GShard's second choice, so every token asks for top_k.
                    let asked = shape.tokens * top_k;
                    assert_eq!(
                        dropped as usize,
                        asked - reference.kept.len(),
                        "{what}: dropped assignments"
                    );
                }
                if dropped > 0 {
                    dropping_cases += 1;
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 60, "only {checked} cases ran");
    assert!(
        dropping_cases >= 10,
        "only {dropping_cases} cases dropped tokens"
    );
}
