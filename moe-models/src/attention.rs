//! Causal multi-head self-attention with an optional key/value cache.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{DType, Device, Tensor, TensorData};
use moe_kernels::{causal_softmax, multi_head_matmul, rotary, HeadLayout};

use crate::decoder::{DecoderConfig, PositionKind, RotaryPairing};
use crate::dropout::apply_dropout;
use crate::init::linear;
use crate::norm::Norm;
use crate::projection;

/// Keys and values of the positions seen so far, for one layer: `[batch, kv_heads,
/// positions, head_dim]` each.
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
///
/// With fewer key/value heads than query heads (grouped-query attention, Ainslie et al. 2023)
/// each key/value head serves `num_heads / num_kv_heads` consecutive query heads, and the cache
/// holds only the key/value heads. OLMoE's options: `Q = norm_q(x W_q)`, `K = norm_k(x W_k)`
/// (RMSNorm over the whole projection), and `Q`, `K`, `V` clamped to `[-c, c]`.
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    /// Query projection, `[d_model, num_heads * head_dim]`.
    pub query: Linear,
    /// Key projection, `[d_model, num_kv_heads * head_dim]`.
    pub key: Linear,
    /// Value projection, `[d_model, num_kv_heads * head_dim]`.
    pub value: Linear,
    /// Output projection.
    pub output: Linear,
    /// Norm of the query projection (OLMoE's `q_norm`).
    pub query_norm: Option<Norm>,
    /// Norm of the key projection (OLMoE's `k_norm`).
    pub key_norm: Option<Norm>,
    /// Dropout on the attention weights.
    pub dropout: Dropout,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (a divisor of `num_heads`).
    pub num_kv_heads: usize,
    /// Rotary positions, if the model uses them.
    #[module(skip)]
    rotary: Option<RotarySettings>,
    /// The clamp of the projections, if any.
    #[module(skip)]
    qkv_clip: Option<f64>,
}

/// Base and pairing of rotary positions.
#[derive(Debug, Clone, Copy)]
struct RotarySettings {
    theta: f64,
    pairing: RotaryPairing,
}

impl CausalSelfAttention {
    /// The attention of a block of `config`.
    pub fn init(config: &DecoderConfig, device: &Device) -> Self {
        let d_model = config.d_model;
        let kv_width = config.kv_heads() * config.head_dim();
        let norm = |width| config.norm.init(width, config.norm_epsilon, device);
        Self {
            query: linear(d_model, d_model, config.qkv_bias, device),
            key: linear(d_model, kv_width, config.qkv_bias, device),
            value: linear(d_model, kv_width, config.qkv_bias, device),
            output: linear(d_model, d_model, config.output_bias, device),
            query_norm: config.qk_norm.then(|| norm(d_model)),
            key_norm: config.qk_norm.then(|| norm(kv_width)),
            dropout: DropoutConfig::new(config.dropout).init(),
            num_heads: config.num_heads,
            num_kv_heads: config.kv_heads(),
            rotary: (config.positions == PositionKind::Rotary).then_some(RotarySettings {
                theta: config.rope_theta,
                pairing: config.rotary_pairing,
            }),
            qkv_clip: config.qkv_clip,
        }
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
        let split = |t: Tensor<3>, heads: usize| -> Tensor<4> {
            t.reshape([batch, length, heads, head_dim]).swap_dims(1, 2)
        };
        let mut query = projection::apply(&self.query, x.clone());
        let mut key = projection::apply(&self.key, x.clone());
        let mut value = projection::apply(&self.value, x);
        if let Some(norm) = &self.query_norm {
            query = norm.forward(query);
        }
        if let Some(norm) = &self.key_norm {
            key = norm.forward(key);
        }
        if let Some(clip) = self.qkv_clip {
            query = query.clamp(-clip, clip);
            key = key.clamp(-clip, clip);
            value = value.clamp(-clip, clip);
        }
        let mut value = split(value, self.num_kv_heads);
        if let Some(settings) = self.rotary {
            // Rotated before the heads are split, while the rows are still contiguous; one
            // head's tables serve every head of the queries and the keys.
            let (device, dtype) = (query.device(), query.dtype());
            let tables = rotation_tables(settings.theta, head_dim, start, length, &device, dtype);
            query = rotate(query, settings, &tables, heads, head_dim);
            key = rotate(key, settings, &tables, self.num_kv_heads, head_dim);
        }
        // Scaling the queries rather than the scores: the same product, on a tensor
        // `keys / head_dim` times smaller, and while its rows are contiguous.
        let query = split(query.div_scalar((head_dim as f64).sqrt()), heads);
        let mut key = split(key, self.num_kv_heads);
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
        let groups = heads / self.num_kv_heads;
        let (key, value) = (repeat_heads(key, groups), repeat_heads(value, groups));

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

/// `x: [batch, kv_heads, positions, head_dim]` with each head repeated `groups` times in
/// place, `[batch, kv_heads * groups, positions, head_dim]` (query head `j` reads key/value
/// head `j / groups`, as Hugging Face's `repeat_kv` orders them).
fn repeat_heads(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [batch, kv_heads, positions, head_dim] = x.dims();
    x.unsqueeze_dim::<5>(2).repeat_dim(2, groups).reshape([
        batch,
        kv_heads * groups,
        positions,
        head_dim,
    ])
}

/// Rotary positions on `x: [batch, length, heads * head_dim]` by one head's `(cos, sin)`
/// tables ([`rotation_tables`], in `x`'s dtype), each head rotated alike. The half-split
/// pairing is brought to the adjacent one by reordering each head's coordinates
/// `(x_0 .. x_{d/2-1}, x_{d/2} .. x_{d-1})` into `(x_0, x_{d/2}, x_1, ...)`; queries and keys
/// are reordered alike, so their dot products, and so attention, are those of the half-split
/// rotation.
fn rotate(
    x: Tensor<3>,
    settings: RotarySettings,
    (cos, sin): &(Tensor<2>, Tensor<2>),
    heads: usize,
    head_dim: usize,
) -> Tensor<3> {
    let [batch, length, width] = x.dims();
    let x = match settings.pairing {
        RotaryPairing::Adjacent => x,
        RotaryPairing::HalfSplit => x
            .reshape([batch, length, heads, 2, head_dim / 2])
            .swap_dims(3, 4)
            .reshape([batch, length, width]),
    };
    rotary(x, cos.clone(), sin.clone())
}

/// The cosines and sines of the rotary angles `θ_i p` at positions `p` in `start..start +
/// length`, with `θ_i = base^(-2i / head_dim)`, `[length, head_dim / 2]`: one head's angles,
/// which [`rotary`] applies to every head of a `[batch, length, heads * head_dim]` tensor whose
/// heads are not yet split. Computed in f32, as the reference implementations compute them,
/// on the host (the tables are small, `length x head_dim / 2`, and an upload launches no
/// kernel, where building them on the device took seven launches per layer on wgpu), then
/// cast once to `dtype`, the queries' and keys'.
fn rotation_tables(
    base: f64,
    head_dim: usize,
    start: usize,
    length: usize,
    device: &Device,
    dtype: DType,
) -> (Tensor<2>, Tensor<2>) {
    let pairs = head_dim / 2;
    let step = (-2.0 * base.ln() / head_dim as f64) as f32;
    let frequencies: Vec<f32> = (0..pairs).map(|i| (i as f32 * step).exp()).collect();
    let angles: Vec<f32> = (start..start + length)
        .flat_map(|p| frequencies.iter().map(move |f| p as f32 * f))
        .collect();
    let table = |values: Vec<f32>| {
        Tensor::<2>::from_data(TensorData::new(values, [length, pairs]), device).cast(dtype)
    };
    (
        table(angles.iter().map(|a| a.cos()).collect()),
        table(angles.iter().map(|a| a.sin()).collect()),
    )
}
