//! `--offload-experts`: a run on wgpu with every expert (and its optimizer state) in CPU
//! memory on flex trains as the run on wgpu alone: the same training and validation losses
//! within 1e-4, and its checkpoint (experts gathered) evaluates to the same validation loss on
//! wgpu alone.
//!
//! Its own process (`harness = false`): the wgpu runtime is registered once per process.

use moe_core::GateConfig;
use moe_train::cli::EvalArgs;
use moe_train::commands::evaluate;
use moe_train::runtime::backend::{select, BackendChoice, Precision};
use moe_train::training::{train, RunOptions, RunSummary};

#[path = "train/common.rs"]
mod common;

fn main() {
    if let Err(error) = select(BackendChoice::Wgpu, Precision::F32) {
        println!("offloaded experts: SKIPPED: {error}");
        if std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
            println!("BURN_MOE_REQUIRE_WGPU=1: a missing wgpu device is a failure");
            std::process::exit(1);
        }
        return;
    }
    let (dir, mut config) = common::tiny_run("offload", 4);
    config.run.backend = BackendChoice::Wgpu;
    config.model.moe.gate = GateConfig::softmax_top_k();
    let one = train(config.clone(), RunOptions::new(dir.join("one"))).expect("trains");
    config.run.offload_experts = true;
    let two = train(config, RunOptions::new(dir.join("two"))).expect("trains offloaded");
    assert!(
        two.device.contains("every expert in CPU memory"),
        "{}",
        two.device
    );
    let gap = loss_gap(&one, &two);
    assert!(gap < 1e-4, "losses differ by {gap}");
    // The offloaded run's checkpoint holds its experts gathered: on wgpu alone it evaluates to
    // the loss the run logged.
    let report =
        evaluate(&EvalArgs::checkpoint(dir.join("two"), BackendChoice::Wgpu)).expect("evaluates");
    let logged = two.val_losses.last().expect("a validation loss").1;
    let difference = (report.evaluation.loss - logged).abs();
    assert!(
        difference < 1e-4,
        "checkpoint {} against {logged}",
        report.evaluation.loss
    );
    println!("offloaded experts: ok (losses within {gap:.1e})");
    held_experts_offloaded_generate_as_on_one_device();
}

/// A Hugging Face folder held in 4 bits on wgpu (packed) with its experts in CPU memory on
/// flex (one byte a value there) generates, greedily, the tokens it generates on wgpu alone.
fn held_experts_offloaded_generate_as_on_one_device() {
    use moe_models::hf::Storage;
    use moe_models::SamplingConfig;
    use moe_train::commands::hf::{generate, GenerationSettings};

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf/olmoe");
    let prompt = std::fs::read_to_string(dir.join("prompt.txt")).expect("the fixture's prompt");
    let settings = |offload_experts| GenerationSettings {
        max_tokens: 8,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        },
        offload_experts,
        weights: Storage::Q4,
    };
    let one = generate(&dir, &prompt, settings(false), BackendChoice::Wgpu).expect("generates");
    let two =
        generate(&dir, &prompt, settings(true), BackendChoice::Wgpu).expect("generates offloaded");
    assert!(one.len() > prompt.len(), "nothing generated: {one:?}");
    assert_eq!(one, two, "the offloaded q4 model generates other tokens");
    println!("offloaded q4 experts: ok (the same 8 greedy tokens)");
}

/// Largest difference between two runs' training and validation losses.
fn loss_gap(a: &RunSummary, b: &RunSummary) -> f64 {
    assert_eq!(a.train_losses.len(), b.train_losses.len());
    assert_eq!(a.val_losses.len(), b.val_losses.len());
    let train = a.train_losses.iter().zip(&b.train_losses);
    let validation = a.val_losses.iter().zip(&b.val_losses);
    train
        .chain(validation)
        .map(|((_, x), (_, y))| (x - y).abs())
        .fold(0.0, f64::max)
}
