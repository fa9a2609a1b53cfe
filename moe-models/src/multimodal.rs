//! A multimodal MoE transformer: images and text in one autoregressive sequence.
//!
//! Like CogView (Ding et al. 2021, the text-to-image part of Wu Dao 2.0), one decoder reads a
//! sequence made of two segments, `[image][text]` or `[text][image]`, each position tagged with
//! a modality embedding. Images enter either as patch embeddings (a linear map of each
//! `patch x patch` square, as in ViT; for captioning and classification) or as discrete image
//! tokens (each pixel quantised to a few levels; for text-to-image generation). The blocks are
//! the text model's ([`DecoderStack`]).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::RoutingStats;

use crate::block::{DecoderStack, KvCache};
use crate::decoder::DecoderConfig;
use crate::error::{check_nonzero, ModelError};
use crate::init::{embedding, linear};
use crate::projection;
use crate::sampling::{Sampler, SamplingConfig};
use crate::transformer::masked_cross_entropy;

/// Configuration of a [`MultimodalMoeTransformer`].
#[derive(Config, Debug)]
pub struct MultimodalMoeTransformerConfig {
    /// Text vocabulary size.
    pub text_vocab_size: usize,
    /// Levels of a quantised pixel: the image-token vocabulary.
    pub image_vocab_size: usize,
    /// Side of the (square) images, in pixels.
    pub image_size: usize,
    /// Side of a patch, in pixels (must divide `image_size`).
    pub patch_size: usize,
    /// The decoder stack, the text model's form.
    pub decoder: DecoderConfig,
    /// Image channels.
    #[config(default = 1)]
    pub image_channels: usize,
}

/// One part of the input sequence.
#[derive(Debug, Clone)]
pub enum Segment {
    /// Text token ids, `[batch, length]`.
    Text(Tensor<2, Int>),
    /// Images as pixels, `[batch, channels, size, size]`, embedded patch by patch.
    ImagePatches(Tensor<4>),
    /// Images as quantised pixel tokens, `[batch, channels * size * size]`.
    ImageTokens(Tensor<2, Int>),
}

/// Text or image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// Text tokens.
    Text,
    /// Image patches or tokens.
    Image,
}

impl Segment {
    /// Which modality the segment is.
    pub fn modality(&self) -> Modality {
        match self {
            Segment::Text(_) => Modality::Text,
            Segment::ImagePatches(_) | Segment::ImageTokens(_) => Modality::Image,
        }
    }

    fn tokens(&self) -> Option<&Tensor<2, Int>> {
        match self {
            Segment::Text(tokens) | Segment::ImageTokens(tokens) => Some(tokens),
            Segment::ImagePatches(_) => None,
        }
    }
}

/// Tokens each expert of one MoE layer processed, split by modality: computed on the device
/// when asked for (a training loop asks on the steps it logs).
#[derive(Debug, Clone)]
pub struct ModalityRouting {
    stats: RoutingStats,
    batch: usize,
    length: usize,
    image_positions: std::ops::Range<usize>,
}

impl ModalityRouting {
    /// From image positions, `[E]`.
    pub fn image(&self) -> Tensor<1, Int> {
        let assignments = self.stats.assignments();
        let [_, experts] = assignments.dims();
        assignments
            .int()
            .reshape([self.batch, self.length, experts])
            .slice([0..self.batch, self.image_positions.clone(), 0..experts])
            .sum_dims_squeeze(&[0, 1])
    }

    /// From text positions, `[E]`.
    pub fn text(&self) -> Tensor<1, Int> {
        self.stats.tokens_per_expert.clone() - self.image()
    }
}

/// Result of [`MultimodalMoeTransformer::forward`].
pub struct MultimodalOutput {
    /// Logits predicting each token of the target segment, `[batch, target_length, vocab]`
    /// (the target modality's vocabulary).
    pub logits: Tensor<3>,
    /// Sum of the MoE layers' auxiliary losses, `[1]`.
    pub aux_loss: Tensor<1>,
    /// Routing statistics of each MoE layer.
    pub layer_stats: Vec<RoutingStats>,
    /// Each MoE layer's expert load split by modality.
    pub modality_routing: Vec<ModalityRouting>,
}

impl MultimodalMoeTransformerConfig {
    /// Patches per image.
    pub fn patches_per_image(&self) -> usize {
        (self.image_size / self.patch_size.max(1)).pow(2)
    }

    /// Image tokens per image (one per pixel and channel).
    pub fn tokens_per_image(&self) -> usize {
        self.image_channels * self.image_size * self.image_size
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, value) in [
            ("text_vocab_size", self.text_vocab_size),
            ("image_vocab_size", self.image_vocab_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("image_channels", self.image_channels),
        ] {
            check_nonzero(field, value)?;
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(ModelError::PatchDoesNotDivide {
                image_size: self.image_size,
                patch_size: self.patch_size,
            });
        }
        self.decoder.validate()
    }

    /// The dense baseline with the same active parameters (see
    /// [`DecoderConfig::dense_equivalent`]).
    pub fn dense_equivalent(&self) -> Self {
        Self {
            decoder: self.decoder.dense_equivalent(),
            ..self.clone()
        }
    }

    /// Validates and builds the model.
    pub fn init(&self, device: &Device) -> Result<MultimodalMoeTransformer, ModelError> {
        self.validate()?;
        let d_model = self.decoder.d_model;
        let patch_dim = self.image_channels * self.patch_size * self.patch_size;
        Ok(MultimodalMoeTransformer {
            text_embedding: embedding(self.text_vocab_size, d_model, device),
            image_token_embedding: embedding(self.image_vocab_size, d_model, device),
            patch_embedding: linear(patch_dim, d_model, true, device),
            modality_embedding: embedding(2, d_model, device),
            stack: DecoderStack::init(&self.decoder, device)?,
            text_head: linear(d_model, self.text_vocab_size, false, device),
            image_head: linear(d_model, self.image_vocab_size, false, device),
            config: self.clone(),
        })
    }
}

/// One decoder over `[image][text]` or `[text][image]` sequences.
#[derive(Module, Debug)]
pub struct MultimodalMoeTransformer {
    /// Text token embedding.
    pub text_embedding: Embedding,
    /// Image token embedding (quantised pixels).
    pub image_token_embedding: Embedding,
    /// Linear patch embedding.
    pub patch_embedding: Linear,
    /// Modality embedding: row 0 text, row 1 image.
    pub modality_embedding: Embedding,
    /// The blocks, shared in form with the text model.
    pub stack: DecoderStack,
    /// Text output projection.
    pub text_head: Linear,
    /// Image-token output projection.
    pub image_head: Linear,
    #[module(skip)]
    config: MultimodalMoeTransformerConfig,
}

impl MultimodalMoeTransformer {
    /// The config the model was built from.
    pub fn config(&self) -> &MultimodalMoeTransformerConfig {
        &self.config
    }

    /// Embeds one segment: `[batch, positions, d_model]`, modality embedding included.
    fn embed(&self, segment: &Segment) -> Tensor<3> {
        let (x, modality) = match segment {
            Segment::Text(tokens) => (self.text_embedding.forward(tokens.clone()), 0),
            Segment::ImageTokens(tokens) => (self.image_token_embedding.forward(tokens.clone()), 1),
            Segment::ImagePatches(images) => (
                projection::apply(&self.patch_embedding, self.patches(images.clone())),
                1,
            ),
        };
        let [batch, positions, _] = x.dims();
        let ids = Tensor::<2, Int>::full([batch, positions], modality, &x.device());
        x + self.modality_embedding.forward(ids)
    }

    /// `[batch, channels, size, size]` to `[batch, patches, channels * patch * patch]`, patches
    /// in row-major order.
    fn patches(&self, images: Tensor<4>) -> Tensor<3> {
        let [batch, channels, size, _] = images.dims();
        let patch = self.config.patch_size;
        let grid = size / patch;
        images
            .reshape([batch, channels, grid, patch, grid, patch])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([batch, grid * grid, channels * patch * patch])
    }

    /// Runs `[prefix][target]` and returns the logits that predict every target token: the
    /// last prefix position predicts the first target token, and so on. The target must be
    /// text or image tokens.
    ///
    /// # Panics
    ///
    /// If the target is image patches, or the sequence exceeds the context.
    pub fn forward(&self, prefix: &Segment, target: &Segment) -> MultimodalOutput {
        let target_tokens = target
            .tokens()
            .expect("the target segment must be tokens (text or image tokens)");
        let [batch, target_length] = target_tokens.dims();
        let mut parts = vec![self.embed(prefix)];
        let prefix_length = parts[0].dims()[1];
        if target_length > 1 {
            let shifted = target_tokens
                .clone()
                .slice([0..batch, 0..target_length - 1]);
            parts.push(self.embed(&match target {
                Segment::Text(_) => Segment::Text(shifted),
                _ => Segment::ImageTokens(shifted),
            }));
        }
        let x = Tensor::cat(parts, 1);
        let out = self.run(x, None);
        let hidden = out.hidden.slice([
            0..batch,
            prefix_length - 1..prefix_length - 1 + target_length,
        ]);
        let length = prefix_length + target_length - 1;
        let image_positions = match prefix.modality() {
            Modality::Image => 0..prefix_length,
            Modality::Text => prefix_length..length,
        };
        MultimodalOutput {
            logits: self.head(target.modality(), hidden),
            modality_routing: out
                .layer_stats
                .iter()
                .map(|stats| ModalityRouting {
                    stats: stats.clone(),
                    batch,
                    length,
                    image_positions: image_positions.clone(),
                })
                .collect(),
            aux_loss: out.aux_loss,
            layer_stats: out.layer_stats,
        }
    }

    /// Cross-entropy of the target tokens given the prefix, plus the auxiliary losses; also
    /// returns the forward output.
    pub fn loss(&self, prefix: &Segment, target: &Segment) -> (Tensor<1>, MultimodalOutput) {
        let out = self.forward(prefix, target);
        let tokens = target.tokens().expect("target tokens").clone();
        let mask = tokens.clone().greater_equal_elem(0);
        let cross_entropy = masked_cross_entropy(out.logits.clone(), tokens, mask);
        (cross_entropy + out.aux_loss.clone(), out)
    }

    /// Generates `length` tokens of `modality` after `prefix` (one sequence), e.g. the image
    /// tokens of a caption, with a key/value cache.
    pub fn generate(
        &self,
        prefix: &Segment,
        modality: Modality,
        length: usize,
        sampling: SamplingConfig,
    ) -> Result<Vec<usize>, ModelError> {
        let x = self.embed(prefix);
        let prefix_length = x.dims()[1];
        if prefix_length + length > self.config.decoder.context_length + 1 {
            return Err(ModelError::TooLong {
                length: prefix_length + length - 1,
                context_length: self.config.decoder.context_length,
            });
        }
        let device = x.device();
        let mut cache = KvCache::new();
        let mut hidden = self.run(x, Some(&mut cache)).hidden;
        let mut sampler = Sampler::new(sampling);
        let mut generated = Vec::with_capacity(length);
        for step in 0..length {
            let positions = hidden.dims()[1];
            let last = self.head(
                modality,
                hidden.clone().slice([0..1, positions - 1..positions]),
            );
            let logits: Vec<f32> = last
                .try_into_vec_as::<f32>()
                .expect("logits convert to f32");
            let token = sampler.sample(&logits, &[]);
            generated.push(token);
            if step + 1 < length {
                let ids = Tensor::<2, Int>::from_data(
                    TensorData::new(vec![token as i64], [1, 1]),
                    &device,
                );
                let next = match modality {
                    Modality::Text => Segment::Text(ids),
                    Modality::Image => Segment::ImageTokens(ids),
                };
                hidden = self.run(self.embed(&next), Some(&mut cache)).hidden;
            }
        }
        Ok(generated)
    }

    fn run(&self, x: Tensor<3>, cache: Option<&mut KvCache>) -> crate::block::StackOutput {
        self.stack
            .forward(x, cache, self.config.decoder.context_length)
    }

    fn head(&self, modality: Modality, hidden: Tensor<3>) -> Tensor<3> {
        match modality {
            Modality::Text => projection::apply(&self.text_head, hidden),
            Modality::Image => projection::apply(&self.image_head, hidden),
        }
    }
}
