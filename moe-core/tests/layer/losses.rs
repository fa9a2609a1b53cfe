//! Each auxiliary loss against values worked out by hand on tiny inputs.

use burn::module::Param;
use burn::tensor::{Bool, Tensor, TensorData};
use moe_core::losses::{cv_squared, load_balancing_loss, router_z_loss, smooth_load};
use moe_core::{
    CapacityConfig, ExpertConfig, GateConfig, LossConfig, LossKind, Moe, MoeConfig, RoutingMode,
};

use crate::common::{assert_close, cpu, matrix, values};

/// Identity router on `d_model = E`, so the logits are the input itself.
fn layer_with_identity_router(experts: usize, top_k: usize, gate: GateConfig) -> Moe {
    let device = cpu();
    let capacity = if gate.is_expert_choice() {
        CapacityConfig::new()
    } else {
        CapacityConfig::dropless()
    };
    let mut moe = MoeConfig::new(experts, experts, ExpertConfig::new(4))
        .with_top_k(top_k)
        .with_gate(gate)
        .with_capacity(capacity)
        .with_losses(
            LossConfig::new()
                .with_balance_weight(0.5)
                .with_z_loss_weight(0.25),
        )
        .init(&device)
        .unwrap();
    let mut identity = vec![0.0f32; experts * experts];
    for e in 0..experts {
        identity[e * experts + e] = 1.0;
    }
    moe.router.weight = Param::from_tensor(matrix(&identity, experts, experts, &device));
    moe
}

fn loss_value(stats: &moe_core::RoutingStats, kind: LossKind) -> f64 {
    let (_, value) = stats
        .losses
        .iter()
        .find(|(k, _)| *k == kind)
        .expect("loss present");
    values(value.clone())[0]
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let total: f64 = row.iter().map(|v| v.exp()).sum();
    row.iter().map(|v| v.exp() / total).collect()
}

#[test]
fn switch_balance_loss_by_hand() {
    // Logits (= x): tokens choose e0, e1, e0, e0, so f = [3/4, 1/4].
    let x = [2.0, 0.0, 0.0, 1.0, 1.0, 0.0, 3.0, 0.0];
    let moe = layer_with_identity_router(2, 1, GateConfig::switch());
    let out = moe.forward(matrix(&x, 4, 2, &cpu()));

    // P_e: mean of the softmax rows.
    let rows = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]];
    let mut mean = [0.0; 2];
    for row in rows {
        let p = softmax(&row);
        mean[0] += p[0] / 4.0;
        mean[1] += p[1] / 4.0;
    }
    // = [0.708343, 0.291657]; loss = E * (3/4 * P0 + 1/4 * P1).
    let expected = 2.0 * (0.75 * mean[0] + 0.25 * mean[1]);
    assert!((expected - 1.208343).abs() < 1e-5);
    let balance = loss_value(&out.stats, LossKind::Balance);
    assert!(
        (balance - expected).abs() < 1e-5,
        "balance {balance}, expected {expected}"
    );

    // z-loss: mean over tokens of logsumexp(row)^2.
    let z: f64 = rows
        .iter()
        .map(|row| row.iter().map(|v: &f64| v.exp()).sum::<f64>().ln().powi(2))
        .sum::<f64>()
        / 4.0;
    let z_loss = loss_value(&out.stats, LossKind::ZLoss);
    assert!((z_loss - z).abs() < 1e-5, "z-loss {z_loss}, expected {z}");

    // aux_loss = 0.5 * balance + 0.25 * z.
    let aux = values(out.aux_loss)[0];
    assert!((aux - (0.5 * expected + 0.25 * z)).abs() < 1e-5);
}

#[test]
fn gshard_balance_loss_counts_first_choices_only() {
    // Three experts; first choices e0, e2, e0 (second choices e1, e1, e2).
    let rows = [[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]];
    let x: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    let moe = layer_with_identity_router(3, 2, GateConfig::gshard());
    let out = moe.forward(matrix(&x, 3, 3, &cpu()));
    let f = [2.0 / 3.0, 0.0, 1.0 / 3.0];
    let mut mean = [0.0; 3];
    for row in rows {
        for (e, p) in softmax(&row).into_iter().enumerate() {
            mean[e] += p / 3.0;
        }
    }
    let expected = 3.0 * (f[0] * mean[0] + f[1] * mean[1] + f[2] * mean[2]);
    let balance = loss_value(&out.stats, LossKind::Balance);
    assert!(
        (balance - expected).abs() < 1e-5,
        "balance {balance}, expected {expected}"
    );
}

#[test]
fn noisy_gate_loss_without_noise_is_cv_squared_of_importance_and_counts() {
    // Top-1 of three experts: e0, e0, e2. Gates are softmax over one value = 1.
    let rows = [[2.0, 1.0, 0.0], [1.0, 0.0, 0.5], [0.0, 1.0, 3.0]];
    let x: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    let moe = layer_with_identity_router(3, 1, GateConfig::noisy());
    let out = moe.forward_with_mode(matrix(&x, 3, 3, &cpu()), RoutingMode::Eval);
    // importance = load = [2, 0, 1]: mean 1, population variance (1 + 1 + 0) / 3 = 2/3.
    let cv2 = (2.0 / 3.0) / 1.0;
    let balance = loss_value(&out.stats, LossKind::Balance);
    assert!(
        (balance - 2.0 * cv2).abs() < 1e-5,
        "balance {balance}, expected {}",
        2.0 * cv2
    );
}

#[test]
fn expert_choice_has_no_balance_loss() {
    let moe = layer_with_identity_router(2, 1, GateConfig::expert_choice());
    let out = moe.forward(matrix(&[1.0, 0.0, 0.0, 1.0], 2, 2, &cpu()));
    assert!(out
        .stats
        .losses
        .iter()
        .all(|(kind, _)| *kind != LossKind::Balance));
}

#[test]
fn cv_squared_by_hand() {
    // [1, 2, 3]: mean 2, population variance 2/3, CV^2 = (2/3) / 4 = 1/6.
    let v = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &cpu());
    assert!((values(cv_squared(v))[0] - 1.0 / 6.0).abs() < 1e-6);
    // Equal values: 0.
    let v = Tensor::<1>::from_floats([4.0, 4.0], &cpu());
    assert!(values(cv_squared(v))[0].abs() < 1e-9);
}

#[test]
fn load_balancing_loss_is_one_when_uniform() {
    let probs = Tensor::<2>::full([4, 4], 0.25, &cpu());
    let fraction = Tensor::<1>::full([4], 0.25, &cpu());
    assert!((values(load_balancing_loss(probs, fraction))[0] - 1.0).abs() < 1e-6);
}

#[test]
fn z_loss_by_hand() {
    // logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4.
    let logits = matrix(&[0.0, 0.0, 3f32.ln(), 0.0], 2, 2, &cpu());
    let expected = (2f64.ln().powi(2) + 4f64.ln().powi(2)) / 2.0;
    assert!((values(router_z_loss(logits))[0] - expected).abs() < 1e-5);
}

#[test]
fn smooth_load_by_hand() {
    let device = cpu();
    // One token, three experts, k = 1; the noisy scores chose e0.
    let clean = matrix(&[1.0, 0.0, -1.0], 1, 3, &device);
    let noisy = matrix(&[1.5, -0.5, 0.2], 1, 3, &device);
    let scale = matrix(&[1.0, 1.0, 2.0], 1, 3, &device);
    let chosen =
        Tensor::<2, Bool>::from_data(TensorData::new(vec![true, false, false], [1, 3]), &device);
    // e0 (chosen) must beat the 2nd largest noisy score 0.2: Phi((1 - 0.2) / 1) = Phi(0.8).
    // e1 and e2 must beat the largest, 1.5: Phi((0 - 1.5) / 1), Phi((-1 - 1.5) / 2) = Phi(-1.25).
    // Normal table: Phi(0.8) = 0.788145, Phi(-1.5) = 0.066807, Phi(-1.25) = 0.105650.
    let load = values(smooth_load(clean, noisy, scale, chosen, 1));
    assert_close("smooth load", &load, &[0.788145, 0.066807, 0.105650], 1e-5);
}
