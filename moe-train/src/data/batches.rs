//! Token streams and batches: documents become one stream of `<bos> text <eos>`, and training
//! batches are random windows of it.

use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::rng::SplitMix64;

use crate::data::corpus::Document;
use crate::data::tokenizer::Tokenizer;

/// The documents of one split, tokenized and concatenated.
#[derive(Debug, Clone)]
pub struct TokenStream {
    /// Token ids.
    pub tokens: Vec<usize>,
}

/// Inputs and next-token targets, `[batch, context]` each.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input ids.
    pub inputs: Tensor<2, Int>,
    /// Target ids (the inputs shifted by one).
    pub targets: Tensor<2, Int>,
}

impl TokenStream {
    /// Tokenizes and concatenates `documents`.
    pub fn new(documents: &[Document], tokenizer: &Tokenizer) -> Self {
        Self {
            tokens: documents
                .iter()
                .flat_map(|d| tokenizer.encode_document(&d.text))
                .collect(),
        }
    }

    /// Number of windows of `context + 1` tokens that start at distinct positions.
    pub fn window_starts(&self, context: usize) -> usize {
        (self.tokens.len() + 1).saturating_sub(context + 1)
    }

    /// A batch of `batch_size` windows at random positions drawn from `rng`.
    pub fn random_batch(
        &self,
        batch_size: usize,
        context: usize,
        rng: &mut SplitMix64,
        device: &Device,
    ) -> Batch {
        let starts: Vec<usize> = (0..batch_size)
            .map(|_| rng.below(self.window_starts(context)))
            .collect();
        self.batch_at(&starts, context, device)
    }

    /// Up to `count` batches of consecutive non-overlapping windows from the start of the
    /// stream (the same every time: for validation).
    pub fn sequential_batches(
        &self,
        batch_size: usize,
        context: usize,
        count: usize,
        device: &Device,
    ) -> Vec<Batch> {
        let windows = ((self.tokens.len().saturating_sub(1)) / context)
            .max(1)
            .min(batch_size * count);
        let starts: Vec<usize> = (0..windows)
            .map(|w| (w * context).min(self.window_starts(context) - 1))
            .collect();
        starts
            .chunks(batch_size)
            .map(|chunk| self.batch_at(chunk, context, device))
            .collect()
    }

    fn batch_at(&self, starts: &[usize], context: usize, device: &Device) -> Batch {
        let mut inputs = Vec::with_capacity(starts.len() * context);
        let mut targets = Vec::with_capacity(starts.len() * context);
        for &start in starts {
            inputs.extend(
                self.tokens[start..start + context]
                    .iter()
                    .map(|&t| t as i64),
            );
            targets.extend(
                self.tokens[start + 1..start + context + 1]
                    .iter()
                    .map(|&t| t as i64),
            );
        }
        let shape = [starts.len(), context];
        Batch {
            inputs: Tensor::from_data(TensorData::new(inputs, shape), device),
            targets: Tensor::from_data(TensorData::new(targets, shape), device),
        }
    }
}
