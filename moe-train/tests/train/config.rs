//! Presets, config files, flags and the schedule.

use moe_train::config::{Preset, TrainConfig};
use moe_train::training::schedule::learning_rate;

use crate::common::temp_dir;

#[test]
fn a_toml_file_changes_only_what_it_names() {
    let dir = temp_dir("config-toml");
    let path = dir.join("run.toml");
    std::fs::write(&path, "[model.moe]\nnum_experts = 8\n\n[run]\nsteps = 77\n").unwrap();
    let config = TrainConfig::from_preset_and_file(Preset::Tiny, Some(&path)).unwrap();
    let mut expected = Preset::Tiny.config();
    expected.model.moe.num_experts = 8;
    expected.run.steps = 77;
    assert_eq!(config, expected);

    // Another gate replaces the preset's whole; the MoE layer's width follows the model's.
    let text = "[model]\nd_model = 64\n\n[model.moe]\ngate = { Switch = { jitter = 0.5 } }\n";
    std::fs::write(&path, text).unwrap();
    let config = TrainConfig::from_preset_and_file(Preset::Tiny, Some(&path)).unwrap();
    let mut expected = Preset::Tiny.config();
    expected.model.d_model = 64;
    expected.model.moe.d_model = 64;
    expected.model.moe.gate =
        moe_core::GateConfig::Switch(moe_core::gate::SwitchGate::new().with_jitter(0.5));
    assert_eq!(config, expected);

    let json = dir.join("run.json");
    std::fs::write(&json, r#"{"optim": {"lr": 0.5}}"#).unwrap();
    let config = TrainConfig::from_preset_and_file(Preset::Small, Some(&json)).unwrap();
    assert_eq!(config.optim.lr, 0.5);
    assert_eq!(config.model, Preset::Small.config().model);
}

#[test]
fn config_file_mistakes_are_named() {
    let dir = temp_dir("config-bad");
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[model]\nexpertz = 8\n").unwrap();
    let message = TrainConfig::from_preset_and_file(Preset::Tiny, Some(&typo))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("typo.toml") && message.contains("expertz"),
        "{message}"
    );

    let wrong_type = dir.join("type.toml");
    std::fs::write(&wrong_type, "[run]\nsteps = \"many\"\n").unwrap();
    let message = TrainConfig::from_preset_and_file(Preset::Tiny, Some(&wrong_type))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("type.toml") && message.contains("many"),
        "{message}"
    );

    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "[run\n").unwrap();
    let message = TrainConfig::from_preset_and_file(Preset::Tiny, Some(&broken))
        .unwrap_err()
        .to_string();
    assert!(message.contains("broken.toml"), "{message}");
}

#[test]
fn invalid_values_are_refused_by_name() {
    let mut config = Preset::Tiny.config();
    config.optim.batch_size = 0;
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("optim.batch_size"));
    let mut config = Preset::Tiny.config();
    config.optim.lr = f64::NAN;
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("optim.lr"));
    let mut config = Preset::Tiny.config();
    config.data.jsonl = Some("x.jsonl".into());
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--field"));
    // A bad model shape is the model's own typed error.
    let mut config = Preset::Tiny.config();
    config.model.num_heads = 3;
    let error = config
        .text_model_config(100)
        .init(&moe_core::burn::tensor::Device::flex())
        .unwrap_err();
    assert!(error.to_string().contains("num_heads"), "{error}");
}

#[test]
fn every_preset_builds_a_valid_model() {
    for preset in [Preset::Tiny, Preset::Small, Preset::Base] {
        let config = preset.config();
        config.validate().unwrap();
        config.text_model_config(5000).validate().unwrap();
        config.multimodal_model_config(13).validate().unwrap();
        let dense = config.text_model_config(5000).dense_equivalent();
        assert_eq!(dense.num_moe_layers(), 0);
    }
}

#[test]
fn the_schedule_warms_up_then_decays_by_cosine() {
    let optim = Preset::Tiny.config().optim; // lr 3e-3, min 3e-4, warm-up 100
    let total = 1100;
    assert!((learning_rate(1, total, &optim) - 3e-5).abs() < 1e-12);
    assert!((learning_rate(50, total, &optim) - 1.5e-3).abs() < 1e-12);
    assert!((learning_rate(100, total, &optim) - 3e-3).abs() < 1e-12);
    // Half-way through the decay: the mean of lr and min_lr.
    assert!((learning_rate(600, total, &optim) - 1.65e-3).abs() < 1e-12);
    assert!((learning_rate(1100, total, &optim) - 3e-4).abs() < 1e-12);
}

/// Each model flag lands in the field of the config that owns it.
#[test]
fn flags_write_into_the_models_own_fields() {
    use clap::Parser;
    use moe_train::cli::{Cli, Command};
    let cli = Cli::try_parse_from([
        "burn-moe",
        "train",
        "--experts",
        "8",
        "--gate",
        "switch",
        "--aux-loss-weight",
        "0.25",
        "--z-loss-weight",
        "0.5",
        "--context",
        "32",
    ])
    .unwrap();
    let Command::Train(args) = cli.command else {
        panic!("not a train command");
    };
    let config = args.resolve().unwrap();
    let moe = &config.model.moe;
    assert_eq!((moe.num_experts, moe.top_k), (8, 1));
    assert_eq!(moe.gate, moe_core::GateConfig::switch());
    assert_eq!(moe.losses.balance_weight, 0.25);
    assert_eq!(moe.losses.z_loss_weight, 0.5);
    assert_eq!(config.model.context_length, 32);
}
