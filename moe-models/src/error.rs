//! Typed errors of the model configs.

use moe_core::MoeError;
use thiserror::Error;

/// Why a model config was refused, or a model operation could not run.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ModelError {
    /// A size that must be at least one was zero.
    #[error("`{field}` must be at least 1, got 0")]
    Zero {
        /// Path of the field in the config.
        field: &'static str,
    },
    /// The attention heads do not split the model width evenly.
    #[error("`num_heads` ({num_heads}) must divide `d_model` ({d_model})")]
    HeadsDoNotDivide {
        /// Model width.
        d_model: usize,
        /// Number of heads.
        num_heads: usize,
    },
    /// The key/value heads do not split the query heads into equal groups.
    #[error(
        "`num_kv_heads` ({num_kv_heads}) must be at least 1 and divide `num_heads` ({num_heads})"
    )]
    KvHeadsDoNotDivide {
        /// Query heads.
        num_heads: usize,
        /// Key/value heads.
        num_kv_heads: usize,
    },
    /// A list of layers names a layer the model does not have.
    #[error("`{field}` lists layer {layer}, but the model has {num_layers} (numbered from 0)")]
    NoSuchLayer {
        /// Path of the field in the config.
        field: &'static str,
        /// The layer named.
        layer: usize,
        /// Layers of the model.
        num_layers: usize,
    },
    /// Rotary positions rotate pairs of coordinates, so a head needs an even width.
    #[error("rotary positions need an even head width, got d_model / num_heads = {head_dim}")]
    OddHeadDim {
        /// `d_model / num_heads`.
        head_dim: usize,
    },
    /// The MoE layer's width differs from the model's.
    #[error("`moe.d_model` ({moe}) must equal the model's `d_model` ({model})")]
    MoeWidth {
        /// The model's width.
        model: usize,
        /// The MoE config's width.
        moe: usize,
    },
    /// A decoder (causal) model was given routing that lets later tokens affect earlier ones.
    #[error("{what} is not causal, so a decoder-only model cannot use it: {why}")]
    NotCausal {
        /// The offending setting.
        what: &'static str,
        /// Why it breaks causality.
        why: &'static str,
    },
    /// A real-valued field is outside its range.
    #[error("`{field}` must be {expected}, got {value}")]
    OutOfRange {
        /// Path of the field in the config.
        field: &'static str,
        /// The value found.
        value: f64,
        /// The allowed range, in words.
        expected: &'static str,
    },
    /// The image cannot be cut into whole patches.
    #[error("`patch_size` ({patch_size}) must divide `image_size` ({image_size})")]
    PatchDoesNotDivide {
        /// Side of the (square) image.
        image_size: usize,
        /// Side of a patch.
        patch_size: usize,
    },
    /// A sequence is longer than the model's context.
    #[error("a sequence of {length} positions does not fit the context of {context_length}")]
    TooLong {
        /// Positions asked for.
        length: usize,
        /// The model's context length.
        context_length: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        /// The token id.
        token: usize,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// Upcycling needs a dense model and experts shaped like its FFN.
    #[error("cannot upcycle: {0}")]
    Upcycle(String),
    /// The MoE layer config is invalid.
    #[error("invalid MoE layer config: {0}")]
    Moe(#[from] MoeError),
}

pub(crate) fn check_nonzero(field: &'static str, value: usize) -> Result<(), ModelError> {
    if value == 0 {
        Err(ModelError::Zero { field })
    } else {
        Ok(())
    }
}

pub(crate) fn check_probability(field: &'static str, value: f64) -> Result<(), ModelError> {
    if value.is_finite() && (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(ModelError::OutOfRange {
            field,
            value,
            expected: "in [0, 1)",
        })
    }
}
