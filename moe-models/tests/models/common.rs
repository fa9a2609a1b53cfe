//! Shared helpers.
#![allow(dead_code)]

use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::{CapacityConfig, ExpertConfig, GateConfig, MoeConfig};
use moe_models::{DecoderConfig, MoeTransformerConfig, NormKind, PositionKind};

#[allow(deprecated)]
pub fn cpu() -> Device {
    Device::ndarray()
}

pub const VOCAB: usize = 23;

/// A tiny MoE text model: 2 layers, 4 experts, top-2.
pub fn tiny(positions: PositionKind, capacity: CapacityConfig) -> MoeTransformerConfig {
    let moe = MoeConfig::new(16, 4, ExpertConfig::new(24))
        .with_top_k(2)
        .with_gate(GateConfig::softmax_top_k())
        .with_capacity(capacity);
    let decoder = DecoderConfig::new(12, 16, 2, 4, 48, moe)
        .with_positions(positions)
        .with_norm(NormKind::LayerNorm);
    MoeTransformerConfig::new(VOCAB, decoder)
}

/// `config` with MoE in every `moe_every`-th block.
pub fn with_moe_every(mut config: MoeTransformerConfig, moe_every: usize) -> MoeTransformerConfig {
    config.decoder.moe_every = moe_every;
    config
}

pub fn tokens(ids: &[usize], batch: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [batch, ids.len() / batch]), device)
}

pub fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    moe_core::reference::host(tensor)
}

pub fn random_ids(len: usize, vocab: usize, seed: u64) -> Vec<usize> {
    let mut rng = moe_core::rng::SplitMix64(seed);
    (0..len).map(|_| rng.below(vocab)).collect()
}
