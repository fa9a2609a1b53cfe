//! A pre-norm transformer block and the stack of them, shared by both models.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Embedding};
use burn::tensor::{Device, Int, Tensor};
use std::sync::Arc;

use moe_core::gate::Gate;
use moe_core::placement::{ExpertPlacement, ShardedParam};
use moe_core::precision::to_dtype;
use moe_core::{ExpertConfig, Experts, Moe, MoeConfig, RoutingStats};

use crate::decoder::{DecoderConfig, PositionKind};

use crate::attention::{CausalSelfAttention, LayerCache};
use crate::dropout::apply_dropout;
use crate::error::ModelError;
use crate::init::embedding;
use crate::norm::Norm;

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
    /// Builds the stack of `config` (validated by the caller).
    pub fn init(config: &DecoderConfig, device: &Device) -> Result<Self, ModelError> {
        let norm = || {
            config
                .norm
                .init(config.d_model, config.norm_epsilon, device)
        };
        let blocks = (0..config.num_layers)
            .map(|index| {
                let ffn = if config.is_moe_layer(index) {
                    FeedForward::moe(&config.moe, device)?
                } else {
                    FeedForward::dense(&config.dense_ffn(), config.d_model, device)
                };
                Ok(Block {
                    attention_norm: norm(),
                    attention: CausalSelfAttention::init(config, device),
                    ffn_norm: norm(),
                    ffn,
                    dropout: DropoutConfig::new(config.dropout).init(),
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            position_embedding: (config.positions == PositionKind::Learned)
                .then(|| embedding(config.context_length, config.d_model, device)),
            blocks,
            final_norm: norm(),
        })
    }

    /// Every MoE layer routing with `gate`, a routing function of the user's own (see
    /// [`moe_core::gate::Gate`]); refused when the gate says it is not causal, which a decoder
    /// cannot use.
    pub fn set_gate(&mut self, gate: Arc<dyn Gate>) -> Result<(), ModelError> {
        if !gate.is_causal() {
            return Err(ModelError::NotCausal {
                what: "the given gate",
                why: "it says a token's routing depends on other tokens, so a later token could change an earlier output",
            });
        }
        for block in &mut self.blocks {
            if let Some(moe) = block.ffn.moe.take() {
                block.ffn.moe = Some(moe.with_gate(gate.clone()));
            }
        }
        Ok(())
    }

    /// Every MoE layer's experts spread evenly over `devices` (expert parallelism,
    /// [`moe_core::placement`]).
    pub fn place_experts(&mut self, devices: &[Device]) -> Result<(), ModelError> {
        for block in &mut self.blocks {
            if let Some(moe) = block.ffn.moe.take() {
                let placement = ExpertPlacement::even(moe.config().num_experts, devices.to_vec())?;
                block.ffn.moe = Some(moe.with_placement(placement)?);
            }
        }
        Ok(())
    }

    /// Every MoE layer's experts back in one stack on its own device ([`Moe::gathered`]).
    pub fn gather_experts(&mut self) {
        for block in &mut self.blocks {
            block.ffn.moe = block.ffn.moe.take().map(Moe::gathered);
        }
    }

    /// Each MoE layer taken out of its block (`None` for dense blocks), for
    /// [`DecoderStack::put_moe_layers`].
    pub fn take_moe_layers(&mut self) -> Vec<Option<Moe>> {
        self.blocks
            .iter_mut()
            .map(|block| block.ffn.moe.take())
            .collect()
    }

    /// The MoE layers [`DecoderStack::take_moe_layers`] took, back in their blocks as
    /// data-parallel replicas on `device` ([`Moe::replica_on`]).
    pub fn put_moe_layers(&mut self, layers: Vec<Option<Moe>>, device: &Device) {
        for (block, layer) in self.blocks.iter_mut().zip(layers) {
            block.ffn.moe = layer.map(|moe| moe.replica_on(device));
        }
    }

    /// The MoE layers [`DecoderStack::take_moe_layers`] took, back in their blocks as
    /// data-parallel replicas on `device` with weights of their own
    /// ([`Moe::replica_with_own_weights_on`]).
    pub fn put_moe_layers_with_own_weights(&mut self, layers: Vec<Option<Moe>>, device: &Device) {
        for (block, layer) in self.blocks.iter_mut().zip(layers) {
            block.ffn.moe = layer.map(|moe| moe.replica_with_own_weights_on(device));
        }
    }

    /// Takes `from`'s placed experts in each MoE layer ([`Moe::share_placed_experts`]).
    pub fn share_placed_experts(&mut self, from: &DecoderStack) {
        for (mine, theirs) in self.blocks.iter_mut().zip(&from.blocks) {
            if let (Some(mine), Some(theirs)) = (&mut mine.ffn.moe, &theirs.ffn.moe) {
                mine.share_placed_experts(theirs);
            }
        }
    }

    /// Every placed parameter of the stack's MoE layers ([`Moe::sharded_params`]).
    pub fn sharded_params(&self) -> Vec<ShardedParam> {
        self.blocks
            .iter()
            .filter_map(|block| block.ffn.moe.as_ref())
            .flat_map(Moe::sharded_params)
            .collect()
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
