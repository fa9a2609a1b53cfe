//! The text model as a burn-train model: its steps' loss against one computed by hand, and a
//! short `SupervisedTraining` run that lowers the validation loss.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::InMemDataset;
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::{Bool, Device, Tensor, TensorData};
use burn::train::metric::LossMetric;
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainStep};
use moe_core::CapacityConfig;
use moe_models::{MoeTransformer, PositionKind, TextBatch};

use crate::common::{tiny, values, VOCAB};

const LENGTH: usize = 8;

/// Sequences counting up by one from `start` (mod the vocabulary), `LENGTH + 1` tokens.
fn counting(start: usize) -> Vec<i64> {
    (0..=LENGTH).map(|i| ((start + i) % VOCAB) as i64).collect()
}

#[derive(Clone)]
struct NextToken;

impl Batcher<Vec<i64>, TextBatch> for NextToken {
    fn batch(&self, items: Vec<Vec<i64>>, device: &Device) -> TextBatch {
        let batch = TextBatch::next_token(&items, device);
        // The last target of every row is padding: it must not count.
        let rows = items.len();
        let mask: Vec<bool> = (0..rows * LENGTH)
            .map(|i| i % LENGTH != LENGTH - 1)
            .collect();
        TextBatch {
            mask: Tensor::<2, Bool>::from_data(TensorData::new(mask, [rows, LENGTH]), device),
            ..batch
        }
    }
}

fn model(device: &Device) -> MoeTransformer {
    tiny(PositionKind::Rotary, CapacityConfig::dropless())
        .init(device)
        .unwrap()
}

#[test]
fn the_steps_loss_is_the_masked_cross_entropy_plus_the_aux_loss() {
    let device = Device::flex().autodiff();
    device.seed(5);
    let model = model(&device);
    let batch = NextToken.batch((0..3).map(counting).collect(), &device);
    let targets = values(batch.targets.clone().float());
    let output = TrainStep::step(&model, batch.clone()).item;

    // Cross-entropy by hand over the counted positions (all but each row's last).
    let logits = values(output.logits.clone());
    let (mut total, mut count) = (0.0, 0);
    for position in 0..3 * LENGTH {
        if position % LENGTH == LENGTH - 1 {
            continue;
        }
        let row = &logits[position * VOCAB..(position + 1) * VOCAB];
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
        total += log_sum - row[targets[position] as usize];
        count += 1;
    }
    let aux = values(model.forward(batch.tokens.clone()).aux_loss)[0];
    let loss = values(output.loss.clone())[0];
    assert!((loss - (total / count as f64 + aux)).abs() < 1e-5, "{loss}");

    // The inference step computes the same loss without a gradient.
    let inference = InferenceStep::step(&model, batch);
    assert!((values(inference.loss)[0] - loss).abs() < 1e-6);
}

#[test]
fn supervised_training_lowers_the_validation_loss() {
    let device = Device::flex().autodiff();
    device.seed(6);
    let model = model(&device);
    let validation = NextToken.batch((0..VOCAB).step_by(3).map(counting).collect(), &device);
    let before = values(InferenceStep::step(&model, validation.clone()).loss)[0];

    let loader = |starts: Vec<usize>| {
        DataLoaderBuilder::new(NextToken)
            .batch_size(8)
            .build(InMemDataset::new(
                starts.into_iter().map(counting).collect(),
            ))
    };
    let dir = std::env::temp_dir().join(format!("moe-learner-{}", std::process::id()));
    let optimizer: ModuleOptimizer = AdamWConfig::new().init();
    let result = SupervisedTraining::new(&dir, loader((0..64).collect()), loader((0..8).collect()))
        .num_epochs(4)
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_application_logger(None)
        .launch(Learner::new(model, optimizer, ConstantLr::new(1e-2)));
    let after = values(InferenceStep::step(&result.model, validation).loss)[0];
    let _ = std::fs::remove_dir_all(&dir);
    assert!(after < 0.7 * before, "validation loss {before} -> {after}");
}

#[test]
fn the_multimodal_steps_loss_is_the_captions_cross_entropy_plus_the_aux_loss() {
    use moe_core::rng::SplitMix64;
    use moe_models::{digits, MultimodalBatch, Segment};

    let device = Device::flex().autodiff();
    device.seed(7);
    let model = crate::multimodal::config(4).init(&device).unwrap();
    let digit_batch = digits::batch(3, 4, &mut SplitMix64(3), &device);
    let batch = MultimodalBatch {
        prefix: Segment::ImagePatches(digit_batch.images.clone()),
        target: Segment::Text(digit_batch.captions.clone()),
    };
    let output = TrainStep::step(&model, batch.clone()).item;

    // Cross-entropy by hand: every caption token predicted from the logits given for it.
    let logits = values(output.logits.clone());
    let targets = values(digit_batch.captions.float());
    let vocab = logits.len() / targets.len();
    let mut total = 0.0;
    for (position, &target) in targets.iter().enumerate() {
        let row = &logits[position * vocab..(position + 1) * vocab];
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
        total += log_sum - row[target as usize];
    }
    let aux = values(model.forward(&batch.prefix, &batch.target).aux_loss)[0];
    let loss = values(output.loss)[0];
    let expected = total / targets.len() as f64 + aux;
    assert!((loss - expected).abs() < 1e-5, "{loss} against {expected}");
    assert!((values(InferenceStep::step(&model, batch).loss)[0] - loss).abs() < 1e-6);
}
