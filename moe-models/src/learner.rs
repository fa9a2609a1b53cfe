//! The models as burn-train models: [`TrainStep`] and [`InferenceStep`] for both, so that they
//! train with burn-train's `Learner` and `SupervisedTraining` (its metrics, dashboard and
//! checkpoints) as well as with burn-moe's own trainer. `examples/learner.rs` shows it.
//!
//! Both steps return burn-train's [`SequenceOutput`]: the loss (cross-entropy plus the MoE
//! layers' auxiliary losses, which train the routers), the logits and the targets, which its
//! loss, accuracy and perplexity metrics read.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn::train::{InferenceStep, SequenceOutput, TrainOutput, TrainStep};

use crate::multimodal::{MultimodalMoeTransformer, Segment};
use crate::transformer::{masked_cross_entropy, MoeTransformer};

/// A batch of next-token prediction for [`MoeTransformer`].
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// Input tokens, `[batch, length]`.
    pub tokens: Tensor<2, Int>,
    /// The token after each input token, `[batch, length]`.
    pub targets: Tensor<2, Int>,
    /// `true` where a target counts (padding is `false`), `[batch, length]`.
    pub mask: Tensor<2, Bool>,
}

impl TextBatch {
    /// Next-token prediction on `sequences` of one length `L + 1`: the first `L` tokens of
    /// each are the inputs, the last `L` the targets, and every target counts.
    ///
    /// # Panics
    ///
    /// If `sequences` is empty or their lengths differ or are below 2.
    pub fn next_token(sequences: &[Vec<i64>], device: &Device) -> Self {
        let batch = sequences.len();
        let length = sequences.first().map_or(0, Vec::len).saturating_sub(1);
        assert!(
            batch > 0 && length > 0 && sequences.iter().all(|s| s.len() == length + 1),
            "TextBatch::next_token: give one or more sequences of one length, at least 2"
        );
        let take = |range: std::ops::Range<usize>| {
            let ids: Vec<i64> = sequences
                .iter()
                .flat_map(|s| s[range.clone()].iter().copied())
                .collect();
            Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, length]), device)
        };
        Self {
            tokens: take(0..length),
            targets: take(1..length + 1),
            mask: Tensor::<2, Bool>::from_data(
                TensorData::new(vec![true; batch * length], [batch, length]),
                device,
            ),
        }
    }
}

impl MoeTransformer {
    /// The loss and the outputs burn-train's metrics read, for `batch`.
    fn sequence_output(&self, batch: TextBatch) -> SequenceOutput {
        let out = self.forward(batch.tokens);
        let logits = moe_core::precision::to_dtype(out.logits, self.loss_dtype());
        let loss =
            masked_cross_entropy(logits.clone(), batch.targets.clone(), batch.mask) + out.aux_loss;
        SequenceOutput::new(loss, logits, None, batch.targets)
    }
}

impl TrainStep for MoeTransformer {
    type Input = TextBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: TextBatch) -> TrainOutput<SequenceOutput> {
        let output = self.sequence_output(batch);
        let grads = output.loss.backward();
        TrainOutput::new(self, grads, output)
    }
}

impl InferenceStep for MoeTransformer {
    type Input = TextBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: TextBatch) -> SequenceOutput {
        self.sequence_output(batch)
    }
}

/// A batch for [`MultimodalMoeTransformer`]: a prefix segment and the token segment it
/// predicts (captions after images, or pixel tokens after a prompt).
#[derive(Debug, Clone)]
pub struct MultimodalBatch {
    /// What the model reads first.
    pub prefix: Segment,
    /// The tokens it predicts ([`Segment::Text`] or [`Segment::ImageTokens`]).
    pub target: Segment,
}

impl MultimodalMoeTransformer {
    fn sequence_output(&self, batch: MultimodalBatch) -> SequenceOutput {
        let targets = match &batch.target {
            Segment::Text(tokens) | Segment::ImageTokens(tokens) => tokens.clone(),
            Segment::ImagePatches(_) => panic!(
                "MultimodalBatch: the target must be tokens (text or image tokens), not patches"
            ),
        };
        let (loss, out) = self.loss(&batch.prefix, &batch.target);
        SequenceOutput::new(loss, out.logits, None, targets)
    }
}

impl TrainStep for MultimodalMoeTransformer {
    type Input = MultimodalBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: MultimodalBatch) -> TrainOutput<SequenceOutput> {
        let output = self.sequence_output(batch);
        let grads = output.loss.backward();
        TrainOutput::new(self, grads, output)
    }
}

impl InferenceStep for MultimodalMoeTransformer {
    type Input = MultimodalBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: MultimodalBatch) -> SequenceOutput {
        self.sequence_output(batch)
    }
}
