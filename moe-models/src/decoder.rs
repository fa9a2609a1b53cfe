//! The one config of the decoder stack both models share: its shape, which layers are MoE,
//! the attention and normalisation options, and the rules derived from them (the dense
//! equivalent, parameter counts).
//!
//! The options cover the Hugging Face MoE decoders as well as our own presets: grouped-query
//! attention (Ainslie et al. 2023), RMSNorm with a given epsilon, rotary positions with a given
//! base in either pairing, biases on the query/key/value projections only (Qwen2), RMSNorm of
//! the queries and keys and clipping of the projections (OLMoE), and dense layers listed by
//! index (Qwen2-MoE's `mlp_only_layers`).

use burn::config::Config;
use moe_core::lora::{LoraConfig, LoraTarget};
use moe_core::{DropPolicy, ExpertConfig, MoeConfig};

use crate::error::{check_nonzero, check_probability, ModelError};
use crate::norm::NormKind;

/// How the model knows where a token is.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum PositionKind {
    /// A learned vector per position, added to the token embedding (GPT-2).
    Learned,
    /// Rotary position embedding applied to queries and keys (RoFormer; LLaMA).
    Rotary,
}

/// Which coordinates of a head rotary positions rotate together.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum RotaryPairing {
    /// `(x[2i], x[2i + 1])`: RoFormer's and Burn's `RotaryEncoding` pairing.
    Adjacent,
    /// `(x[i], x[i + d/2])`: the `rotate_half` form of Hugging Face's LLaMA, Mixtral, Qwen2
    /// and OLMoE.
    HalfSplit,
}

/// Configuration of the decoder stack: the blocks (attention and a dense or MoE feed-forward
/// half, pre-norm), learned positions if used, and the final norm. Embedded by
/// [`crate::MoeTransformerConfig`] and [`crate::MultimodalMoeTransformerConfig`], which add
/// their embeddings and heads.
///
/// ```
/// use moe_core::{ExpertConfig, MoeConfig};
/// use moe_models::DecoderConfig;
///
/// let moe = MoeConfig::new(128, 8, ExpertConfig::new(256)).with_top_k(2);
/// let decoder = DecoderConfig::new(64, 128, 4, 4, 512, moe)
///     .with_moe_every(2)
///     .with_num_kv_heads(Some(2));
/// assert!(decoder.validate().is_ok());
/// assert_eq!(decoder.moe_layers(), vec![1, 3]);
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct DecoderConfig {
    /// Longest sequence the model sees.
    pub context_length: usize,
    /// Model width.
    pub d_model: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// Attention (query) heads per block.
    pub num_heads: usize,
    /// Hidden size of the dense FFN layers (same form as the experts).
    pub d_ff: usize,
    /// The MoE layer of the MoE blocks (`moe.d_model` must equal `d_model`).
    pub moe: MoeConfig,
    /// MoE FFN in every `moe_every`-th block (1: all, 2: every other); 0: a dense model.
    #[config(default = 1)]
    pub moe_every: usize,
    /// Blocks (from 0) that stay dense even where `moe_every` would make them MoE (Qwen2-MoE's
    /// `mlp_only_layers`).
    #[config(default = "Vec::new()")]
    pub dense_layers: Vec<usize>,
    /// Normalisation.
    #[config(default = "NormKind::RmsNorm")]
    pub norm: NormKind,
    /// The `eps` of every norm, added to the variance (or mean square) before the root.
    #[config(default = 1e-5)]
    pub norm_epsilon: f64,
    /// Position encoding.
    #[config(default = "PositionKind::Rotary")]
    pub positions: PositionKind,
    /// Base `b` of the rotary angles `θ_i = b^(-2i/d_head)`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Which coordinates rotary positions rotate together.
    #[config(default = "RotaryPairing::Adjacent")]
    pub rotary_pairing: RotaryPairing,
    /// Key/value heads, a divisor of `num_heads` (grouped-query attention: each key/value head
    /// serves `num_heads / num_kv_heads` query heads); `None` for one per query head.
    pub num_kv_heads: Option<usize>,
    /// Biases on the query, key and value projections.
    #[config(default = true)]
    pub qkv_bias: bool,
    /// A bias on the attention's output projection.
    #[config(default = true)]
    pub output_bias: bool,
    /// RMSNorm over the whole query and key projections before the heads are split (OLMoE).
    #[config(default = false)]
    pub qk_norm: bool,
    /// Clamp the query, key and value projections to `[-c, c]` (OLMoE's `clip_qkv`).
    pub qkv_clip: Option<f64>,
    /// Dropout probability (residual and attention).
    #[config(default = 0.0)]
    pub dropout: f64,
}

impl DecoderConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_nonzero("context_length", self.context_length)?;
        check_nonzero("d_model", self.d_model)?;
        check_nonzero("num_layers", self.num_layers)?;
        check_nonzero("num_heads", self.num_heads)?;
        check_nonzero("d_ff", self.d_ff)?;
        check_probability("dropout", self.dropout)?;
        check_positive("norm_epsilon", self.norm_epsilon)?;
        check_positive("rope_theta", self.rope_theta)?;
        if let Some(clip) = self.qkv_clip {
            check_positive("qkv_clip", clip)?;
        }
        if !self.d_model.is_multiple_of(self.num_heads) {
            return Err(ModelError::HeadsDoNotDivide {
                d_model: self.d_model,
                num_heads: self.num_heads,
            });
        }
        let kv_heads = self.kv_heads();
        if kv_heads == 0 || !self.num_heads.is_multiple_of(kv_heads) {
            return Err(ModelError::KvHeadsDoNotDivide {
                num_heads: self.num_heads,
                num_kv_heads: kv_heads,
            });
        }
        if self.positions == PositionKind::Rotary && !self.head_dim().is_multiple_of(2) {
            return Err(ModelError::OddHeadDim {
                head_dim: self.head_dim(),
            });
        }
        if let Some(&layer) = self.dense_layers.iter().find(|&&l| l >= self.num_layers) {
            return Err(ModelError::NoSuchLayer {
                field: "dense_layers",
                layer,
                num_layers: self.num_layers,
            });
        }
        if self.num_moe_layers() > 0 {
            self.validate_moe()?;
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<(), ModelError> {
        let moe = &self.moe;
        if moe.d_model != self.d_model {
            return Err(ModelError::MoeWidth {
                model: self.d_model,
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
        Ok(moe.validate()?)
    }

    /// Width of one attention head, `d_model / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.num_heads.max(1)
    }

    /// Key/value heads: `num_kv_heads`, or `num_heads`.
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }

    /// Whether block `index` (from 0) has an MoE feed-forward half: every `moe_every`-th block
    /// (`moe_every - 1`, `2 * moe_every - 1`, ...: every block for 1, every other for 2, as in
    /// GShard and Qwen2-MoE's `decoder_sparse_step`) that `dense_layers` does not list.
    pub fn is_moe_layer(&self, index: usize) -> bool {
        self.moe_every > 0
            && (index + 1).is_multiple_of(self.moe_every)
            && !self.dense_layers.contains(&index)
    }

    /// The MoE blocks, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_layers)
            .filter(|&i| self.is_moe_layer(i))
            .collect()
    }

    /// Number of MoE blocks.
    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers().len()
    }

    /// The FFN of the dense layers: the experts' form with `d_ff` hidden units.
    pub fn dense_ffn(&self) -> ExpertConfig {
        ExpertConfig::new(self.d_ff).with_kind(self.moe.expert.kind)
    }

    /// The dense baseline with the same active parameters: every block dense, with `d_ff` the
    /// MoE layer's active width ([`MoeConfig::active_width`]: `top_k * expert d_hidden` plus
    /// the shared experts). Its active parameter count is this model's minus the routers and,
    /// for FFN experts (which have biases), minus the experts' extra output biases (one wide
    /// FFN has one output bias where the `top_k` experts and the shared block have one each)
    /// -- provided this model's own dense layers already use that width, as the presets do;
    /// otherwise they change width too.
    pub fn dense_equivalent(&self) -> Self {
        let mut dense = self.clone().with_moe_every(0).with_dense_layers(Vec::new());
        dense.d_ff = self.moe.active_width();
        dense
    }

    /// Parameters of one block's attention: the four projections (with their biases) and the
    /// query/key norms.
    pub fn attention_params(&self) -> usize {
        let (d, kv) = (self.d_model, self.kv_heads() * self.head_dim());
        let weights = 2 * d * d + 2 * d * kv;
        let qkv_bias = if self.qkv_bias { d + 2 * kv } else { 0 };
        let output_bias = if self.output_bias { d } else { 0 };
        let qk_norm = if self.qk_norm { d + kv } else { 0 };
        weights + qkv_bias + output_bias + qk_norm
    }

    /// Parameters of the LoRA adapters `lora` attaches to the stack
    /// ([`moe_core::lora::LoraTarget`]): `r (d_in + d_out)` for each adapted weight, the four
    /// attention projections of every block, the routers and experts of the MoE blocks, the
    /// feed-forward weights of the dense blocks.
    pub fn lora_params(&self, lora: &LoraConfig) -> usize {
        let (d, r) = (self.d_model, lora.rank);
        let kv = self.kv_heads() * self.head_dim();
        let attention = if lora.targets.contains(&LoraTarget::Attention) {
            r * (2 * (d + d) + 2 * (d + kv))
        } else {
            0
        };
        let dense_ffn = if lora.targets.contains(&LoraTarget::Experts) {
            self.dense_ffn().lora_params_per_expert(d, r)
        } else {
            0
        };
        let moe_layers = self.num_moe_layers();
        self.num_layers * attention
            + moe_layers * self.moe.lora_params(lora)
            + (self.num_layers - moe_layers) * dense_ffn
    }

    /// Parameters of the stack: learned positions, every block, the final norm. The second
    /// number counts only what one token uses (its `top_k` experts in each MoE layer).
    pub fn stack_params(&self) -> (usize, usize) {
        let d = self.d_model;
        let norm = self.norm.num_params(d);
        let positions = match self.positions {
            PositionKind::Learned => self.context_length * d,
            PositionKind::Rotary => 0,
        };
        let moe_layers = self.num_moe_layers();
        let dense_layers = self.num_layers - moe_layers;
        let shared = positions
            + norm
            + self.num_layers * (2 * norm + self.attention_params())
            + dense_layers * self.dense_ffn().params_per_expert(d);
        (
            shared + moe_layers * self.moe.num_params(),
            shared + moe_layers * self.moe.num_active_params(),
        )
    }
}

/// Checks `value > 0` (and not NaN), naming the field.
fn check_positive(field: &'static str, value: f64) -> Result<(), ModelError> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(ModelError::OutOfRange {
            field,
            value,
            expected: "a finite number above 0",
        })
    }
}
