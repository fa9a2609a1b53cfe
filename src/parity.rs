//! Backend parity: the same weights and input on a reference device and on another give the
//! same outputs, auxiliary losses, routing decisions and gradients. The test suite
//! (`tests/backend_parity.rs`) runs it with ndarray as the reference against flex and wgpu;
//! `moe-bench gpu-check` with flex against a GPU.
//!
//! Tolerance: every element within 1e-4 of the largest magnitude of the reference tensor
//! (1e-4 relative, normwise, for f32); routing decisions must be identical. The sizes are
//! small (24 tokens of width 8) so that no near-tie of router scores can flip a decision.

use std::panic::{catch_unwind, AssertUnwindSafe};

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use moe_core::reference::random_values;
use moe_core::{
    Activation, CapacityConfig, DropPolicy, ExpertConfig, ExpertKind, GateConfig, LossConfig, Moe,
    MoeConfig, RoutingMode,
};
use moe_kernels::testing::assert_close_to_largest;

const TOKENS: usize = 24;
const D_MODEL: usize = 8;
const D_HIDDEN: usize = 16;
const EXPERTS: usize = 4;

/// One layer configuration to compare.
pub struct Case {
    /// What it covers.
    pub name: String,
    /// The layer.
    pub config: MoeConfig,
    /// Zero the router so that every score ties.
    pub zero_router: bool,
    /// Make every token the same vector.
    pub identical_tokens: bool,
}

/// The layer cases: every gate with both expert forms under a capacity (by position and by
/// probability) and dropless; 16 fine experts top-4; and ties (a zero router, identical tokens).
/// A table, one entry per case, long by design.
pub fn cases() -> Vec<Case> {
    let gates = [
        (GateConfig::naive(), 2),
        (GateConfig::softmax_top_k(), 2),
        (GateConfig::noisy(), 2),
        (GateConfig::gshard(), 2),
        (GateConfig::switch(), 1),
        (GateConfig::expert_choice(), 2),
    ];
    let kinds = [ExpertKind::Ffn(Activation::Gelu), ExpertKind::SwiGlu];
    let capacities = [
        (
            "capacity",
            CapacityConfig::new()
                .with_eval_factor(0.75)
                .with_min_capacity(1),
        ),
        (
            "capacity by probability",
            CapacityConfig::new()
                .with_eval_factor(0.75)
                .with_min_capacity(1)
                .with_drop_policy(DropPolicy::Probability),
        ),
        ("dropless", CapacityConfig::dropless()),
    ];
    let mut cases = Vec::new();
    for (gate, top_k) in &gates {
        for kind in kinds {
            for (capacity_name, capacity) in &capacities {
                if gate.is_expert_choice() && capacity.dropless {
                    continue;
                }
                cases.push(Case {
                    name: format!("{} gate, {kind:?}, {capacity_name}", gate.name()),
                    config: MoeConfig::new(
                        D_MODEL,
                        EXPERTS,
                        ExpertConfig::new(D_HIDDEN).with_kind(kind),
                    )
                    .with_top_k(*top_k)
                    .with_gate(gate.clone())
                    .with_capacity(capacity.clone())
                    .with_losses(weighted_losses()),
                    zero_router: false,
                    identical_tokens: false,
                });
            }
        }
    }
    // The tiny preset's design at this scale: many fine experts, several per token.
    cases.push(Case {
        name: "softmax-top-k gate, 16 experts, top-4, dropless".into(),
        config: MoeConfig::new(D_MODEL, 16, ExpertConfig::new(D_HIDDEN))
            .with_top_k(4)
            .with_gate(GateConfig::softmax_top_k())
            .with_capacity(CapacityConfig::dropless())
            .with_losses(weighted_losses()),
        zero_router: false,
        identical_tokens: false,
    });
    // Ties: a zero router gives every expert the same score; identical tokens give every token
    // the same score. The chosen experts and kept tokens must not depend on the backend.
    for (gate, top_k) in [
        (GateConfig::softmax_top_k(), 2),
        (GateConfig::expert_choice(), 2),
    ] {
        for (zero_router, identical_tokens) in [(true, false), (false, true)] {
            cases.push(Case {
                name: format!(
                    "{} gate, ties ({})",
                    gate.name(),
                    if zero_router {
                        "zero router"
                    } else {
                        "identical tokens"
                    }
                ),
                config: MoeConfig::new(D_MODEL, EXPERTS, ExpertConfig::new(D_HIDDEN))
                    .with_top_k(top_k)
                    .with_gate(gate.clone())
                    .with_capacity(
                        CapacityConfig::new()
                            .with_eval_factor(0.75)
                            .with_min_capacity(1)
                            .with_drop_policy(DropPolicy::Probability),
                    ),
                zero_router,
                identical_tokens,
            });
        }
    }
    cases
}

/// Both auxiliary losses with weights large enough that a wrong loss shows in the gradients.
fn weighted_losses() -> LossConfig {
    LossConfig::new()
        .with_balance_weight(0.1)
        .with_z_loss_weight(0.01)
}

/// Everything compared between two backends, read back to the host.
struct Observed {
    output: Vec<f64>,
    aux_loss: Vec<f64>,
    assignments: Vec<bool>,
    gradients: Vec<(&'static str, Vec<f64>)>,
}

fn host<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    moe_core::reference::host(tensor)
}

/// Runs the layer forward (evaluation routing, so no noise) and backward on `device`.
fn observe(moe: &Moe, x: &[f32], device: &Device) -> Observed {
    let plain = moe.clone().to_device(device);
    let input = || Tensor::<2>::from_data(TensorData::new(x.to_vec(), [TOKENS, D_MODEL]), device);
    let out = plain.forward_with_mode(input(), RoutingMode::Eval);
    let assignments = out.stats.assignments().try_into_vec_as::<bool>().unwrap();

    let trained = plain.clone().train();
    let autodiff_device = device.clone().autodiff();
    let x_ad = Tensor::<2>::from_data(
        TensorData::new(x.to_vec(), [TOKENS, D_MODEL]),
        &autodiff_device,
    )
    .require_grad();
    let out_ad = trained.forward_with_mode(x_ad.clone(), RoutingMode::Eval);
    let weights = Tensor::<2>::from_data(
        TensorData::new(random_values(TOKENS * D_MODEL, 99), [TOKENS, D_MODEL]),
        &autodiff_device,
    );
    let grads = ((out_ad.output * weights).sum() + out_ad.aux_loss).backward();
    let mut gradients = vec![
        ("input", host(x_ad.grad(&grads).expect("input gradient"))),
        (
            "router",
            host(
                trained
                    .router
                    .weight
                    .val()
                    .grad(&grads)
                    .expect("router gradient"),
            ),
        ),
        (
            "w_in",
            host(
                trained
                    .experts
                    .w_in
                    .val()
                    .grad(&grads)
                    .expect("w_in gradient"),
            ),
        ),
        (
            "w_out",
            host(
                trained
                    .experts
                    .w_out
                    .val()
                    .grad(&grads)
                    .expect("w_out gradient"),
            ),
        ),
    ];
    if let Some(w_gate) = &trained.experts.w_gate {
        gradients.push((
            "w_gate",
            host(w_gate.val().grad(&grads).expect("w_gate gradient")),
        ));
    }
    Observed {
        output: host(out.output),
        aux_loss: host(out.aux_loss),
        assignments,
        gradients,
    }
}

/// Runs `case` on `reference` and `device` and panics, naming what, where they differ.
pub fn compare(case: &Case, reference: &Device, device: &Device) {
    let reference = reference.clone();
    reference.seed(17);
    let mut moe = case.config.init(&reference).expect("valid config");
    if case.zero_router {
        moe.router.weight = Param::from_tensor(Tensor::zeros([D_MODEL, EXPERTS], &reference));
    }
    let mut x = random_values(TOKENS * D_MODEL, 5);
    if case.identical_tokens {
        let first = x[..D_MODEL].to_vec();
        for row in x.chunks_mut(D_MODEL) {
            row.copy_from_slice(&first);
        }
    }
    let expected = observe(&moe, &x, &reference);
    let actual = observe(&moe, &x, device);
    assert_eq!(
        actual.assignments, expected.assignments,
        "routing decisions differ"
    );
    assert_close_to_largest("output", &actual.output, &expected.output, 1e-4);
    assert_close_to_largest("aux loss", &actual.aux_loss, &expected.aux_loss, 1e-4);
    for ((name, a), (_, e)) in actual.gradients.iter().zip(&expected.gradients) {
        assert_close_to_largest(&format!("gradient of {name}"), a, e, 1e-4);
    }
}

/// A whole small MoE text model: logits, auxiliary loss, every layer's routing and the
/// gradients of the embedding and of the first MoE layer's router and experts.
pub fn compare_text_model(reference: &Device, device: &Device) {
    use moe_models::{DecoderConfig, MoeTransformerConfig, PositionKind};
    let reference = reference.clone();
    reference.seed(23);
    let moe = MoeConfig::new(16, 4, ExpertConfig::new(24).with_kind(ExpertKind::SwiGlu))
        .with_top_k(2)
        .with_capacity(
            CapacityConfig::new()
                .with_train_factor(1.0)
                .with_min_capacity(1),
        )
        .with_losses(LossConfig::new().with_z_loss_weight(0.01));
    let decoder = DecoderConfig::new(12, 16, 2, 4, 48, moe).with_positions(PositionKind::Learned);
    let config = MoeTransformerConfig::new(31, decoder);
    let model = config.init(&reference).unwrap();
    let ids: Vec<i64> = (0..24).map(|i| (i * 7 % 31) as i64).collect();

    let observe = |device: &Device| {
        let autodiff = device.clone().autodiff();
        let model = model.clone().to_device(device).train();
        let tokens = Tensor::<2, burn::tensor::Int>::from_data(
            TensorData::new(ids.clone(), [2, 12]),
            &autodiff,
        );
        let out = model.forward(tokens);
        let assignments: Vec<Vec<bool>> = out
            .layer_stats
            .iter()
            .map(|stats| stats.assignments().try_into_vec_as::<bool>().unwrap())
            .collect();
        let loss = out.logits.clone().powi_scalar(2).mean() + out.aux_loss.clone();
        let grads = loss.backward();
        let layer = model.stack.blocks[0].ffn.moe.as_ref().unwrap();
        (
            host(out.logits),
            host(out.aux_loss),
            assignments,
            vec![
                host(model.token_embedding.weight.val().grad(&grads).unwrap()),
                host(layer.router.weight.val().grad(&grads).unwrap()),
                host(layer.experts.w_in.val().grad(&grads).unwrap()),
            ],
        )
    };
    let expected = observe(&reference);
    let actual = observe(device);
    assert_eq!(actual.2, expected.2, "routing decisions differ");
    assert_close_to_largest("logits", &actual.0, &expected.0, 1e-4);
    assert_close_to_largest("aux loss", &actual.1, &expected.1, 1e-4);
    for (name, (a, e)) in ["embedding", "router", "w_in"]
        .iter()
        .zip(actual.3.iter().zip(&expected.3))
    {
        assert_close_to_largest(&format!("gradient of {name}"), a, e, 1e-4);
    }
}

/// Every layer case and the whole text model on `device` against `reference`: each case's name
/// and `Err` with the first difference where they differ.
pub fn run(reference: &Device, device: &Device) -> Vec<(String, Result<(), String>)> {
    let mut results: Vec<(String, Result<(), String>)> = cases()
        .iter()
        .map(|case| {
            let result = catching(|| compare(case, reference, device));
            (case.name.clone(), result)
        })
        .collect();
    results.push((
        "whole MoE text model, training mode".into(),
        catching(|| compare_text_model(reference, device)),
    ));
    results
}

/// `Err` with the panic's message if `work` panics.
pub fn catching(work: impl FnOnce()) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}
