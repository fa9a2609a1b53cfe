//! Every invalid field gives its typed error; configs survive a serde round trip.

use burn::config::Config;
use moe_core::gate::{NoisyGate, SwitchGate};
use moe_core::{
    BiasBalancingConfig, CapacityConfig, DropPolicy, ExpertConfig, ExpertKind, GateConfig,
    LossConfig, MoeConfig, MoeError,
};

use crate::common::cpu;

fn valid() -> MoeConfig {
    MoeConfig::new(16, 4, ExpertConfig::new(32))
}

fn swiglu() -> MoeConfig {
    MoeConfig::new(16, 4, ExpertConfig::new(8).with_kind(ExpertKind::SwiGlu))
}

fn error_of(config: MoeConfig) -> MoeError {
    config.init(&cpu()).expect_err("config should be refused")
}

fn out_of_range_field(config: MoeConfig) -> &'static str {
    match error_of(config) {
        MoeError::OutOfRange { field, .. } => field,
        other => panic!("expected OutOfRange, got {other:?}"),
    }
}

#[test]
fn zero_sizes_name_their_field() {
    let cases = [
        (valid().with_top_k(0), "top_k"),
        (MoeConfig::new(0, 4, ExpertConfig::new(32)), "d_model"),
        (MoeConfig::new(16, 0, ExpertConfig::new(32)), "num_experts"),
        (
            MoeConfig::new(16, 4, ExpertConfig::new(0)),
            "expert.d_hidden",
        ),
    ];
    for (config, field) in cases {
        assert_eq!(error_of(config), MoeError::Zero { field });
    }
}

#[test]
fn top_k_above_experts_is_refused() {
    assert_eq!(
        error_of(valid().with_top_k(5)),
        MoeError::TopKExceedsExperts {
            top_k: 5,
            num_experts: 4
        }
    );
}

#[test]
fn gates_with_a_fixed_k_refuse_others() {
    assert_eq!(
        error_of(valid().with_gate(GateConfig::gshard()).with_top_k(1)),
        MoeError::GateNeedsTopK {
            gate: "GShard",
            required: 2,
            top_k: 1
        }
    );
    assert_eq!(
        error_of(valid().with_gate(GateConfig::switch()).with_top_k(2)),
        MoeError::GateNeedsTopK {
            gate: "Switch",
            required: 1,
            top_k: 2
        }
    );
}

#[test]
fn bad_numbers_name_their_field() {
    let cases = [
        (
            valid().with_capacity(CapacityConfig::new().with_train_factor(0.0)),
            "capacity.train_factor",
        ),
        (
            valid().with_capacity(CapacityConfig::new().with_train_factor(f64::NAN)),
            "capacity.train_factor",
        ),
        (
            valid().with_capacity(CapacityConfig::new().with_eval_factor(-1.0)),
            "capacity.eval_factor",
        ),
        (
            valid().with_losses(LossConfig::new().with_balance_weight(-0.1)),
            "losses.balance_weight",
        ),
        (
            valid().with_losses(LossConfig::new().with_z_loss_weight(f64::NAN)),
            "losses.z_loss_weight",
        ),
        (
            valid().with_gate(GateConfig::Noisy(NoisyGate::new().with_noise_epsilon(-1.0))),
            "gate.noise_epsilon",
        ),
        (
            valid()
                .with_top_k(1)
                .with_gate(GateConfig::Switch(SwitchGate::new().with_jitter(1.5))),
            "gate.jitter",
        ),
        (
            valid().with_balance_bias(Some(BiasBalancingConfig::new().with_update_rate(0.0))),
            "balance_bias.update_rate",
        ),
        (valid().with_routed_scale(0.0), "routed_scale"),
        (valid().with_routed_scale(f64::INFINITY), "routed_scale"),
    ];
    for (config, field) in cases {
        assert_eq!(out_of_range_field(config), field);
    }
}

#[test]
fn expert_choice_refuses_token_choice_options() {
    let ec = valid().with_gate(GateConfig::expert_choice());
    match error_of(ec.clone().with_capacity(CapacityConfig::dropless())) {
        MoeError::NotForExpertChoice { field, .. } => assert_eq!(field, "capacity.dropless"),
        other => panic!("unexpected {other:?}"),
    }
    match error_of(ec.with_balance_bias(Some(BiasBalancingConfig::new()))) {
        MoeError::NotForExpertChoice { field, .. } => assert_eq!(field, "balance_bias"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn messages_name_the_field() {
    let message =
        error_of(valid().with_capacity(CapacityConfig::new().with_eval_factor(-1.0))).to_string();
    assert!(message.contains("capacity.eval_factor"), "{message}");
    assert!(message.contains("-1"), "{message}");
}

#[test]
fn configs_survive_a_serde_round_trip() {
    let configs = [
        valid(),
        swiglu()
            .with_gate(GateConfig::Noisy(NoisyGate::new().with_noise_epsilon(0.05)))
            .with_top_k(3)
            .with_shared_experts(2)
            .with_capacity(
                CapacityConfig::new()
                    .with_drop_policy(DropPolicy::Probability)
                    .with_min_capacity(7),
            )
            .with_losses(LossConfig::new().with_z_loss_weight(0.001))
            .with_balance_bias(Some(BiasBalancingConfig::new().with_update_rate(0.01))),
        valid().with_gate(GateConfig::expert_choice()),
        valid()
            .with_shared_experts(1)
            .with_shared_d_hidden(Some(24))
            .with_shared_gate(true),
        valid()
            .with_gate(GateConfig::gshard())
            .with_capacity(CapacityConfig::dropless()),
    ];
    let path = std::env::temp_dir().join(format!("moe-config-{}.json", std::process::id()));
    for config in configs {
        config.save(&path).unwrap();
        let back = MoeConfig::load(&path).unwrap();
        assert_eq!(back, config, "{}", burn::config::config_to_json(&config));
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn parameter_counts_match_burn() {
    use burn::module::Module;
    let configs = [
        valid(),
        swiglu().with_shared_experts(3),
        valid()
            .with_shared_experts(2)
            .with_gate(GateConfig::noisy()),
        valid().with_balance_bias(Some(BiasBalancingConfig::new())),
        swiglu()
            .with_shared_experts(1)
            .with_shared_d_hidden(Some(40))
            .with_shared_gate(true),
    ];
    for config in configs {
        let moe = config.init(&cpu()).unwrap();
        assert_eq!(config.num_params(), moe.num_params(), "{config}");
    }
    // Hand count: d 16, 4 FFN experts of 32: router 64, expert 2*16*32 + 32 + 16 = 1072.
    assert_eq!(valid().num_params(), 64 + 4 * 1072);
    assert_eq!(valid().num_active_params(), 64 + 2 * 1072);
}

#[test]
fn shared_settings_without_shared_experts_are_refused() {
    for (config, field) in [
        (valid().with_shared_gate(true), "shared_gate"),
        (valid().with_shared_d_hidden(Some(8)), "shared_d_hidden"),
    ] {
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains(field), "{message}");
        assert!(message.contains("shared_experts"), "{message}");
    }
    // A hand count of Qwen2-MoE's shared block: SwiGLU 3 * 16 * 40, plus the gate's 16.
    let qwen = swiglu()
        .with_shared_experts(1)
        .with_shared_d_hidden(Some(40))
        .with_shared_gate(true);
    let without = swiglu();
    assert_eq!(qwen.num_params() - without.num_params(), 3 * 16 * 40 + 16);
    assert_eq!(qwen.active_width(), 2 * without.expert.d_hidden + 40);
}
