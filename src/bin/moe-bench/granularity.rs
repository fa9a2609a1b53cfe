//! W6: what finer experts cost at equal active width, on any backend.
//!
//! Fine-grained MoE (DeepSeekMoE, OLMoE) splits each expert into `m` smaller ones and sends
//! each token to `m` times as many: the FLOPs stay those of the coarse layer, but the work
//! comes in `m` times as many, `m` times smaller products, and the routing, dispatch and
//! combine handle `m` times as many (token, expert) pairs. W6 times one forward + backward of
//! the layer at the `tiny` preset's step (1,024 tokens, `d_model` 128), dropless, for expert
//! shapes with `top_k x hidden = 512`, against the dense FFN of hidden 512 (the dense twin's
//! layer): the ratio is what granularity costs on this backend.

use burn::tensor::{Device, Distribution, Tensor};
use burn_moe::core::{Activation, ExpertConfig, ExpertKind, RoutingMode};
use serde::Serialize;

use crate::layer::{benchmark_layer, LayerRun};
use crate::timing::interleaved_median_seconds;

/// Tokens of one `tiny` step (16 sequences of 64).
pub const TOKENS: usize = 1024;
/// Token width of the `tiny` preset.
pub const D_MODEL: usize = 128;
/// Active hidden width per token: the dense twin's FFN.
pub const ACTIVE_HIDDEN: usize = 512;
/// `(experts, top_k)`: each expert's hidden size is `ACTIVE_HIDDEN / top_k`.
pub const SHAPES: [(usize, usize); 4] = [(4, 2), (16, 4), (32, 8), (64, 16)];

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct GranularityRow {
    /// Experts (1 for the dense FFN).
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Hidden size of one expert.
    pub hidden: usize,
    /// Median seconds of forward + backward.
    pub seconds: f64,
    /// `seconds` over the dense FFN's.
    pub over_dense: f64,
}

/// One forward + backward pass of the dense FFN or of an MoE layer.
fn pass(device: &Device, experts: usize, top_k: usize) -> LayerRun {
    let device = device.clone().autodiff();
    device.seed(6);
    let x = Tensor::<2>::random([TOKENS, D_MODEL], Distribution::Normal(0.0, 1.0), &device);
    if experts == 1 {
        let ffn = ExpertConfig::new(ACTIVE_HIDDEN)
            .with_kind(ExpertKind::Ffn(Activation::Gelu))
            .init(1, D_MODEL, &device);
        return Box::new(move || {
            let x = x.clone().detach().require_grad().unsqueeze_dim::<3>(0);
            let _ = ffn.forward(x).mean().backward();
        });
    }
    let moe = benchmark_layer(D_MODEL, ACTIVE_HIDDEN / top_k, experts, top_k, true)
        .init(&device)
        .expect("valid config");
    Box::new(move || {
        let x = x.clone().detach().require_grad();
        let out = moe.forward_with_mode(x, RoutingMode::Train);
        let _ = (out.output.mean() + out.aux_loss).backward();
    })
}

/// Times the dense FFN and every shape in interleaved rounds.
pub fn measure(device: &Device, warmup: usize, repeats: usize) -> Vec<GranularityRow> {
    let shapes: Vec<(usize, usize)> = std::iter::once((1, 1)).chain(SHAPES).collect();
    let mut runs: Vec<LayerRun> = shapes
        .iter()
        .map(|&(experts, top_k)| pass(device, experts, top_k))
        .collect();
    let seconds = interleaved_median_seconds(device, warmup, repeats, &mut runs);
    let dense = seconds[0];
    shapes
        .iter()
        .zip(seconds)
        .map(|(&(experts, top_k), seconds)| GranularityRow {
            experts,
            top_k,
            hidden: ACTIVE_HIDDEN / top_k,
            seconds,
            over_dense: seconds / dense,
        })
        .collect()
}
