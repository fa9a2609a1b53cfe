//! Mixed precision on wgpu: the `tiny` preset's transformer cut to two blocks (4 experts, top-2,
//! in the second) trained 200 steps with `--precision f16` follows the f32 run's loss within 2 %,
//! and reports its loss scale in the metrics (f32 master weights
//! and their f32 gradients are checked by `tests/wgpu_f16.rs`).
//!
//! Both runs start from the same seed and see the same batches, on the same wgpu device
//! (llvmpipe where there is no GPU). Compared: the mean training cross-entropy over the last 50
//! steps, and the final validation loss. The corpus is a random walk over ten characters with
//! three equally likely steps ([`write_random_walk_corpus`]), so the loss settles near
//! `ln 3` per character instead of near zero: on a corpus the model memorises, two f32 runs
//! differ by a few per cent of a near-zero loss (wgpu's autotuned kernels sum in an order
//! that changes from run to run). Its own process (`harness = false`): it says plainly when it
//! skips for want of an f16 device.

use moe_core::rng::SplitMix64;
use moe_train::config::Preset;
use moe_train::runtime::backend::{select, BackendChoice, BackendError, Precision};
use moe_train::store::metrics::{read, Row};
use moe_train::training::{train, RunOptions};

#[path = "train/common.rs"]
mod common;

const STEPS: usize = 200;

fn main() {
    let require_wgpu = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    match select(BackendChoice::Wgpu, Precision::F16) {
        Ok(selected) => println!("mixed precision on {selected}"),
        Err(BackendError::NoHalfPrecision { device, .. }) => {
            println!("mixed precision: SKIPPED: {device} has no f16");
            return;
        }
        Err(error) => {
            println!("mixed precision: SKIPPED: {error}");
            if require_wgpu {
                println!("BURN_MOE_REQUIRE_WGPU=1: a missing wgpu device is a failure");
                std::process::exit(1);
            }
            return;
        }
    }
    let dir = common::temp_dir("mixed-precision");
    let corpus = dir.join("corpus.txt");
    write_random_walk_corpus(&corpus);

    let f32_run = run(&dir, &corpus, Precision::F32);
    let f16_run = run(&dir, &corpus, Precision::F16);
    let relative = |a: f64, b: f64| (a - b).abs() / b.abs();
    let train_gap = relative(f16_run.late_train_loss, f32_run.late_train_loss);
    let val_gap = relative(f16_run.val_loss, f32_run.val_loss);
    println!(
        "f32: train {:.4}, validation {:.4}; f16: train {:.4}, validation {:.4} (gaps {:.2} %, {:.2} %); loss scale {:?}, {:?} steps skipped",
        f32_run.late_train_loss,
        f32_run.val_loss,
        f16_run.late_train_loss,
        f16_run.val_loss,
        100.0 * train_gap,
        100.0 * val_gap,
        f16_run.loss_scale,
        f16_run.skipped
    );
    let mut failures = Vec::new();
    if train_gap.is_nan() || train_gap > 0.02 {
        failures.push(format!(
            "training loss gap {:.2} % > 2 %",
            100.0 * train_gap
        ));
    }
    if val_gap.is_nan() || val_gap > 0.02 {
        failures.push(format!(
            "validation loss gap {:.2} % > 2 %",
            100.0 * val_gap
        ));
    }
    if f16_run.loss_scale.is_none() || f32_run.loss_scale.is_some() {
        failures.push("the loss scale is reported for f16 runs only".into());
    }
    if failures.is_empty() {
        println!("mixed precision: ok");
    } else {
        for failure in failures {
            println!("FAILED: {failure}");
        }
        std::process::exit(1);
    }
}

/// Writes 400 "poems" of four lines of five characters, each character one, two or three
/// places after the one before it in a ten-character alphabet (drawn uniformly): an entropy of
/// `ln 3` nats per character that no model can beat.
fn write_random_walk_corpus(path: &std::path::Path) {
    let alphabet: Vec<char> = "春山月水风花雨云夜江".chars().collect();
    let mut rng = SplitMix64(11);
    let mut place = 0;
    let mut text = String::new();
    for _ in 0..400 {
        for line in 0..4 {
            for _ in 0..5 {
                place = (place + 1 + rng.below(3)) % alphabet.len();
                text.push(alphabet[place]);
            }
            text.push(if line % 2 == 0 { '，' } else { '。' });
            text.push('\n');
        }
        text.push('\n');
    }
    std::fs::write(path, text).expect("the corpus is written");
}

/// What one run left.
struct Outcome {
    late_train_loss: f64,
    val_loss: f64,
    loss_scale: Option<f64>,
    skipped: Option<u64>,
}

/// Trains the tiny preset on `corpus` for [`STEPS`] steps on wgpu in `precision`.
fn run(dir: &std::path::Path, corpus: &std::path::Path, precision: Precision) -> Outcome {
    let mut config = Preset::Tiny.config();
    // Four experts of width 256, two per token, in the second of two blocks, on batches of 8
    // sequences of 32 tokens: the same operations in 16 bits as the preset's 64 experts of
    // width 32 in four blocks, with an eighth of the work, since this test takes most of the
    // suite's time on llvmpipe (about 175 tokens/s for the preset's shape on a 2-core VM).
    config.model.num_layers = 2;
    config.model.context_length = 32;
    config.optim.batch_size = 8;
    config.model.moe.num_experts = 4;
    config.model.moe.top_k = 2;
    config.model.moe.expert.d_hidden = 256;
    config.model.moe_every = 2;
    config.model.moe.capacity.dropless = false;
    config.data.text = Some(corpus.to_path_buf());
    config.run.steps = STEPS;
    config.run.log_every = 1;
    config.run.eval_every = STEPS;
    config.run.eval_batches = 8;
    config.run.checkpoint_every = STEPS;
    config.run.samples = 0;
    config.run.backend = BackendChoice::Wgpu;
    config.run.precision = precision;
    let out = dir.join(precision.name());
    train(config, RunOptions::new(out.clone())).expect("the run trains");
    let rows = read(&out.join("metrics.jsonl")).expect("the metrics are readable");
    let train: Vec<_> = rows
        .iter()
        .filter_map(|row| match row {
            Row::Train(row) => Some(row),
            _ => None,
        })
        .collect();
    let late = &train[train.len() - 50..];
    let val_loss = rows
        .iter()
        .rev()
        .find_map(|row| match row {
            Row::Eval(row) => Some(row.val_loss),
            _ => None,
        })
        .expect("an evaluation at the last step");
    let last = train.last().expect("logged steps");
    Outcome {
        late_train_loss: late.iter().map(|row| row.cross_entropy).sum::<f64>() / late.len() as f64,
        val_loss,
        loss_scale: last.loss_scale,
        skipped: last.skipped_steps,
    }
}
