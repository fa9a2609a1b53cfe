//! Backend parity: the same weights and input on ndarray (the reference) and on flex and wgpu
//! give the same outputs, auxiliary losses, routing decisions and gradients.
//!
//! Tolerance: every element within 1e-4 of the largest magnitude of the reference tensor
//! (1e-4 relative, normwise, for f32); routing decisions must be identical.
//!
//! This test has its own runner (`harness = false`) so that it can say, unconditionally, which
//! backends it ran and which it skipped and why. With `BURN_MOE_REQUIRE_WGPU=1` (set by
//! `.ci/run` once it has installed a software Vulkan driver), a missing wgpu device fails the
//! run instead of being skipped.

use std::panic::{catch_unwind, AssertUnwindSafe};

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use burn_moe::core::reference::random_values;
use burn_moe::core::{
    Activation, CapacityConfig, DropPolicy, ExpertConfig, ExpertKind, GateConfig, LossConfig, Moe,
    MoeConfig, RoutingMode,
};

const TOKENS: usize = 24;
const D_MODEL: usize = 8;
const D_HIDDEN: usize = 16;
const EXPERTS: usize = 4;

#[allow(deprecated)]
fn reference_device() -> Device {
    Device::ndarray()
}

/// One layer configuration to compare.
struct Case {
    name: String,
    config: MoeConfig,
    /// Zero the router so that every score ties.
    zero_router: bool,
    /// Make every token the same vector.
    identical_tokens: bool,
}

fn cases() -> Vec<Case> {
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
    burn_moe::core::reference::host(tensor)
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

fn assert_close(what: &str, actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= 1e-4 * scale,
            "{what}: element {i} is {a}, reference {e} (tolerance {:.2e})",
            1e-4 * scale
        );
    }
}

fn compare(case: &Case, device: &Device) {
    let reference = reference_device();
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
    assert_close("output", &actual.output, &expected.output);
    assert_close("aux loss", &actual.aux_loss, &expected.aux_loss);
    for ((name, a), (_, e)) in actual.gradients.iter().zip(&expected.gradients) {
        assert_close(&format!("gradient of {name}"), a, e);
    }
}

/// A whole small MoE text model: logits, auxiliary loss, every layer's routing and the
/// gradients of the embedding and of the first MoE layer's router and experts.
fn compare_text_model(device: &Device) {
    use burn_moe::models::{DecoderConfig, MoeTransformerConfig, PositionKind};
    let reference = reference_device();
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
    assert_close("logits", &actual.0, &expected.0);
    assert_close("aux loss", &actual.1, &expected.1);
    for (name, (a, e)) in ["embedding", "router", "w_in"]
        .iter()
        .zip(actual.3.iter().zip(&expected.3))
    {
        assert_close(&format!("gradient of {name}"), a, e);
    }
}

/// A Hugging Face fixture (`tests/fixtures/hf`) loaded on `device`: its logits against those
/// transformers computed for the same tokens, within 1e-4 (the CPU backends are checked in
/// moe-models' tests).
fn compare_hf_fixture(arch: burn_moe::models::hf::HfArchitecture, device: &Device) {
    use burn_store::{bridge, ModuleStore, SafetensorsStore};
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(arch.model_type());
    let mut store = SafetensorsStore::from_file(folder.join("expected.safetensors"));
    let mut read = |name: &str| bridge::to_data(store.get_tensor(name).unwrap().unwrap()).unwrap();
    let ids = read("input_ids").convert::<i64>();
    let expected = read("logits").try_to_vec::<f32>().unwrap();
    let model = burn_moe::models::hf::load(&folder, device).unwrap().model;
    let length = ids.shape()[1];
    let tokens = Tensor::<2, burn::tensor::Int>::from_data(ids, device);
    let logits = model.forward(tokens).logits;
    assert_eq!(logits.dims()[1], length);
    let ours = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let diff = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "logits differ from transformers' by {diff}");
}

fn main() {
    let require_wgpu = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    let mut backends: Vec<(&str, Result<Device, String>)> = vec![("flex", Ok(Device::flex()))];
    match burn_moe::train::backend::any_wgpu() {
        Ok(selected) => {
            println!("wgpu device: {}", selected.adapter);
            backends.push(("wgpu", Ok(selected.device)));
        }
        Err(error) => backends.push(("wgpu", Err(error.to_string()))),
    }

    let cases = cases();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (backend, device) in &backends {
        let device = match device {
            Ok(device) => device,
            Err(reason) => {
                println!(
                    "backend parity on {backend}: SKIPPED ({} cases): {reason}",
                    cases.len()
                );
                skipped += cases.len();
                if require_wgpu {
                    println!("BURN_MOE_REQUIRE_WGPU=1: a missing wgpu device is a failure");
                    failed += 1;
                }
                continue;
            }
        };
        let mut runs: Vec<(String, Box<dyn Fn()>)> = cases
            .iter()
            .map(|case| {
                (
                    case.name.clone(),
                    Box::new(move || compare(case, device)) as Box<dyn Fn()>,
                )
            })
            .collect();
        runs.push((
            "whole MoE text model, training mode".into(),
            Box::new(move || compare_text_model(device)),
        ));
        for arch in burn_moe::models::hf::HfArchitecture::ALL {
            runs.push((
                format!(
                    "{} fixture, logits against transformers'",
                    arch.class_name()
                ),
                Box::new(move || compare_hf_fixture(arch, device)),
            ));
        }
        for (name, run) in &runs {
            let result = catch_unwind(AssertUnwindSafe(run));
            match result {
                Ok(()) => {
                    println!("test {backend} vs ndarray: {name} ... ok");
                    passed += 1;
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    println!("test {backend} vs ndarray: {name} ... FAILED: {message}");
                    failed += 1;
                }
            }
        }
    }
    println!("backend parity: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}
