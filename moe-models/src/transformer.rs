//! The Wudao-style decoder-only MoE text transformer.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Bool, Device, FloatDType, Int, Tensor};
use moe_core::precision::{param_for, to_dtype};
use moe_core::{DropPolicy, ExpertConfig, MoeConfig, RoutingStats};
use moe_kernels::cross_entropy;

use crate::attention::CausalSelfAttention;
use crate::block::{DecoderStack, KvCache, StackSettings};
use crate::error::{check_nonzero, check_probability, ModelError};
use crate::init::{embedding, linear};
use crate::norm::NormKind;
use crate::projection;

/// How the model knows where a token is.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum PositionKind {
    /// A learned vector per position, added to the token embedding (GPT-2).
    Learned,
    /// Rotary position embedding applied to queries and keys (RoFormer; LLaMA).
    Rotary,
}

/// Configuration of a [`MoeTransformer`].
///
/// ```
/// use moe_core::{ExpertConfig, MoeConfig};
/// use moe_models::MoeTransformerConfig;
///
/// let moe = MoeConfig::new(128, 8, ExpertConfig::new(256)).with_top_k(2);
/// let config = MoeTransformerConfig::new(5000, 64, 128, 4, 4, 512, moe).with_moe_every(2);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Config, Debug)]
pub struct MoeTransformerConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the model sees.
    pub context_length: usize,
    /// Model width.
    pub d_model: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Hidden size of the dense FFN layers (same form as the experts).
    pub d_ff: usize,
    /// The MoE layer of the MoE blocks (`moe.d_model` must equal `d_model`).
    pub moe: MoeConfig,
    /// MoE FFN in every `moe_every`-th block (1: all, 2: every other); 0: a dense model.
    #[config(default = 1)]
    pub moe_every: usize,
    /// Normalisation.
    #[config(default = "NormKind::RmsNorm")]
    pub norm: NormKind,
    /// Position encoding.
    #[config(default = "PositionKind::Rotary")]
    pub positions: PositionKind,
    /// Dropout probability (residual and attention).
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Share the input embedding with the output projection.
    #[config(default = true)]
    pub tie_embeddings: bool,
}

impl PartialEq for MoeTransformerConfig {
    fn eq(&self, other: &Self) -> bool {
        burn::config::config_to_json(self) == burn::config::config_to_json(other)
    }
}

/// Parameter counts of a model (computed from its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCount {
    /// Every parameter.
    pub total: usize,
    /// Parameters one token uses in a forward pass: everything but the experts it is not
    /// routed to (the number MoE papers quote as "active").
    pub active: usize,
    /// Token and position embeddings (and the output projection when it is not tied).
    pub embedding: usize,
}

impl MoeTransformerConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_nonzero("vocab_size", self.vocab_size)?;
        check_nonzero("context_length", self.context_length)?;
        check_nonzero("d_model", self.d_model)?;
        check_nonzero("num_layers", self.num_layers)?;
        check_nonzero("num_heads", self.num_heads)?;
        check_nonzero("d_ff", self.d_ff)?;
        check_probability("dropout", self.dropout)?;
        validate_stack(
            self.d_model,
            self.num_heads,
            self.positions,
            self.moe_every,
            &self.moe,
        )
    }

    /// Validates and builds the model on `device`.
    pub fn init(&self, device: &Device) -> Result<MoeTransformer, ModelError> {
        self.validate()?;
        let stack = DecoderStack::init(&self.stack_settings(), device)?;
        Ok(MoeTransformer {
            token_embedding: embedding(self.vocab_size, self.d_model, device),
            stack,
            lm_head: (!self.tie_embeddings)
                .then(|| linear(self.d_model, self.vocab_size, false, device)),
            config: self.clone(),
            compute_dtype: None,
        })
    }

    pub(crate) fn stack_settings(&self) -> StackSettings {
        StackSettings {
            d_model: self.d_model,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            context_length: self.context_length,
            rotary: self.positions == PositionKind::Rotary,
            norm: self.norm,
            dropout: self.dropout,
            dense_ffn: self.dense_ffn(),
            moe: self.moe.clone(),
            moe_every: self.moe_every,
        }
    }

    /// The FFN of the dense layers: the experts' form with `d_ff` hidden units.
    pub fn dense_ffn(&self) -> ExpertConfig {
        ExpertConfig::new(self.d_ff).with_kind(self.moe.expert.kind)
    }

    /// The dense baseline with the same active parameters: every block dense, with
    /// `d_ff = (top_k + shared_experts) * expert d_hidden`. Its active parameter count is this
    /// model's minus the routers and, for FFN experts (which have biases), minus
    /// `(top_k + shared_experts - 1) * d_model` output biases per MoE layer (one wide FFN has one
    /// output bias where `k` experts have `k`) -- provided this model's own dense layers already
    /// use that width, as the presets do; otherwise they change width too.
    pub fn dense_equivalent(&self) -> Self {
        let width = self.moe.active_experts_per_token() * self.moe.expert.d_hidden;
        let mut dense = self.clone().with_moe_every(0);
        dense.d_ff = width;
        dense
    }

    /// Number of MoE blocks.
    pub fn num_moe_layers(&self) -> usize {
        self.stack_settings().num_moe_layers()
    }

    /// Total, active and embedding parameters.
    pub fn parameter_count(&self) -> ParameterCount {
        let d = self.d_model;
        let norm = self.norm.num_params(d);
        let token_embedding = self.vocab_size * d;
        let positions = match self.positions {
            PositionKind::Learned => self.context_length * d,
            PositionKind::Rotary => 0,
        };
        let head = if self.tie_embeddings {
            0
        } else {
            d * self.vocab_size
        };
        let block_common = 2 * norm + CausalSelfAttention::num_params(d);
        let dense_ffn = self.dense_ffn().params_per_expert(d);
        let moe_layers = self.num_moe_layers();
        let dense_layers = self.num_layers - moe_layers;
        let embedding = token_embedding + positions + head;
        let shared = embedding + norm + self.num_layers * block_common + dense_layers * dense_ffn;
        ParameterCount {
            total: shared + moe_layers * self.moe.num_params(),
            active: shared + moe_layers * self.moe.num_active_params(),
            embedding,
        }
    }
}

/// Checks shared by the text and the multimodal model.
pub(crate) fn validate_stack(
    d_model: usize,
    num_heads: usize,
    positions: PositionKind,
    moe_every: usize,
    moe: &MoeConfig,
) -> Result<(), ModelError> {
    if !d_model.is_multiple_of(num_heads) {
        return Err(ModelError::HeadsDoNotDivide { d_model, num_heads });
    }
    let head_dim = d_model / num_heads;
    if positions == PositionKind::Rotary && !head_dim.is_multiple_of(2) {
        return Err(ModelError::OddHeadDim { head_dim });
    }
    if moe_every > 0 {
        if moe.d_model != d_model {
            return Err(ModelError::MoeWidth {
                model: d_model,
                moe: moe.d_model,
            });
        }
        if moe.gate.is_expert_choice() {
            return Err(ModelError::NotCausal {
                what: "the expert-choice gate",
                why: "each expert compares all tokens of the batch, so a later token can push an earlier one out of an expert",
            });
        }
        if moe.capacity.drop_policy == DropPolicy::Probability && !moe.capacity.dropless {
            return Err(ModelError::NotCausal {
                what: "`moe.capacity.drop_policy = Probability`",
                why: "a later token with a larger gate weight can take an earlier token's slot; use Position or dropless",
            });
        }
        moe.validate()?;
    }
    Ok(())
}

/// A decoder-only transformer whose feed-forward layers are (some of them) MoE layers.
///
/// tokens -> embedding (+ learned positions) -> blocks -> final norm -> logits.
#[derive(Module, Debug)]
pub struct MoeTransformer {
    /// Token embedding, `[vocab, d_model]`.
    pub token_embedding: Embedding,
    /// Positions, blocks and final norm.
    pub stack: DecoderStack,
    /// Output projection (when not tied to the token embedding).
    pub lm_head: Option<Linear>,
    #[module(skip)]
    config: MoeTransformerConfig,
    /// The type activations are computed in, when it is not the parameters' (mixed precision).
    #[module(skip)]
    compute_dtype: Option<FloatDType>,
}

/// Result of [`MoeTransformer::forward`].
pub struct ModelOutput {
    /// Next-token logits, `[batch, length, vocab]`.
    pub logits: Tensor<3>,
    /// Sum of the MoE layers' auxiliary losses, `[1]`.
    pub aux_loss: Tensor<1>,
    /// Routing statistics of each MoE layer, in layer order.
    pub layer_stats: Vec<RoutingStats>,
}

/// Result of [`MoeTransformer::loss`].
pub struct LossOutput {
    /// `cross_entropy + aux_loss`, `[1]`: what to back-propagate.
    pub loss: Tensor<1>,
    /// Mean cross-entropy over the counted targets, `[1]`.
    pub cross_entropy: Tensor<1>,
    /// Sum of the MoE layers' auxiliary losses, `[1]`.
    pub aux_loss: Tensor<1>,
    /// Routing statistics of each MoE layer.
    pub layer_stats: Vec<RoutingStats>,
}

impl MoeTransformer {
    /// The config the model was built from.
    pub fn config(&self) -> &MoeTransformerConfig {
        &self.config
    }

    pub(crate) fn set_config(&mut self, config: MoeTransformerConfig) {
        self.config = config;
    }

    /// Logits for `tokens: [batch, length]` (`length <= context_length`).
    ///
    /// # Panics
    ///
    /// If `length` exceeds the context length.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> ModelOutput {
        self.run(tokens, None)
    }

    /// Logits for `tokens: [batch, length]` that continue the sequence held in `cache`; the
    /// cache is extended. Equal to the matching rows of a full [`forward`](Self::forward) over
    /// the whole sequence (when capacity drops nothing).
    ///
    /// # Panics
    ///
    /// If the cached and new positions together exceed the context length.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: &mut KvCache) -> ModelOutput {
        self.run(tokens, Some(cache))
    }

    /// The model computing its activations in `dtype` (mixed precision: `F16` or `BF16`)
    /// while its parameters, their gradients and the optimizer's state stay in their own type;
    /// the router, the norms and the loss keep the parameters' precision. `None` computes in
    /// the parameters' type.
    pub fn with_compute_dtype(mut self, dtype: Option<FloatDType>) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The type activations are computed in, when it is not the parameters' (see
    /// [`MoeTransformer::with_compute_dtype`]).
    pub fn compute_dtype(&self) -> Option<FloatDType> {
        self.compute_dtype
    }

    fn run(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> ModelOutput {
        let x = self.token_embedding.forward(tokens);
        let x = match self.compute_dtype {
            Some(dtype) => x.cast(dtype),
            None => x,
        };
        let out = self.stack.forward(x, cache, self.config.context_length);
        ModelOutput {
            logits: self.project(out.hidden),
            aux_loss: out.aux_loss,
            layer_stats: out.layer_stats,
        }
    }

    /// Hidden states to vocabulary logits.
    fn project(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => projection::apply(head, hidden),
            None => {
                let weight = param_for(&self.token_embedding.weight, &hidden);
                moe_kernels::matmul(hidden, weight.transpose())
            }
        }
    }

    /// Cross-entropy of predicting `targets` from `tokens` (both `[batch, length]`; usually
    /// `targets` is `tokens` shifted by one), counting only positions where `mask` is true
    /// (padding is false), plus the auxiliary losses.
    pub fn loss(
        &self,
        tokens: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        mask: Tensor<2, Bool>,
    ) -> LossOutput {
        let out = self.forward(tokens);
        // The loss in the parameters' precision: a sum over the vocabulary and the batch.
        let logits = to_dtype(out.logits, self.token_embedding.weight.val().dtype());
        let cross_entropy = masked_cross_entropy(logits, targets, mask);
        LossOutput {
            loss: cross_entropy.clone() + out.aux_loss.clone(),
            cross_entropy,
            aux_loss: out.aux_loss,
            layer_stats: out.layer_stats,
        }
    }
}

/// Mean of `-log p(target)` over the positions where `mask` is true, for `logits:
/// [batch, length, vocab]` and `targets`, `mask: [batch, length]` (one fused
/// [`moe_kernels::cross_entropy`] over all positions, then the masked mean).
pub fn masked_cross_entropy(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    mask: Tensor<2, Bool>,
) -> Tensor<1> {
    let [batch, length, vocab] = logits.dims();
    let positions = batch * length;
    let losses = cross_entropy(
        logits.reshape([positions, vocab]),
        targets.reshape([positions]),
    );
    let weights = mask.float().reshape([positions]);
    let count = weights.clone().sum().clamp_min(1.0);
    (losses * weights).sum() / count
}
