//! Files written by an earlier release (burn-moe 0a8249e, `tests/fixtures/release-0a8249e`),
//! in the flat `model` layout of its config, still load: a config file and a run.

use std::path::{Path, PathBuf};
use std::process::Command;

use moe_core::{CapacityConfig, ExpertConfig, ExpertKind, GateConfig, LossConfig, MoeConfig};
use moe_models::DecoderConfig;
use moe_train::config::{Preset, TrainConfig};
use moe_train::store::checkpoint;

use crate::common::temp_dir;

const PROGRAM: &str = env!("CARGO_BIN_EXE_burn-moe");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/release-0a8249e")
}

/// The model `legacy.toml` describes, written out by hand from its flat keys and the mapping
/// that release used (`TrainConfig::moe_config` and `decoder_config` of 0a8249e).
fn expected_model() -> DecoderConfig {
    let moe = MoeConfig::new(16, 4, ExpertConfig::new(16).with_kind(ExpertKind::SwiGlu))
        .with_top_k(2)
        .with_gate(GateConfig::naive())
        .with_shared_experts(1)
        .with_routed_scale(2.0)
        .with_capacity(
            CapacityConfig::new()
                .with_train_factor(1.5)
                .with_eval_factor(2.5)
                .with_dropless(false),
        )
        .with_losses(
            LossConfig::new()
                .with_balance_weight(0.02)
                .with_z_loss_weight(0.001),
        );
    DecoderConfig::new(16, 16, 2, 2, 32, moe)
        .with_moe_every(2)
        .with_dropout(0.0)
}

#[test]
fn a_flat_config_file_reads_as_todays_model() {
    let config =
        TrainConfig::from_preset_and_file(Preset::Tiny, Some(&fixture().join("legacy.toml")))
            .unwrap();
    assert_eq!(config.model, expected_model());
    assert!(!config.variant.dense && config.variant.hf.is_none());
    assert_eq!((config.optim.batch_size, config.run.steps), (4, 2));
    config.validate().unwrap();
}

#[test]
fn a_run_of_that_release_resolves_and_generates_as_it_did() {
    let dir = temp_dir("old-run");
    let run = dir.join("run");
    copy_folder(&fixture().join("run"), &run);
    let config = checkpoint::read_config(&run).unwrap();
    assert_eq!(config.model, expected_model());
    // What that release printed for the same command (fixture README).
    let output = Command::new(PROGRAM)
        .args(["generate", "--checkpoint"])
        .arg(&run)
        .args([
            "--backend",
            "flex",
            "--prompt",
            "the moon",
            "--max-tokens",
            "12",
        ])
        .args(["--temperature", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "the mooneeeeeeeeeeee");
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_folder(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
