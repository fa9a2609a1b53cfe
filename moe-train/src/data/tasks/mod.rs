//! What is trained: a language model on text, or the multimodal model on the digits task.

pub mod digits;
pub mod mnist;
pub mod text;

use burn::tensor::{Device, Tensor};
use moe_core::rng::SplitMix64;
use moe_core::RoutingStats;
use moe_models::{ExpertParallel, ModalityRouting};

use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use crate::store::checkpoint::DataRecord;

/// What one micro-batch produced.
pub struct StepOutput {
    /// Cross-entropy plus auxiliary losses, `[1]` (what is back-propagated).
    pub loss: Tensor<1>,
    /// Cross-entropy alone, `[1]`.
    pub cross_entropy: Tensor<1>,
    /// Auxiliary losses, `[1]`.
    pub aux_loss: Tensor<1>,
    /// Routing statistics of each MoE layer.
    pub layer_stats: Vec<RoutingStats>,
    /// Expert load split by modality (multimodal tasks).
    pub modality: Vec<ModalityRouting>,
    /// Tokens (positions) in the micro-batch.
    pub tokens: usize,
}

/// Validation result.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Mean cross-entropy on the validation data.
    pub loss: f64,
    /// Share of each expert's load per MoE layer on the validation data.
    pub expert_load: Vec<Vec<f64>>,
    /// Share of validation images captioned with the right numeral (captioning).
    pub accuracy: Option<f64>,
}

/// A training task: how to build the model, draw batches, validate and show samples.
pub trait Task {
    /// The model trained (it can spread its experts and run as replicas: [`ExpertParallel`]).
    type Model: ExpertParallel;

    /// A freshly initialised model on `device`.
    fn build_model(&self, device: &Device) -> Result<Self::Model>;
    /// Loss of one random micro-batch of `sequences` examples drawn with `rng`, on `device`
    /// (the model's, or a data-parallel replica's). Drawing `n` then `m` examples draws what
    /// drawing `n + m` at once would, in that order.
    fn step(
        &self,
        model: &Self::Model,
        rng: &mut SplitMix64,
        sequences: usize,
        device: &Device,
    ) -> StepOutput;
    /// Validation on fixed data; `model` is in evaluation mode on `device`.
    fn evaluate(&self, model: &Self::Model, device: &Device) -> Evaluation;
    /// `count` samples from the model (evaluation mode), for people to read.
    fn samples(
        &self,
        model: &Self::Model,
        count: usize,
        max_tokens: usize,
        seed: u64,
    ) -> Vec<String>;
    /// The tokenizer to save with checkpoints (text tasks).
    fn tokenizer(&self) -> Option<&Tokenizer>;
    /// Images drawn by the model, `(digit, pixel levels)` (text-to-image), for a sample grid.
    fn sample_images(&self, _model: &Self::Model, _seed: u64) -> Vec<(usize, Vec<usize>)> {
        Vec::new()
    }
    /// What the run trains on, saved with checkpoints (text tasks).
    fn data_record(&self) -> Option<&DataRecord> {
        None
    }
    /// One line about the data.
    fn describe(&self) -> String;
}

/// Share of each expert in `stats` per layer (rows sum to 1; empty rows for no assignments).
pub fn expert_shares(stats: &[RoutingStats]) -> Vec<Vec<f64>> {
    stats
        .iter()
        .map(|s| {
            shares(
                &s.tokens_per_expert
                    .clone()
                    .try_into_vec_as::<i64>()
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// The mean of the expert shares of several validation batches, each weighted (by its
/// images, say).
#[derive(Debug, Clone, Default)]
pub struct LoadMean {
    sum: Vec<Vec<f64>>,
    weight: f64,
}

impl LoadMean {
    /// Adds one batch's routing statistics with `weight`.
    pub fn add(&mut self, stats: &[RoutingStats], weight: f64) {
        let shares = expert_shares(stats);
        if self.sum.is_empty() {
            self.sum = vec![Vec::new(); shares.len()];
        }
        for (sum, layer) in self.sum.iter_mut().zip(shares) {
            if sum.is_empty() {
                *sum = vec![0.0; layer.len()];
            }
            sum.iter_mut()
                .zip(layer)
                .for_each(|(a, b)| *a += b * weight);
        }
        self.weight += weight;
    }

    /// The weighted mean, `[layer][expert]`.
    pub fn mean(mut self) -> Vec<Vec<f64>> {
        let weight = if self.weight > 0.0 { self.weight } else { 1.0 };
        self.sum
            .iter_mut()
            .for_each(|layer| layer.iter_mut().for_each(|v| *v /= weight));
        self.sum
    }
}

/// Normalises counts to shares.
pub fn shares(counts: &[i64]) -> Vec<f64> {
    let total: i64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| {
            if total > 0 {
                c as f64 / total as f64
            } else {
                0.0
            }
        })
        .collect()
}
