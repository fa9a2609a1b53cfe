//! Checkpoints: save then load gives identical outputs; `latest`, pruning, broken files.

use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::tensor::{Int, Tensor, TensorData};
use moe_train::config::Preset;
use moe_train::store::checkpoint::{self, CheckpointParts, TrainingState};
use moe_train::training::loss_scale::LossScaleState;

use crate::common::temp_dir;

#[allow(deprecated)]
fn cpu() -> burn::tensor::Device {
    burn::tensor::Device::ndarray()
}

#[test]
fn a_saved_model_loads_with_identical_outputs() {
    let _serial = crate::common::serial();
    let dir = temp_dir("checkpoint-roundtrip");
    let mut config = Preset::Tiny.config();
    config.model.d_model = 32;
    config.model.moe.d_model = 32;
    config.model.num_heads = 2;
    config.model.d_ff = 64;
    config.model.moe.expert.d_hidden = 32;
    let model_config = config.text_model_config(50);
    let device = cpu();
    device.seed(1);
    let model = model_config.init(&device).unwrap();
    let optimizer = AdamWConfig::new().init();
    let state = TrainingState {
        step: 7,
        data_rng: 99,
        tokens_seen: 1234,
        elapsed_seconds: 1.5,
        loss_scale: Some(LossScaleState {
            scale: 8192.0,
            good_steps: 17,
            skipped: 3,
        }),
    };
    let saved = checkpoint::save(
        &dir,
        CheckpointParts {
            model: &model,
            optimizer: &optimizer,
            sharded: &[],
            state: &state,
            config: &config,
            tokenizer: None,
            data: None,
        },
        2,
    )
    .unwrap();
    assert_eq!(checkpoint::resolve(&dir).unwrap(), saved);

    device.seed(2);
    let fresh = model_config.init(&device).unwrap();
    let loaded = checkpoint::load_model(&saved, fresh.clone()).unwrap();
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new((0..20).map(|i| i % 50).collect::<Vec<i64>>(), [2, 10]),
        &device,
    );
    let want: Vec<f32> = model.forward(ids.clone()).logits.try_into_vec_as().unwrap();
    let got: Vec<f32> = loaded
        .forward(ids.clone())
        .logits
        .try_into_vec_as()
        .unwrap();
    let other: Vec<f32> = fresh.forward(ids).logits.try_into_vec_as().unwrap();
    assert_eq!(got, want, "loaded model differs");
    assert_ne!(other, want, "the fresh model should differ before loading");

    let (read_state, read_config) = checkpoint::read_state(&saved).unwrap();
    assert_eq!(read_state, state);
    assert_eq!(read_config, config);
}

#[test]
fn latest_follows_the_newest_and_old_ones_are_pruned() {
    let _serial = crate::common::serial();
    let dir = temp_dir("checkpoint-prune");
    let config = Preset::Tiny.config();
    let device = cpu();
    let model = moe_core::MoeConfig::new(8, 2, moe_core::ExpertConfig::new(8))
        .init(&device)
        .unwrap();
    let optimizer = AdamWConfig::new().init();
    for step in [10, 20, 30, 40] {
        let state = TrainingState {
            step,
            data_rng: 0,
            tokens_seen: 0,
            elapsed_seconds: 0.0,
            loss_scale: None,
        };
        checkpoint::save(
            &dir,
            CheckpointParts {
                model: &model,
                optimizer: &optimizer,
                sharded: &[],
                state: &state,
                config: &config,
                tokenizer: None,
                data: None,
            },
            2,
        )
        .unwrap();
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["step-00000030", "step-00000040"]);
    assert!(checkpoint::resolve(&dir)
        .unwrap()
        .ends_with("step-00000040"));
    let _ = model.num_params();
}

#[test]
fn broken_or_missing_checkpoints_are_reported() {
    let _serial = crate::common::serial();
    let dir = temp_dir("checkpoint-broken");
    let message = checkpoint::resolve(&dir).unwrap_err().to_string();
    assert!(message.contains("no checkpoint here"), "{message}");

    std::fs::write(dir.join("latest"), "checkpoints/step-00000005\n").unwrap();
    let message = checkpoint::resolve(&dir).unwrap_err().to_string();
    assert!(
        message.contains("step-00000005") && message.contains("not there"),
        "{message}"
    );

    let folder = dir.join("checkpoints/step-00000005");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("state.json"), "{ not json").unwrap();
    let message = checkpoint::read_state(&folder).unwrap_err().to_string();
    assert!(
        message.contains("state.json") && message.contains("broken"),
        "{message}"
    );

    std::fs::write(folder.join("model.bpk"), b"garbage").unwrap();
    let model = moe_core::MoeConfig::new(8, 2, moe_core::ExpertConfig::new(8))
        .init(&cpu())
        .unwrap();
    let message = checkpoint::load_model(&folder, model)
        .unwrap_err()
        .to_string();
    assert!(message.contains("model.bpk"), "{message}");
}
