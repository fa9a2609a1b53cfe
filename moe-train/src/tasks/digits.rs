//! The multimodal digits task: captioning 8x8 digit images, or drawing them from their numeral.

use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::rng::SplitMix64;
use moe_models::digits::{self, DigitBatch, IMAGE_SIZE, NUMERALS, TEXT_VOCAB};
use moe_models::{Modality, MultimodalMoeTransformer, SamplingConfig, Segment};

use super::{expert_shares, Evaluation, StepOutput, Task};
use crate::config::{Task as TaskKind, TrainConfig};
use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Keeps the validation images apart from the training stream.
const VALIDATION_STREAM: u64 = 0x00d1_c175;

/// Captioning (`Caption`) or drawing (`TextToImage`) digits.
pub struct DigitsTask {
    config: TrainConfig,
    device: Device,
}

impl DigitsTask {
    /// The task `config.task` names (a multimodal one).
    pub fn new(config: &TrainConfig, device: &Device) -> Self {
        Self {
            config: config.clone(),
            device: device.clone(),
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

    fn step(&self, model: &MultimodalMoeTransformer, rng: &mut SplitMix64) -> StepOutput {
        let batch_size = self.config.optim.batch_size;
        let batch = digits::batch(batch_size, self.config.data.image_levels, rng, &self.device);
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
        let count = self.config.optim.batch_size * self.config.run.eval_batches;
        let mut rng = SplitMix64(self.config.run.seed ^ VALIDATION_STREAM);
        let batch = digits::batch(count, self.config.data.image_levels, &mut rng, device);
        let (prefix, target) = self.segments(&batch);
        let (loss, out) = model.loss(&prefix, &target);
        let cross_entropy = (loss - out.aux_loss).into_scalar::<f64>();
        Evaluation {
            loss: cross_entropy,
            expert_load: expert_shares(&out.layer_stats),
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

    fn describe(&self) -> String {
        let what = match self.config.task {
            TaskKind::TextToImage => "text-to-image",
            _ => "captioning",
        };
        format!(
            "digits {what}: 8x8 images of 0-9 drawn by code, {} pixel levels, numerals 零-九",
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
    let device = model.text_head.weight.val().device();
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(
            vec![digits::BOS as i64, digits::numeral_token(digit) as i64],
            [1, 2],
        ),
        &device,
    );
    let pixels = model
        .generate(
            &Segment::Text(ids),
            Modality::Image,
            IMAGE_SIZE * IMAGE_SIZE,
            sampling,
        )
        .unwrap_or_default();
    ascii_image(&pixels, levels)
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
