//! Invalid configs give their typed errors; configs survive a save/load round trip.

use burn::config::Config;
use moe_core::{CapacityConfig, DropPolicy, ExpertConfig, GateConfig, MoeConfig};
use moe_models::{
    DecoderConfig, ModelError, MoeTransformerConfig, MultimodalMoeTransformerConfig, PositionKind,
};

use crate::common::{cpu, tiny, with_moe_every};

fn error(config: MoeTransformerConfig) -> ModelError {
    config.init(&cpu()).expect_err("config should be refused")
}

#[test]
fn heads_must_divide_the_width() {
    let mut config = tiny(PositionKind::Rotary, CapacityConfig::new());
    config.decoder.num_heads = 3;
    assert_eq!(
        error(config),
        ModelError::HeadsDoNotDivide {
            d_model: 16,
            num_heads: 3
        }
    );
}

#[test]
fn context_and_sizes_must_not_be_zero() {
    let mut config = tiny(PositionKind::Learned, CapacityConfig::new());
    config.decoder.context_length = 0;
    assert_eq!(
        error(config),
        ModelError::Zero {
            field: "context_length"
        }
    );
    let mut config = tiny(PositionKind::Learned, CapacityConfig::new());
    config.vocab_size = 0;
    assert_eq!(
        error(config),
        ModelError::Zero {
            field: "vocab_size"
        }
    );
}

#[test]
fn rotary_needs_an_even_head_width() {
    // d_model 12, 4 heads: head width 3.
    let moe = MoeConfig::new(12, 4, ExpertConfig::new(8));
    let config = MoeTransformerConfig::new(10, DecoderConfig::new(8, 12, 1, 4, 16, moe));
    assert_eq!(error(config), ModelError::OddHeadDim { head_dim: 3 });
}

#[test]
fn the_moe_width_must_match() {
    let mut config = tiny(PositionKind::Rotary, CapacityConfig::new());
    config.decoder.moe.d_model = 8;
    assert_eq!(error(config), ModelError::MoeWidth { model: 16, moe: 8 });
}

#[test]
fn decoders_refuse_routing_that_is_not_causal() {
    let mut config = tiny(PositionKind::Rotary, CapacityConfig::new());
    config.decoder.moe.gate = GateConfig::expert_choice();
    let message = error(config).to_string();
    assert!(
        message.contains("expert-choice") && message.contains("not causal"),
        "{message}"
    );

    let config = tiny(
        PositionKind::Rotary,
        CapacityConfig::new().with_drop_policy(DropPolicy::Probability),
    );
    assert!(matches!(error(config), ModelError::NotCausal { .. }));
    // Dropless makes the policy irrelevant.
    let config = tiny(
        PositionKind::Rotary,
        CapacityConfig::dropless().with_drop_policy(DropPolicy::Probability),
    );
    assert!(config.init(&cpu()).is_ok());
}

#[test]
fn moe_errors_are_passed_on() {
    let mut config = tiny(PositionKind::Rotary, CapacityConfig::new());
    config.decoder.moe.top_k = 9;
    assert!(matches!(error(config), ModelError::Moe(_)));
    // A dense model does not care about the MoE layer's settings.
    let mut config = with_moe_every(tiny(PositionKind::Rotary, CapacityConfig::new()), 0);
    config.decoder.moe.top_k = 9;
    assert!(config.init(&cpu()).is_ok());
}

#[test]
fn patch_size_must_divide_the_image() {
    let moe = MoeConfig::new(16, 4, ExpertConfig::new(24));
    let decoder = DecoderConfig::new(80, 16, 2, 4, 32, moe);
    let config = MultimodalMoeTransformerConfig::new(13, 4, 8, 3, decoder);
    assert_eq!(
        config.init(&cpu()).err().unwrap(),
        ModelError::PatchDoesNotDivide {
            image_size: 8,
            patch_size: 3
        }
    );
}

#[test]
fn dropout_must_be_a_probability() {
    let mut config = tiny(PositionKind::Rotary, CapacityConfig::new());
    config.decoder.dropout = 1.5;
    assert!(matches!(
        error(config),
        ModelError::OutOfRange {
            field: "dropout",
            ..
        }
    ));
}

#[test]
fn configs_survive_a_save_load_round_trip() {
    let path = std::env::temp_dir().join(format!("model-config-{}.json", std::process::id()));
    let config = with_moe_every(tiny(PositionKind::Learned, CapacityConfig::dropless()), 2);
    config.save(&path).unwrap();
    assert_eq!(MoeTransformerConfig::load(&path).unwrap(), config);
    std::fs::remove_file(path).unwrap();
}

/// A gate that asks for the softmax top-k of its config but says it compares tokens.
#[derive(Debug)]
struct BatchWideGate;

impl moe_core::gate::Gate for BatchWideGate {
    fn route(&self, input: moe_core::gate::GateInput<'_>) -> moe_core::gate::GateOutput {
        let logits = input.router.logits(input.x);
        let probs = burn::tensor::activation::softmax(logits.clone(), 1);
        let indices = moe_core::gate::top_k_indices(probs.clone(), input.top_k);
        let chosen = probs.clone().gather(1, indices.clone());
        let (weights, candidates) =
            moe_core::gate::to_expert_matrix(indices, chosen, input.router.num_experts());
        moe_core::gate::GateOutput {
            logits,
            probs,
            candidates,
            weights,
            balance_loss: None,
        }
    }

    fn is_causal(&self) -> bool {
        false
    }
}

#[test]
fn decoders_refuse_a_users_gate_that_is_not_causal() {
    let model = tiny(PositionKind::Rotary, CapacityConfig::dropless())
        .init(&cpu())
        .unwrap();
    let error = model
        .clone()
        .with_gate(std::sync::Arc::new(BatchWideGate))
        .unwrap_err();
    assert!(matches!(error, ModelError::NotCausal { .. }), "{error}");
}
