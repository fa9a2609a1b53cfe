//! Whole training runs on a generated corpus: the loss falls, resuming repeats the
//! uninterrupted run exactly, interrupts save a checkpoint, and bad corpora are refused.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use moe_train::cli::{EvalArgs, GenerateArgs};
use moe_train::commands;
use moe_train::config::TaskKind;
use moe_train::training::{train, RunOptions};

use crate::common::{temp_dir, tiny_config, write_generated_corpus};

fn options(out: std::path::PathBuf, resume: bool) -> RunOptions {
    RunOptions {
        resume,
        ..RunOptions::new(out)
    }
}

#[test]
fn a_short_run_lowers_the_loss_and_leaves_its_files() {
    let _serial = crate::common::serial();
    let dir = temp_dir("run-loss");
    let corpus = dir.join("corpus.txt");
    write_generated_corpus(&corpus);
    let mut config = tiny_config(corpus, 60);
    config.run.samples = 2;
    config.run.sample_tokens = 20;
    let out = dir.join("run");
    let summary = train(config, options(out.clone(), false)).unwrap();
    let first = summary.train_losses[0].1;
    let last = summary.train_losses.last().unwrap().1;
    assert!(last < 0.6 * first, "loss went from {first} to {last}");
    assert!(summary.val_losses.last().unwrap().1 < 0.6 * first);
    for file in [
        "metrics.jsonl",
        "config.json",
        "latest",
        "loss.png",
        "expert_load.png",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    assert_eq!(summary.samples.len(), 2);

    // eval and generate read the checkpoint back.
    let report = commands::evaluate(&EvalArgs::checkpoint(
        out.clone(),
        moe_train::runtime::backend::BackendChoice::Ndarray,
    ))
    .unwrap();
    assert!((report.evaluation.loss - summary.val_losses.last().unwrap().1).abs() < 1e-4);
    let text = commands::generate(&GenerateArgs::greedy(
        out,
        "春",
        10,
        moe_train::runtime::backend::BackendChoice::Ndarray,
    ))
    .unwrap();
    assert!(text.starts_with('春') && text.chars().count() > 1, "{text}");
}

#[test]
fn resuming_repeats_the_uninterrupted_losses() {
    let _serial = crate::common::serial();
    let dir = temp_dir("run-resume");
    let corpus = dir.join("corpus.txt");
    write_generated_corpus(&corpus);
    let mut config = tiny_config(corpus, 8);
    config.model.moe.gate = moe_core::GateConfig::noisy(); // gate noise must repeat too
    config.model.dropout = 0.1;
    config.run.checkpoint_every = 4;

    let whole = train(config.clone(), options(dir.join("whole"), false)).unwrap();

    let first_half = train(
        config.clone(),
        RunOptions {
            stop_after: Some(4),
            on_step: None,
            ..options(dir.join("halves"), false)
        },
    )
    .unwrap();
    assert!(first_half.interrupted);
    assert_eq!(first_half.last_step, 4);
    let second_half = train(config, options(dir.join("halves"), true)).unwrap();

    assert_eq!(second_half.train_losses, whole.train_losses[4..].to_vec());
    assert_eq!(second_half.val_losses, whole.val_losses);
    // The metrics log of the resumed run has every step once.
    let rows = moe_train::store::metrics::read(&dir.join("halves/metrics.jsonl")).unwrap();
    let steps: Vec<usize> = rows
        .iter()
        .filter(|r| matches!(r, moe_train::store::metrics::Row::Train(_)))
        .map(|r| r.step())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
}

#[test]
fn resuming_refuses_changed_settings() {
    let _serial = crate::common::serial();
    let dir = temp_dir("run-resume-changed");
    let corpus = dir.join("corpus.txt");
    write_generated_corpus(&corpus);
    let config = tiny_config(corpus, 2);
    train(config.clone(), options(dir.join("run"), false)).unwrap();
    let mut changed = config;
    changed.model.moe.num_experts = 8;
    changed.run.steps = 4;
    let message = train(changed, options(dir.join("run"), true))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("`model`") && message.contains("--resume"),
        "{message}"
    );
}

#[test]
fn an_interrupt_saves_a_checkpoint() {
    let _serial = crate::common::serial();
    let dir = temp_dir("run-interrupt");
    let corpus = dir.join("corpus.txt");
    write_generated_corpus(&corpus);
    let config = tiny_config(corpus, 50);
    let flag = Arc::new(AtomicBool::new(true)); // Ctrl-C before the first step
    let summary = train(
        config,
        RunOptions {
            interrupt: Some(flag),
            ..options(dir.join("run"), false)
        },
    )
    .unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.last_step, 0);
    assert!(moe_train::store::checkpoint::resolve(&dir.join("run")).is_ok());
}

#[test]
fn corpora_too_short_or_empty_are_refused_with_their_name() {
    let _serial = crate::common::serial();
    let dir = temp_dir("run-short");
    let short = dir.join("short.txt");
    std::fs::write(&short, "春风\n\n明月\n").unwrap();
    let message = train(tiny_config(short, 5), options(dir.join("a"), false))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("short.txt") && message.contains("too short") && message.contains("17"),
        "{message}"
    );

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let message = train(tiny_config(empty, 5), options(dir.join("b"), false))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("empty.txt") && message.contains("empty"),
        "{message}"
    );
}

#[test]
fn the_multimodal_tasks_train_with_the_same_machinery() {
    let _serial = crate::common::serial();
    let dir = temp_dir("run-digits");
    for task in [TaskKind::Caption, TaskKind::TextToImage] {
        let mut config = tiny_config(dir.join("unused.txt"), 30);
        config.data.text = None;
        config.task = task;
        // tiny_config's context (16) is shorter than either task's sequence: the model's is
        // derived from the task.
        config.data.image_levels = 2;
        config.run.samples = 2;
        let out = dir.join(format!("{task:?}"));
        let summary = train(config, options(out.clone(), false)).unwrap();
        let first = summary.train_losses[0].1;
        let last = summary.train_losses.last().unwrap().1;
        assert!(last < first, "{task:?}: loss went from {first} to {last}");
        assert!(
            out.join("expert_load_image.png").exists() && out.join("expert_load_text.png").exists()
        );
        assert_eq!(summary.samples.len(), 2);
        let rows = moe_train::store::metrics::read(&out.join("metrics.jsonl")).unwrap();
        let moe_train::store::metrics::Row::Train(row) = &rows[0] else {
            panic!("first row is a training row")
        };
        assert!(row.image_expert_load.is_some() && row.text_expert_load.is_some());
    }
}
