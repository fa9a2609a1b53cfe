//! The multimodal digits task: captioning 8x8 digit images, or drawing them from their numeral.
//!
//! The images are drawn by code (unlimited, easy) or real handwritten MNIST digits
//! ([`super::mnist`]: 9,000 to train on, 1,000 held out).

use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::rng::SplitMix64;
use moe_models::digits::{self, DigitBatch, IMAGE_SIZE, NUMERALS, TEXT_VOCAB};
use moe_models::{Modality, MultimodalMoeTransformer, SamplingConfig, Segment};

use super::mnist::{self, MnistDigits};
use super::{Evaluation, LoadMean, StepOutput, Task};
use crate::config::{DigitSource, TaskKind, TrainConfig};
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;

/// Keeps the validation images apart from the training stream.
const VALIDATION_STREAM: u64 = 0x00d1_c175;
/// Keeps the MNIST split apart from other uses of the seed.
const MNIST_SPLIT_STREAM: u64 = 0x0d15_0001;
/// Images per numeral in the text-to-image sample grid.
const SAMPLES_PER_DIGIT: usize = 8;
/// MNIST images held out for validation.
pub const MNIST_HELD_OUT: usize = 1000;
/// Validation images per forward pass.
const EVAL_CHUNK: usize = 250;

/// Real digits split for training and validation.
struct RealDigits {
    digits: MnistDigits,
    train: Vec<usize>,
    validation: Vec<usize>,
}

/// Captioning (`Caption`) or drawing (`TextToImage`) digits.
pub struct DigitsTask {
    config: TrainConfig,
    real: Option<RealDigits>,
}

impl DigitsTask {
    /// The task `config.task` names (a multimodal one), on the images `config.data.digits`
    /// names (MNIST is fetched into the cache folder on first use).
    pub fn new(config: &TrainConfig, show_progress: bool) -> Result<Self> {
        let real = match config.data.digits {
            DigitSource::Drawn => None,
            DigitSource::Mnist => {
                let digits = mnist::load(&config.cache_dir(), show_progress)?;
                let mut order: Vec<usize> = (0..digits.len()).collect();
                SplitMix64(config.run.seed ^ MNIST_SPLIT_STREAM).shuffle(&mut order);
                let held_out = MNIST_HELD_OUT.min(digits.len() / 2);
                let validation = order[..held_out].to_vec();
                let train = order[held_out..].to_vec();
                Some(RealDigits {
                    digits,
                    train,
                    validation,
                })
            }
        };
        Ok(Self {
            config: config.clone(),
            real,
        })
    }

    /// The batch of the real images at `indices`.
    fn real_batch(
        real: &RealDigits,
        indices: &[usize],
        levels: usize,
        device: &Device,
    ) -> DigitBatch {
        let labels = indices.iter().map(|&i| real.digits.labels[i]).collect();
        let pixels = indices
            .iter()
            .flat_map(|&i| real.digits.image(i).iter().copied())
            .collect();
        digits::batch_of(labels, pixels, levels, device)
    }

    /// The validation batches: the held-out MNIST images, or a fixed set of drawn ones.
    fn validation_batches(&self, device: &Device) -> Vec<DigitBatch> {
        let levels = self.config.data.image_levels;
        match &self.real {
            Some(real) => real
                .validation
                .chunks(EVAL_CHUNK)
                .map(|chunk| Self::real_batch(real, chunk, levels, device))
                .collect(),
            None => {
                let count = self.config.optim.batch_size * self.config.run.eval_batches;
                let mut rng = SplitMix64(self.config.run.seed ^ VALIDATION_STREAM);
                vec![digits::batch(count, levels, &mut rng, device)]
            }
        }
    }

    fn segments(&self, batch: &DigitBatch) -> (Segment, Segment) {
        match self.config.task {
            TaskKind::TextToImage => (
                Segment::Text(batch.prompts.clone()),
                Segment::ImageTokens(batch.image_tokens.clone()),
            ),
            _ => (
                Segment::ImagePatches(batch.images.clone()),
                Segment::Text(batch.captions.clone()),
            ),
        }
    }
}

/// An 8x8 image as text, darkest to brightest `" .:#"`.
pub fn ascii_image(levels: &[usize], level_count: usize) -> String {
    const SHADES: [char; 4] = [' ', '.', ':', '#'];
    levels
        .chunks(IMAGE_SIZE)
        .map(|row| {
            row.iter()
                .map(|&l| SHADES[(l * (SHADES.len() - 1)) / (level_count - 1).max(1)])
                .flat_map(|c| [c, c])
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Task for DigitsTask {
    type Model = MultimodalMoeTransformer;

    fn build_model(&self, device: &Device) -> Result<MultimodalMoeTransformer> {
        Ok(self
            .config
            .multimodal_model_config(TEXT_VOCAB.len())
            .init(device)?)
    }

    fn step(
        &self,
        model: &MultimodalMoeTransformer,
        rng: &mut SplitMix64,
        batch_size: usize,
        device: &Device,
    ) -> StepOutput {
        let levels = self.config.data.image_levels;
        let batch = match &self.real {
            Some(real) => {
                let indices: Vec<usize> = (0..batch_size)
                    .map(|_| real.train[rng.below(real.train.len())])
                    .collect();
                Self::real_batch(real, &indices, levels, device)
            }
            None => digits::batch(batch_size, levels, rng, device),
        };
        let (prefix, target) = self.segments(&batch);
        let (loss, out) = model.loss(&prefix, &target);
        let positions = match self.config.task {
            TaskKind::TextToImage => 2 + IMAGE_SIZE * IMAGE_SIZE - 1,
            _ => model.config().patches_per_image() + 1,
        };
        StepOutput {
            cross_entropy: loss.clone() - out.aux_loss.clone(),
            loss,
            aux_loss: out.aux_loss,
            layer_stats: out.layer_stats,
            modality: out.modality_routing,
            tokens: batch_size * positions,
        }
    }

    fn evaluate(&self, model: &MultimodalMoeTransformer, device: &Device) -> Evaluation {
        let (mut loss_sum, mut images, mut right) = (0.0, 0usize, 0usize);
        let mut load = LoadMean::default();
        for batch in self.validation_batches(device) {
            let count = batch.digits.len();
            let (prefix, target) = self.segments(&batch);
            let (loss, out) = model.loss(&prefix, &target);
            loss_sum += (loss - out.aux_loss.clone()).into_scalar::<f64>() * count as f64;
            images += count;
            if self.config.task == TaskKind::Caption {
                right += count_right_numerals(&out.logits, &batch.digits);
            }
            load.add(&out.layer_stats, count as f64);
        }
        let images_f = images.max(1) as f64;
        Evaluation {
            loss: loss_sum / images_f,
            expert_load: load.mean(),
            accuracy: (self.config.task == TaskKind::Caption).then(|| right as f64 / images_f),
        }
    }

    fn samples(
        &self,
        model: &MultimodalMoeTransformer,
        count: usize,
        _max_tokens: usize,
        seed: u64,
    ) -> Vec<String> {
        let levels = self.config.data.image_levels;
        (0..count)
            .map(|i| {
                let digit = i % 10;
                let sampling = SamplingConfig {
                    temperature: 0.0,
                    seed: seed.wrapping_add(i as u64),
                    ..SamplingConfig::default()
                };
                match self.config.task {
                    TaskKind::TextToImage => {
                        format!(
                            "{}:\n{}",
                            NUMERALS[digit],
                            draw_numeral(model, digit, levels, sampling)
                        )
                    }
                    _ => caption_digit(model, digit, levels, sampling, seed.wrapping_add(i as u64)),
                }
            })
            .collect()
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        None
    }

    fn sample_images(
        &self,
        model: &MultimodalMoeTransformer,
        seed: u64,
    ) -> Vec<(usize, Vec<usize>)> {
        if self.config.task != TaskKind::TextToImage {
            return Vec::new();
        }
        (0..10 * SAMPLES_PER_DIGIT)
            .map(|i| {
                let digit = i / SAMPLES_PER_DIGIT;
                // Sampled at temperature 1: the grid shows the variety the model learned.
                let sampling = SamplingConfig {
                    temperature: 1.0,
                    top_k: None,
                    top_p: None,
                    seed: seed.wrapping_add(i as u64),
                };
                (digit, numeral_pixels(model, digit, sampling))
            })
            .collect()
    }

    fn describe(&self) -> String {
        let what = match self.config.task {
            TaskKind::TextToImage => "text-to-image",
            _ => "captioning",
        };
        let images = match &self.real {
            Some(real) => format!(
                "{} real MNIST digits shrunk to 8x8 ({} training, {} held out)",
                real.digits.len(),
                real.train.len(),
                real.validation.len()
            ),
            None => "8x8 images of 0-9 drawn by code".into(),
        };
        format!(
            "digits {what}: {images}, {} pixel levels, numerals 零-九",
            self.config.data.image_levels
        )
    }
}

/// Asks a text-to-image model to draw `digit`; the image as text.
pub fn draw_numeral(
    model: &MultimodalMoeTransformer,
    digit: usize,
    levels: usize,
    sampling: SamplingConfig,
) -> String {
    ascii_image(&numeral_pixels(model, digit, sampling), levels)
}

/// Asks a text-to-image model to draw `digit`; the 64 pixel levels.
pub fn numeral_pixels(
    model: &MultimodalMoeTransformer,
    digit: usize,
    sampling: SamplingConfig,
) -> Vec<usize> {
    let device = model.text_head.weight.val().device();
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(
            vec![digits::BOS as i64, digits::numeral_token(digit) as i64],
            [1, 2],
        ),
        &device,
    );
    model
        .generate(
            &Segment::Text(ids),
            Modality::Image,
            IMAGE_SIZE * IMAGE_SIZE,
            sampling,
        )
        .unwrap_or_default()
}

/// Draws `digit` (seeded by `seed`) and asks a captioning model what it is; the image and
/// the answer as text.
pub fn caption_digit(
    model: &MultimodalMoeTransformer,
    digit: usize,
    levels: usize,
    sampling: SamplingConfig,
    seed: u64,
) -> String {
    let device = model.text_head.weight.val().device();
    let pixels = digits::draw(digit, &mut SplitMix64(seed));
    let image = Tensor::<4>::from_data(
        TensorData::new(pixels.clone(), [1, 1, IMAGE_SIZE, IMAGE_SIZE]),
        &device,
    );
    let caption = model
        .generate(&Segment::ImagePatches(image), Modality::Text, 1, sampling)
        .unwrap_or_default();
    let quantized: Vec<usize> = pixels
        .iter()
        .map(|&p| digits::quantize(p, levels))
        .collect();
    let word = caption
        .first()
        .and_then(|&t| TEXT_VOCAB.get(t))
        .copied()
        .unwrap_or("?");
    format!(
        "{}\n-> {word} (drawn: {})",
        ascii_image(&quantized, levels),
        NUMERALS[digit]
    )
}

/// How many of the captions' first tokens (the numeral) the logits `[batch, 2, vocab]` get
/// right for `digits`, choosing among the ten numerals.
fn count_right_numerals(logits: &Tensor<3>, digits: &[usize]) -> usize {
    let [batch, _, _] = logits.dims();
    let first = digits::numeral_token(0);
    let numerals = logits
        .clone()
        .slice([0..batch, 0..1, first..first + 10])
        .reshape([batch, 10]);
    let predicted: Vec<i64> = numerals
        .argmax(1)
        .reshape([batch])
        .try_into_vec_as()
        .unwrap_or_default();
    predicted
        .iter()
        .zip(digits)
        .filter(|&(&p, &d)| p as usize == d)
        .count()
}
