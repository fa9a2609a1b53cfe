//! The Wudao-style decoder-only MoE text transformer.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor};
use moe_core::precision::{param_for, to_dtype};
use moe_core::RoutingStats;
use moe_kernels::cross_entropy;

use crate::block::{DecoderStack, KvCache};
use crate::decoder::{DecoderConfig, PositionKind};
use crate::error::{check_nonzero, ModelError};
use crate::init::{embedding, linear};
use crate::projection;

/// Configuration of a [`MoeTransformer`]: a token embedding, the decoder stack
/// ([`DecoderConfig`]) and an output head, tied to the embedding or not.
///
/// ```
/// use moe_core::{ExpertConfig, MoeConfig};
/// use moe_models::{DecoderConfig, MoeTransformerConfig};
///
/// let moe = MoeConfig::new(128, 8, ExpertConfig::new(256)).with_top_k(2);
/// let decoder = DecoderConfig::new(64, 128, 4, 4, 512, moe).with_moe_every(2);
/// let config = MoeTransformerConfig::new(5000, decoder);
/// assert!(config.validate().is_ok());
/// assert_eq!(config.num_moe_layers(), 2);
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct MoeTransformerConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The decoder stack.
    pub decoder: DecoderConfig,
    /// Share the input embedding with the output projection.
    #[config(default = true)]
    pub tie_embeddings: bool,
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
        self.decoder.validate()
    }

    /// Validates and builds the model on `device`.
    pub fn init(&self, device: &Device) -> Result<MoeTransformer, ModelError> {
        self.validate()?;
        let d_model = self.decoder.d_model;
        let stack = DecoderStack::init(&self.decoder, device)?;
        Ok(MoeTransformer {
            token_embedding: embedding(self.vocab_size, d_model, device),
            stack,
            lm_head: (!self.tie_embeddings)
                .then(|| linear(d_model, self.vocab_size, false, device)),
            config: self.clone(),
            compute_dtype: None,
        })
    }

    /// The dense baseline with the same active parameters (see
    /// [`DecoderConfig::dense_equivalent`]).
    pub fn dense_equivalent(&self) -> Self {
        Self {
            decoder: self.decoder.dense_equivalent(),
            ..self.clone()
        }
    }

    /// Number of MoE blocks.
    pub fn num_moe_layers(&self) -> usize {
        self.decoder.num_moe_layers()
    }

    /// Total, active and embedding parameters.
    pub fn parameter_count(&self) -> ParameterCount {
        let d = self.decoder.d_model;
        let token_embedding = self.vocab_size * d;
        let positions = match self.decoder.positions {
            PositionKind::Learned => self.decoder.context_length * d,
            PositionKind::Rotary => 0,
        };
        let head = if self.tie_embeddings {
            0
        } else {
            d * self.vocab_size
        };
        let (stack_total, stack_active) = self.decoder.stack_params();
        ParameterCount {
            total: token_embedding + head + stack_total,
            active: token_embedding + head + stack_active,
            embedding: token_embedding + positions + head,
        }
    }
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

    /// The model with every weight frozen and LoRA adapters (Hu et al. 2021) on the weights
    /// `config` targets: its attention projections, routers, experts
    /// ([`moe_core::lora::LoraTarget`]). Training then updates the adapters alone; Burn's
    /// `Module::materialize` merges them into the weights, and
    /// `into_record_group(moe_core::lora::adapter_group())` saves them on their own.
    ///
    /// ```
    /// use burn::module::Module;
    /// use moe_core::lora::{LoraConfig, LoraTarget};
    /// use moe_core::{ExpertConfig, MoeConfig};
    /// use moe_models::{DecoderConfig, MoeTransformerConfig};
    ///
    /// # #[allow(deprecated)]
    /// let device = burn::tensor::Device::ndarray().autodiff();
    /// let moe = MoeConfig::new(16, 4, ExpertConfig::new(32)).with_top_k(2);
    /// let decoder = DecoderConfig::new(8, 16, 2, 2, 32, moe).with_moe_every(1);
    /// let model = MoeTransformerConfig::new(50, decoder).init(&device)?;
    /// let lora = LoraConfig::new(4).with_targets(vec![LoraTarget::Attention, LoraTarget::Experts]);
    /// let model = model.with_lora(&lora)?;
    /// // Per block: query, key, value, output, and the experts' two weights.
    /// assert_eq!(moe_core::lora::adapter_count(&model), 2 * (4 + 2));
    /// let merged = model.materialize(); // for export: plain weights again
    /// # Ok::<(), moe_models::ModelError>(())
    /// ```
    pub fn with_lora(self, config: &moe_core::lora::LoraConfig) -> Result<Self, ModelError> {
        Ok(moe_core::lora::attach(self, config)?)
    }

    /// The model with every MoE layer routing with `gate`, a routing function of the user's
    /// own ([`moe_core::gate::Gate`]), instead of its config's gate. The gate is not saved with
    /// the weights: set it again after loading.
    pub fn with_gate(
        mut self,
        gate: std::sync::Arc<dyn moe_core::gate::Gate>,
    ) -> Result<Self, ModelError> {
        self.stack.set_gate(gate)?;
        Ok(self)
    }

    /// The type the loss (and the logits it reads) is computed in: the parameters' master
    /// type, f64 for an f64 model and f32 otherwise, also when the frozen weights are held
    /// in 16 bits or fewer (`hf::Storage`) or the activations are computed in 16 bits.
    pub fn loss_dtype(&self) -> DType {
        match self.token_embedding.weight.val().dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        }
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
        let out = self
            .stack
            .forward(x, cache, self.config.decoder.context_length);
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
        let logits = to_dtype(out.logits, self.loss_dtype());
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
/// [`moe_kernels::cross_entropy()`] over all positions, then the masked mean).
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
