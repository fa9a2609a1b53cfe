//! burn-moe's MoE text model trained by burn-train's `Learner` (its metrics, checkpoints and,
//! in a terminal, its dashboard) instead of burn-moe's own trainer: the model implements
//! `TrainStep` and `InferenceStep` (`TextBatch` in, burn-train's `SequenceOutput` out), so it
//! plugs into `SupervisedTraining` like any Burn model.
//!
//! The task is small enough for a few seconds on the CPU: sequences that count up from a
//! random start by a stride of 1, 2 or 3 (mod the vocabulary), so the model must read the
//! first two tokens to continue. Accuracy goes from chance (1/32) to most tokens right.
//!
//! ```sh
//! cargo run --release --example learner -- --epochs 4
//! ```

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::Device;
use burn::train::metric::{AccuracyMetric, LossMetric, PerplexityMetric};
use burn::train::{Learner, SupervisedTraining};
use burn_moe::core::rng::SplitMix64;
use burn_moe::core::{CapacityConfig, ExpertConfig, ExpertKind, MoeConfig};
use burn_moe::models::{
    DecoderConfig, GenerationConfig, MoeTransformerConfig, SamplingConfig, TextBatch,
};
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// Passes over the training sequences.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Where burn-train writes its logs and checkpoints.
    #[arg(long, default_value = "runs/learner")]
    out: std::path::PathBuf,
}

const VOCAB: usize = 32;
const LENGTH: usize = 16;

/// Sequences `a, a + s, a + 2s, ...` (mod `VOCAB`), `s` in 1..=3, of `LENGTH + 1` tokens.
fn sequences(count: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = SplitMix64(seed);
    (0..count)
        .map(|_| {
            let (start, stride) = (rng.below(VOCAB), 1 + rng.below(3));
            (0..=LENGTH)
                .map(|i| ((start + i * stride) % VOCAB) as i64)
                .collect()
        })
        .collect()
}

/// Stacks sequences into inputs (all but the last token) and targets (all but the first).
#[derive(Clone)]
struct NextToken;

impl Batcher<Vec<i64>, TextBatch> for NextToken {
    fn batch(&self, items: Vec<Vec<i64>>, device: &Device) -> TextBatch {
        TextBatch::next_token(&items, device)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Device::flex().autodiff();
    device.seed(0);

    let moe = MoeConfig::new(64, 8, ExpertConfig::new(64).with_kind(ExpertKind::SwiGlu))
        .with_top_k(2)
        .with_capacity(CapacityConfig::dropless());
    let decoder = DecoderConfig::new(LENGTH, 64, 2, 4, 128, moe);
    let model = MoeTransformerConfig::new(VOCAB, decoder).init(&device)?;

    let loader = |count, seed| {
        DataLoaderBuilder::new(NextToken)
            .batch_size(32)
            .shuffle(seed)
            .build(InMemDataset::new(sequences(count, seed)))
    };
    let optimizer: ModuleOptimizer = AdamWConfig::new().init();
    let learner = Learner::new(model, optimizer, ConstantLr::new(3e-3));
    let result = SupervisedTraining::new(&args.out, loader(2048, 1), loader(256, 2))
        .num_epochs(args.epochs)
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .metric_train_numeric(AccuracyMetric::new())
        .metric_valid_numeric(AccuracyMetric::new())
        .metric_valid_numeric(PerplexityMetric::new())
        .with_application_logger(None)
        .summary()
        .launch(learner);

    // The trained model is ours again: a greedy continuation of 5, 7, 9.
    let greedy = GenerationConfig {
        max_new_tokens: 6,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        },
        stop_tokens: Vec::new(),
        banned_tokens: Vec::new(),
    };
    let continued = result.model.generate(&[5, 7, 9], &greedy, |_| {})?;
    println!("5 7 9 -> {continued:?} (counting by 2: 11 13 15 17 19 21)");
    Ok(())
}
