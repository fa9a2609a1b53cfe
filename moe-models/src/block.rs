//! A pre-norm transformer block and the stack of them, shared by both models.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Embedding};
use burn::tensor::{Device, Int, Tensor};
use moe_core::precision::to_dtype;
use moe_core::{ExpertConfig, Experts, Moe, MoeConfig, RoutingStats};

use crate::attention::{CausalSelfAttention, LayerCache};
use crate::dropout::apply_dropout;
use crate::error::ModelError;
use crate::init::embedding;
use crate::norm::{Norm, NormKind};

/// The feed-forward half of a block: a dense FFN or an MoE layer.
///
/// The dense FFN is stored as a one-expert [`Experts`] stack, so that it computes exactly what
/// an MoE layer with one expert computes and can be copied into experts when upcycling.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// The dense FFN (one expert), for dense layers.
    pub dense: Option<Experts>,
    /// The MoE layer, for MoE layers.
    pub moe: Option<Moe>,
}

/// What a block's feed-forward half returns besides its output.
pub struct FeedForwardExtras {
    /// The MoE layer's auxiliary loss, `[1]` (absent for dense layers).
    pub aux_loss: Option<Tensor<1>>,
    /// The MoE layer's routing statistics (absent for dense layers).
    pub stats: Option<RoutingStats>,
}

impl FeedForward {
    /// A dense FFN of the given form.
    pub fn dense(expert: &ExpertConfig, d_model: usize, device: &Device) -> Self {
        Self {
            dense: Some(expert.init(1, d_model, device)),
            moe: None,
        }
    }

    /// An MoE layer.
    pub fn moe(config: &MoeConfig, device: &Device) -> Result<Self, ModelError> {
        Ok(Self {
            dense: None,
            moe: Some(config.init(device)?),
        })
    }

    /// Applies the FFN to `x: [batch, length, d_model]`.
    pub fn forward(&self, x: Tensor<3>) -> (Tensor<3>, FeedForwardExtras) {
        match (&self.dense, &self.moe) {
            (_, Some(moe)) => {
                let out = moe.forward(x);
                let extras = FeedForwardExtras {
                    aux_loss: Some(out.aux_loss),
                    stats: Some(out.stats),
                };
                (out.output, extras)
            }
            (Some(dense), None) => {
                let [batch, length, d_model] = x.dims();
                let y = dense
                    .forward(x.reshape([1, batch * length, d_model]))
                    .reshape([batch, length, d_model]);
                let extras = FeedForwardExtras {
                    aux_loss: None,
                    stats: None,
                };
                (y, extras)
            }
            (None, None) => unreachable!("a feed-forward layer is built dense or MoE"),
        }
    }
}

/// Pre-norm residual block: `x + attn(norm(x))`, then `x + ffn(norm(x))` (GPT-2 / LLaMA order).
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub attention_norm: Norm,
    /// Causal self-attention.
    pub attention: CausalSelfAttention,
    /// Norm before the feed-forward half.
    pub ffn_norm: Norm,
    /// Dense FFN or MoE layer.
    pub ffn: FeedForward,
    /// Residual dropout.
    pub dropout: Dropout,
}

/// Settings shared by every block of a stack.
#[derive(Debug, Clone)]
pub struct StackSettings {
    /// Model width.
    pub d_model: usize,
    /// Layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Longest sequence (for rotary tables).
    pub context_length: usize,
    /// Rotary positions (otherwise the model adds learned positions itself).
    pub rotary: bool,
    /// Norm kind.
    pub norm: NormKind,
    /// Dropout probability.
    pub dropout: f64,
    /// The FFN of dense layers.
    pub dense_ffn: ExpertConfig,
    /// The MoE layer config.
    pub moe: MoeConfig,
    /// MoE in every `moe_every`-th layer (0: none).
    pub moe_every: usize,
}

impl StackSettings {
    /// Whether layer `index` (from 0) is an MoE layer: layers `moe_every - 1`,
    /// `2 * moe_every - 1`, ... (every layer for 1, every other layer for 2, as in GShard).
    pub fn is_moe_layer(&self, index: usize) -> bool {
        self.moe_every > 0 && (index + 1).is_multiple_of(self.moe_every)
    }

    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> usize {
        (0..self.num_layers)
            .filter(|&i| self.is_moe_layer(i))
            .count()
    }
}

/// The decoder both models share: learned positions (if used), the blocks, the final norm.
#[derive(Module, Debug)]
pub struct DecoderStack {
    /// Learned position embedding, `[context, d_model]` (learned positions only; rotary
    /// positions live in the attention layers).
    pub position_embedding: Option<Embedding>,
    /// The blocks, in order.
    pub blocks: Vec<Block>,
    /// Norm after the last block.
    pub final_norm: Norm,
}

/// Output of [`DecoderStack::forward`].
pub struct StackOutput {
    /// Final hidden states, `[batch, length, d_model]`.
    pub hidden: Tensor<3>,
    /// Sum of the MoE layers' auxiliary losses, `[1]`.
    pub aux_loss: Tensor<1>,
    /// Routing statistics of each MoE layer, in layer order.
    pub layer_stats: Vec<RoutingStats>,
}

/// Keys and values of every layer for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// One entry per layer.
    pub layers: Vec<Option<LayerCache>>,
    /// Positions cached so far.
    pub len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
}

impl DecoderStack {
    /// Builds the stack.
    pub fn init(settings: &StackSettings, device: &Device) -> Result<Self, ModelError> {
        let rotary = settings.rotary.then_some(settings.context_length);
        let blocks = (0..settings.num_layers)
            .map(|index| {
                let ffn = if settings.is_moe_layer(index) {
                    FeedForward::moe(&settings.moe, device)?
                } else {
                    FeedForward::dense(&settings.dense_ffn, settings.d_model, device)
                };
                Ok(Block {
                    attention_norm: settings.norm.init(settings.d_model, device),
                    attention: CausalSelfAttention::init(
                        settings.d_model,
                        settings.num_heads,
                        rotary,
                        settings.dropout,
                        device,
                    ),
                    ffn_norm: settings.norm.init(settings.d_model, device),
                    ffn,
                    dropout: DropoutConfig::new(settings.dropout).init(),
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            position_embedding: (!settings.rotary)
                .then(|| embedding(settings.context_length, settings.d_model, device)),
            blocks,
            final_norm: settings.norm.init(settings.d_model, device),
        })
    }

    /// Runs the decoder on the embedded sequence `x: [batch, length, d_model]`, which continues
    /// the positions held in `cache` (if any; the cache is extended).
    ///
    /// # Panics
    ///
    /// If the sequence would exceed `context_length` positions.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cache: Option<&mut KvCache>,
        context_length: usize,
    ) -> StackOutput {
        let [_, length, _] = x.dims();
        let device = x.device();
        let start = cache.as_ref().map_or(0, |cache| cache.len);
        assert!(
            start + length <= context_length,
            "{}",
            ModelError::TooLong {
                length: start + length,
                context_length
            }
        );
        let mut hidden = match &self.position_embedding {
            Some(positions) => {
                let index =
                    Tensor::<1, Int>::arange(start as i64..(start + length) as i64, &device)
                        .unsqueeze_dim::<2>(0);
                let positions = to_dtype(positions.forward(index), x.dtype());
                x + positions
            }
            None => x,
        };
        let mut aux_loss = Tensor::<1>::zeros([1], &device);
        let mut layer_stats = Vec::new();
        let (start, mut layer_caches) = match cache {
            Some(cache) => {
                cache.layers.resize(self.blocks.len(), None);
                (cache.len, Some(cache))
            }
            None => (0, None),
        };
        for (index, block) in self.blocks.iter().enumerate() {
            let layer_cache = layer_caches.as_mut().map(|cache| &mut cache.layers[index]);
            let attended = block.attention.forward(
                block.attention_norm.forward(hidden.clone()),
                start,
                layer_cache,
            );
            hidden = hidden + apply_dropout(&block.dropout, attended);
            let (ffn_out, extras) = block.ffn.forward(block.ffn_norm.forward(hidden.clone()));
            hidden = hidden + apply_dropout(&block.dropout, ffn_out);
            if let Some(loss) = extras.aux_loss {
                aux_loss = aux_loss + loss;
            }
            layer_stats.extend(extras.stats);
        }
        if let Some(cache) = layer_caches {
            cache.len += length;
        }
        StackOutput {
            hidden: self.final_norm.forward(hidden),
            aux_loss,
            layer_stats,
        }
    }
}
