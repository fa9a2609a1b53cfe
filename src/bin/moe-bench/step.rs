//! W2: one training step of the `tiny` and `small` presets (tokens/s), and the peak memory of
//! a process doing nothing else, against an estimate made by hand.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor};
pub use burn_moe::bench::StepRow;
use burn_moe::models::MoeTransformerConfig;
use burn_moe::train::config::{Preset, TrainConfig};
use burn_moe::train::runtime::memory::kib_field;
use burn_moe::train::training::optimizer::FusedAdamW;

use crate::timing::median_seconds;

/// Vocabulary used for the presets (about what the tiny preset's corpus gives).
pub const VOCAB: usize = 4500;

/// The preset's text-model config.
pub fn preset_config(preset: Preset) -> (TrainConfig, MoeTransformerConfig) {
    let train = preset.config();
    let model = train.text_model_config(VOCAB);
    (train, model)
}

/// Bytes a training step needs, by hand:
///
/// - parameters, gradients and AdamW's two moments: `4 * 4 * P` bytes (f32);
/// - activations kept for the backward pass, per layer, for `N = batch * context` tokens:
///   attention keeps the normed input, q, k, v, the rotated q and k, the scores and the
///   softmax (`2 * heads * N * T`), the context and the output: about `10 * N * d + 2 * H * N * T`
///   floats; a dense FFN keeps its input, the hidden pre- and post-activation and the output:
///   `2 * N * d + 2 * N * d_ff`; an MoE layer keeps the dispatched buffer, hidden pre/post and
///   the expert output for its rows (`N * top_k` dropless, `E * C` with a capacity limit:
///   `2 * rows * (d + h)`) plus the router's `[N, E]`
///   tensors (about 8 of them) and its input/output `2 * N * d`;
/// - the logits and their gradient: `2 * N * V` (the fused cross-entropy keeps no
///   log-probabilities).
pub fn estimate_bytes(train: &TrainConfig, model: &MoeTransformerConfig) -> u64 {
    let parameters = model.parameter_count().total as u64;
    let vocab_size = model.vocab_size as u64;
    let model = &model.decoder;
    let n = (train.optim.batch_size * model.context_length) as u64;
    let t = model.context_length as u64;
    let d = model.d_model as u64;
    let heads = model.num_heads as u64;
    let attention = 10 * n * d + 2 * heads * n * t;
    let dense = 2 * n * d + 2 * n * model.d_ff as u64;
    let moe = &model.moe;
    let e = moe.num_experts as u64;
    let capacity = moe.capacity.capacity(
        n as usize,
        moe.num_experts,
        moe.top_k,
        burn_moe::core::RoutingMode::Train,
    ) as u64;
    let h = moe.expert.d_hidden as u64;
    // The ragged expert buffer: the routed rows when dropless, E x C rows otherwise.
    let rows = if moe.capacity.dropless {
        n * moe.top_k as u64
    } else {
        e * capacity
    };
    let moe_layer = 2 * rows * (d + h) + 8 * n * e + 2 * n * d;
    let moe_layers = model.num_moe_layers() as u64;
    let layers = model.num_layers as u64;
    let activations = layers * attention
        + (layers - moe_layers) * dense
        + moe_layers * moe_layer
        + 2 * n * vocab_size;
    4 * (4 * parameters + activations)
}

/// A random batch of token ids.
fn batch(
    train: &TrainConfig,
    model: &MoeTransformerConfig,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [train.optim.batch_size, model.decoder.context_length];
    let ids = Tensor::<2>::random(shape, Distribution::Uniform(0.0, VOCAB as f64), device).int();
    let targets =
        Tensor::<2>::random(shape, Distribution::Uniform(0.0, VOCAB as f64), device).int();
    (ids, targets)
}

/// W2 for `preset` on `device`: median step time, and with `observe` (wgpu, with the host
/// read counter installed) the kernel launches and host reads of one more step.
pub fn step_row(
    device: &Device,
    preset: Preset,
    name: &str,
    warmup: usize,
    repeats: usize,
    observe: bool,
) -> StepRow {
    let device = device.clone().autodiff();
    device.seed(3);
    let (train, config) = preset_config(preset);
    let mut model = Some(config.init(&device).expect("valid preset"));
    let mut optimizer = FusedAdamW::new(0.1).init();
    let (ids, targets) = batch(&train, &config, &device);
    let mask = targets.clone().greater_equal_elem(0);
    let mut step = || {
        let current = model.take().expect("model");
        let out = current.loss(ids.clone(), targets.clone(), mask.clone());
        let grads = GradientsParams::from_grads(out.loss.backward(), &current);
        model = Some(optimizer.step(1e-3, current, grads));
    };
    let seconds = median_seconds(&device, warmup, repeats, &mut step);
    let (launches_per_step, host_reads_per_step) = if observe {
        let (launches, reads) = observe_step(&device, &mut step);
        (Some(launches), Some(reads))
    } else {
        (None, None)
    };
    let count = config.parameter_count();
    let tokens = train.optim.batch_size * config.decoder.context_length;
    let _ = model.map(|m| m.num_params());
    StepRow {
        preset: name.into(),
        parameters: count.total,
        active_parameters: count.active,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        peak_rss: None,
        baseline_rss: None,
        estimated_bytes: estimate_bytes(&train, &config),
        launches_per_step,
        host_reads_per_step,
    }
}

/// The kernel launches and host reads of one more `step` (ended by a device sync), on wgpu
/// with the read counter installed ([`burn_moe::kernels::launches`]).
#[cfg(feature = "wgpu")]
fn observe_step(device: &Device, step: &mut impl FnMut()) -> (usize, usize) {
    use burn_moe::kernels::launches::{count_launches, host_reads};
    let before = host_reads();
    let ((), launches) = count_launches(|| {
        step();
        device.sync().expect("device sync");
    });
    (launches.total(), host_reads() - before)
}

#[cfg(not(feature = "wgpu"))]
fn observe_step(_device: &Device, _step: &mut impl FnMut()) -> (usize, usize) {
    unreachable!("launches are counted on wgpu only")
}

/// `VmHWM` (peak resident set) and `VmRSS` of this process, bytes (Linux).
pub fn memory_status() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    // Whole kibibytes: exact as f64.
    let field = |name: &str| kib_field(&status, name).map(|bytes| bytes as u64);
    Some((field("VmHWM:")?, field("VmRSS:")?))
}
