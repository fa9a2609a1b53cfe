//! W5: how the MoE layer's cost grows with the tokens and with the experts, on any backend.
//!
//! The layer (top-2, softmax gate, GELU experts, untrained router) runs forward + backward at
//! `T`, `4T` and `16T` tokens with 4, 16 and 64 experts, dropless and with capacity factor
//! 1.25, at `d_model` 128 and expert hidden 256: narrow enough that moving the experts'
//! weights is not what bounds the time, so what grows faster than the work shows. At equal
//! tokens and top-k every expert count does the same FLOPs. Targets: each 4x in tokens costs
//! at most 4.5x the time, and 64 experts at most 1.3x the time of 4.

use burn::tensor::{Device, Distribution, Tensor};
use burn_moe::bench::{round, Capacity};
use burn_moe::core::RoutingMode;
use serde::Serialize;

use crate::layer::{benchmark_layer, LayerRun};
use crate::timing::interleaved_median_seconds;

/// Token width.
pub const D_MODEL: usize = 128;
/// Hidden size of one expert.
pub const D_HIDDEN: usize = 256;
/// Experts per token.
pub const TOP_K: usize = 2;
/// The expert counts compared.
pub const EXPERTS: [usize; 3] = [4, 16, 64];
/// The token counts, as multiples of the smallest.
pub const TOKEN_FACTORS: [usize; 3] = [1, 4, 16];

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    /// Dropless or capacity factor 1.25.
    pub capacity: Capacity,
    /// Experts.
    pub experts: usize,
    /// Tokens in the pass.
    pub tokens: usize,
    /// Median seconds of forward + backward.
    pub seconds: f64,
}

/// One forward + backward pass of the layer on `tokens` random tokens.
fn pass(device: &Device, experts: usize, dropless: bool, tokens: usize) -> LayerRun {
    let device = device.clone().autodiff();
    device.seed(5);
    let moe = benchmark_layer(D_MODEL, D_HIDDEN, experts, TOP_K, dropless)
        .init(&device)
        .expect("valid config");
    let x = Tensor::<2>::random([tokens, D_MODEL], Distribution::Normal(0.0, 1.0), &device);
    Box::new(move || {
        let x = x.clone().detach().require_grad();
        let out = moe.forward_with_mode(x, RoutingMode::Train);
        let _ = (out.output.mean() + out.aux_loss).backward();
    })
}

/// Times every configuration in interleaved rounds (so that all ratios compare runs of the
/// same minutes), with `base_tokens` as `T`.
pub fn measure(
    device: &Device,
    base_tokens: usize,
    warmup: usize,
    repeats: usize,
) -> Vec<ScalingRow> {
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for capacity in Capacity::LIMITS {
        let dropless = capacity == Capacity::Dropless;
        for experts in EXPERTS {
            for factor in TOKEN_FACTORS {
                let tokens = base_tokens * factor;
                rows.push(ScalingRow {
                    capacity,
                    experts,
                    tokens,
                    seconds: 0.0,
                });
                runs.push(pass(device, experts, dropless, tokens));
            }
        }
    }
    let seconds = interleaved_median_seconds(device, warmup, repeats, &mut runs);
    for (row, seconds) in rows.iter_mut().zip(seconds) {
        row.seconds = seconds;
    }
    rows
}

/// The seconds of the row with these settings.
fn seconds(rows: &[ScalingRow], capacity: Capacity, experts: usize, tokens: usize) -> Option<f64> {
    rows.iter()
        .find(|r| r.capacity == capacity && r.experts == experts && r.tokens == tokens)
        .map(|r| r.seconds)
}

/// The ratios the targets are about: time per 4x tokens (`tokens_4x`, at each expert count),
/// and time at 64 experts over 4 (`experts_64_over_4`, at each token count).
pub fn ratios(rows: &[ScalingRow], base_tokens: usize) -> serde_json::Value {
    let mut tokens_4x = serde_json::Map::new();
    let mut experts_64_over_4 = serde_json::Map::new();
    for capacity in Capacity::LIMITS {
        for experts in EXPERTS {
            for pair in TOKEN_FACTORS.windows(2) {
                let (small, large) = (base_tokens * pair[0], base_tokens * pair[1]);
                if let (Some(a), Some(b)) = (
                    seconds(rows, capacity, experts, small),
                    seconds(rows, capacity, experts, large),
                ) {
                    tokens_4x.insert(
                        format!("{capacity} E{experts} {small}->{large}"),
                        serde_json::json!(round(b / a)),
                    );
                }
            }
        }
        for factor in TOKEN_FACTORS {
            let tokens = base_tokens * factor;
            if let (Some(four), Some(many)) = (
                seconds(rows, capacity, 4, tokens),
                seconds(rows, capacity, 64, tokens),
            ) {
                experts_64_over_4.insert(
                    format!("{capacity} {tokens} tokens"),
                    serde_json::json!(round(many / four)),
                );
            }
        }
    }
    serde_json::json!({
        "tokens_4x_time_ratio": tokens_4x,
        "experts_64_over_4_time_ratio": experts_64_over_4,
    })
}
