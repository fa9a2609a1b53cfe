//! Causal multi-head self-attention with an optional key/value cache.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, RotaryEncoding, RotaryEncodingConfig};
use burn::tensor::{Device, Int, Tensor};
use moe_kernels::{causal_softmax, multi_head_matmul, rotary, HeadLayout};

use crate::dropout::apply_dropout;
use crate::init::linear;
use crate::projection;

/// Keys and values of the positions seen so far, for one layer: `[batch, heads, positions,
/// head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// Cached keys.
    pub key: Tensor<4>,
    /// Cached values.
    pub value: Tensor<4>,
}

/// Causal multi-head self-attention (Vaswani et al. 2017), with rotary positions (Su et al.,
/// "RoFormer", 2021) when enabled:
///
/// `softmax(Q K^T / sqrt(d_head) + causal_mask) V`, heads concatenated, then `W_o`.
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Output projection.
    pub output: Linear,
    /// Rotary position encoding, if the model uses rotary positions.
    pub rotary: Option<RotaryEncoding>,
    /// Dropout on the attention weights.
    pub dropout: Dropout,
    /// Number of heads.
    pub num_heads: usize,
}

impl CausalSelfAttention {
    /// Attention over `d_model` with `num_heads` heads; `rotary_positions` is the longest
    /// sequence to precompute rotations for, or `None` for no rotary encoding.
    pub fn init(
        d_model: usize,
        num_heads: usize,
        rotary_positions: Option<usize>,
        dropout: f64,
        device: &Device,
    ) -> Self {
        let head_dim = d_model / num_heads;
        Self {
            query: linear(d_model, d_model, true, device),
            key: linear(d_model, d_model, true, device),
            value: linear(d_model, d_model, true, device),
            output: linear(d_model, d_model, true, device),
            rotary: rotary_positions
                .map(|positions| RotaryEncodingConfig::new(positions, head_dim).init(device)),
            dropout: DropoutConfig::new(dropout).init(),
            num_heads,
        }
    }

    /// Parameters of the attention of a `d_model`-wide model.
    pub fn num_params(d_model: usize) -> usize {
        4 * (d_model * d_model + d_model)
    }

    /// Attends `x: [batch, length, d_model]` whose first position is position `start` of the
    /// sequence. With a cache, the new keys and values are appended to it and the queries also
    /// see every cached position.
    pub fn forward(
        &self,
        x: Tensor<3>,
        start: usize,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Tensor<3> {
        let [batch, length, d_model] = x.dims();
        let heads = self.num_heads;
        let head_dim = d_model / heads;
        let split = |t: Tensor<3>| -> Tensor<4> {
            t.reshape([batch, length, heads, head_dim]).swap_dims(1, 2)
        };
        let mut query = projection::apply(&self.query, x.clone());
        let mut key = projection::apply(&self.key, x.clone());
        let mut value = split(projection::apply(&self.value, x));
        if let Some(encoding) = &self.rotary {
            // Rotated before the heads are split, while the rows are still contiguous.
            let (cos, sin) = rotation_tables(encoding, start, length, heads);
            let (cos, sin) = (cos.cast(query.dtype()), sin.cast(query.dtype()));
            query = rotary(query, cos.clone(), sin.clone());
            key = rotary(key, cos, sin);
        }
        // Scaling the queries rather than the scores: the same product, on a tensor
        // `keys / head_dim` times smaller, and while its rows are contiguous.
        let query = split(query.div_scalar((head_dim as f64).sqrt()));
        let mut key = split(key);
        if let Some(cache) = cache {
            if let Some(past) = cache.take() {
                key = Tensor::cat(vec![past.key, key], 2);
                value = Tensor::cat(vec![past.value, value], 2);
            }
            *cache = Some(LayerCache {
                key: key.clone(),
                value: value.clone(),
            });
        }

        // The heads stay views of the `[batch, length, d_model]` projections: the products read
        // them through their strides, the context comes out with each position's heads side
        // by side, and (on flex) nothing is copied to split or merge the heads.
        let scores = multi_head_matmul(query, key.swap_dims(2, 3), HeadLayout::Separate);
        // Query `i` is position `start + i` and sees the keys up to it.
        let weights = causal_softmax(scores, start);
        let weights = apply_dropout(&self.dropout, weights);
        let context = multi_head_matmul(weights, value, HeadLayout::Merged)
            .swap_dims(1, 2)
            .reshape([batch, length, d_model]);
        projection::apply(&self.output, context)
    }
}

/// The cosines and sines of the rotary angles `θ_i p` at positions `p` in `start..start +
/// length`, `[length, heads * head_dim / 2]`: the `head_dim / 2` angles of one head repeated for
/// every head, so that they rotate a `[batch, length, d_model]` tensor whose heads are not yet
/// split.
fn rotation_tables(
    encoding: &RotaryEncoding,
    start: usize,
    length: usize,
    heads: usize,
) -> (Tensor<2>, Tensor<2>) {
    let device = encoding.theta.device();
    let positions = Tensor::<1, Int>::arange(start as i64..(start + length) as i64, &device)
        .float()
        .unsqueeze_dim::<2>(1);
    let angles = positions * encoding.theta.clone().unsqueeze_dim::<2>(0);
    (
        angles.clone().cos().repeat_dim(1, heads),
        angles.sin().repeat_dim(1, heads),
    )
}
