//! How much memory a training run needs, estimated before anything is allocated.
//!
//! A model with a million experts or a batch of a million sequences does not fail politely
//! once allocation starts: the allocator aborts the process. So the trainer estimates what a
//! run holds at its peak and refuses, with the figures, a run that cannot fit in the memory
//! the machine has available. The estimate counts, in f32:
//!
//! - per parameter: the weight, its gradient, AdamW's two moments and the update's temporary
//!   (`5 P`), plus the accumulated gradient with gradient accumulation (`6 P`); under LoRA the
//!   frozen weights once, in the format they are held in (`train --weights`), and that for the
//!   adapters' parameters;
//! - per block, what the backward pass keeps for `N = batch x context` tokens: about `8 N d`
//!   around attention, the attention scores and probabilities (`2 B h T^2`), and the feed-forward
//!   activations (`2 N d_ff`, or `N k (2 h_e + 2 d)` plus the gate's `2 N E` in an MoE block);
//! - the logits, their softmax and its gradient (`3 N V`).
//!
//! It is an estimate (within a factor of about two of what the CPU backends peak at), meant to
//! catch the runs that are off by orders of magnitude. The GPU's own memory is not known to
//! burn-moe: on wgpu the check compares with the host's memory, a bound that catches the
//! absurd but not every run too big for a small GPU.

use moe_models::MoeTransformerConfig;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::runtime::backend::{AdapterLimits, BackendChoice};

/// What a training run is estimated to need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Parameters of the model.
    pub parameters: f64,
    /// Bytes of weights, gradients and optimizer state.
    pub state_bytes: f64,
    /// Bytes of activations kept for the backward pass of one micro-batch.
    pub activation_bytes: f64,
}

impl Estimate {
    /// Everything together.
    pub fn total_bytes(&self) -> f64 {
        self.state_bytes + self.activation_bytes
    }
}

/// Estimates the peak memory of training `model` as `config` says.
pub fn estimate(config: &TrainConfig, model: &MoeTransformerConfig) -> Estimate {
    const F32: f64 = 4.0;
    let parameters = model.parameter_count().total as f64;
    let copies = if config.optim.grad_accum > 1 {
        6.0
    } else {
        5.0
    };
    // The model's own shape (a Hugging Face model's, under `--init-hf`), the run's context.
    let s = &model.decoder;
    let batch = config.optim.batch_size as f64;
    let context = config.model.context_length as f64;
    let tokens = batch * context;
    let d = s.d_model as f64;
    let attention = 8.0 * tokens * d + 2.0 * batch * s.num_heads as f64 * context * context;
    let dense_ffn = 2.0 * tokens * s.d_ff as f64;
    let moe_ffn = tokens * s.moe.top_k as f64 * (2.0 * s.moe.expert.d_hidden as f64 + 2.0 * d)
        + 2.0 * tokens * s.moe.num_experts as f64;
    let moe_layers = model.num_moe_layers() as f64;
    let dense_layers = s.num_layers as f64 - moe_layers;
    let blocks = s.num_layers as f64 * attention + dense_layers * dense_ffn + moe_layers * moe_ffn;
    let logits = 3.0 * tokens * model.vocab_size as f64;
    // LoRA trains the adapters alone: the frozen weights are held once, in their format.
    let state_bytes = match (&config.variant.lora, &config.variant.hf) {
        (Some(lora), hf) => {
            let held = hf
                .as_ref()
                .map_or(crate::cli::HeldWeights::F32, |hf| hf.weights);
            let frozen = moe_models::storage::Storage::from(held).bytes_per_weight();
            parameters * frozen + copies * model.decoder.lora_params(lora) as f64 * F32
        }
        (None, _) => copies * parameters * F32,
    };
    Estimate {
        parameters,
        state_bytes,
        activation_bytes: (blocks + logits) * F32,
    }
}

/// Memory this process can still take (Linux), and what sets it: the least of the machine's
/// `MemAvailable`, the room left under its cgroup's limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`, less what the group uses) and under its address-space limit
/// (`ulimit -v`, less the process's size now). `None` where none is known.
pub fn available() -> Option<(f64, &'static str)> {
    [
        machine_available().map(|bytes| (bytes, "on this machine")),
        cgroup_room().map(|bytes| (bytes, "under this process's cgroup memory limit")),
        address_space_room().map(|bytes| {
            (
                bytes,
                "under this process's address-space limit (`ulimit -v`)",
            )
        }),
    ]
    .into_iter()
    .flatten()
    .min_by(|a, b| a.0.total_cmp(&b.0))
}

/// `MemAvailable` from `/proc/meminfo`, bytes.
fn machine_available() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&info, "MemAvailable:")
}

/// The value of a `Name:  123 kB` line of a `/proc` file (`/proc/meminfo`,
/// `/proc/self/status`), bytes.
pub fn kib_field(text: &str, name: &str) -> Option<f64> {
    let line = text.lines().find(|line| line.starts_with(name))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// A number of bytes from a cgroup file; `None` for `max` or a limit so large it means none.
fn cgroup_bytes(path: &std::path::Path) -> Option<f64> {
    let value: f64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    (value < 1e18).then_some(value)
}

/// Room left under this process's cgroup memory limit, bytes (cgroup v2, then v1).
fn cgroup_room() -> Option<f64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = std::path::Path::new("/sys/fs/cgroup");
    for line in groups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, group) = (fields.next()?, fields.next()?, fields.next()?);
        let group = group.trim_start_matches('/');
        let (folder, limit, usage) = match controllers {
            "" => (root.join(group), "memory.max", "memory.current"),
            "memory" => (
                root.join("memory").join(group),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ),
            _ => continue,
        };
        if let Some(limit) = cgroup_bytes(&folder.join(limit)) {
            let used = cgroup_bytes(&folder.join(usage)).unwrap_or(0.0);
            return Some((limit - used).max(0.0));
        }
    }
    None
}

/// Room left under this process's address-space limit (`ulimit -v`), bytes.
fn address_space_room() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max address space"))?;
    let limit: f64 = line.split_whitespace().nth(3)?.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let size = kib_field(&status, "VmSize:").unwrap_or(0.0);
    Some((limit - size).max(0.0))
}

/// Refuses a run estimated to need more memory than is available, naming both figures and
/// the limit that sets the second.
pub fn check(
    config: &TrainConfig,
    model: &MoeTransformerConfig,
    backend: BackendChoice,
) -> Result<()> {
    let Some((available, limit)) = available() else {
        return Ok(());
    };
    check_within(config, model, backend, available, limit)
}

/// [`check`] against `available` bytes.
pub fn check_against(
    config: &TrainConfig,
    model: &MoeTransformerConfig,
    backend: BackendChoice,
    available: f64,
) -> Result<()> {
    check_within(config, model, backend, available, "")
}

/// [`check`] against `available` bytes, which `limit` says where they come from (for the
/// message; empty for none).
fn check_within(
    config: &TrainConfig,
    model: &MoeTransformerConfig,
    backend: BackendChoice,
    available: f64,
    limit: &str,
) -> Result<()> {
    let estimate = estimate(config, model);
    if estimate.total_bytes() <= available {
        return Ok(());
    }
    let host = if backend == BackendChoice::Wgpu {
        " (the GPU's own memory is not known; this is the host's)"
    } else {
        ""
    };
    Err(TrainError::Memory(format!(
        "the model ({:.3e} parameters) and a micro-batch of {} x {} tokens need about {} ({} for weights, gradients and AdamW state, {} for activations), but {} is available{}{host}; lower `--experts`, `--batch-size` or `--context`, or the model's width",
        estimate.parameters,
        config.optim.batch_size,
        config.model.context_length,
        bytes(estimate.total_bytes()),
        bytes(estimate.state_bytes),
        bytes(estimate.activation_bytes),
        bytes(available),
        if limit.is_empty() {
            String::new()
        } else {
            format!(" {limit}")
        },
    )))
}

/// The largest single tensor of a training step, bytes (f32), and what it is: the logits
/// `[N, V]` (and their gradient), the attention scores `[B, heads, T, T]`, the expert buffer
/// `[S, max(d, h)]` (`S`: the routed rows, `N k` dropless or `E C` under a capacity), the
/// token embedding `[V, d]` or one stacked expert weight `[E, d, h]` (the last two not with
/// `--offload-experts`, which keeps them in CPU memory). A GPU holds each tensor in one
/// buffer, so each must fit the adapter's largest.
pub fn largest_tensor_bytes(config: &TrainConfig, model: &MoeTransformerConfig) -> (f64, String) {
    const F32: f64 = 4.0;
    let s = &model.decoder;
    let (batch, context) = (config.optim.batch_size, config.model.context_length);
    let tokens = batch * context;
    let moe = &s.moe;
    let rows = if moe.capacity.dropless {
        tokens * moe.top_k
    } else {
        moe.num_experts
            * moe.capacity.capacity(
                tokens,
                moe.num_experts,
                moe.top_k,
                moe_core::RoutingMode::Train,
            )
    };
    let width = s.d_model.max(moe.expert.d_hidden);
    let candidates = [
        (tokens * model.vocab_size, "the logits"),
        (
            batch * s.num_heads * context * context,
            "the attention scores",
        ),
        (rows * width, "the expert buffer"),
        (model.vocab_size * s.d_model, "the token embedding"),
        (
            moe.num_experts * s.d_model * moe.expert.d_hidden,
            "one stacked expert weight",
        ),
    ];
    // `--offload-experts` keeps the expert buffer and the experts' weights in CPU memory.
    let on_device = |what: &str| !(config.run.offload_experts && what.contains("expert"));
    let (elements, what) = candidates
        .into_iter()
        .filter(|(_, what)| on_device(what))
        .max_by_key(|(elements, _)| *elements)
        .expect("candidates");
    (elements as f64 * F32, what.to_string())
}

/// Refuses a run whose largest tensor does not fit the wgpu adapter's largest buffer, with
/// the figures, before anything is allocated.
pub fn check_adapter(
    config: &TrainConfig,
    model: &MoeTransformerConfig,
    adapter: &str,
    limits: &AdapterLimits,
) -> Result<()> {
    let (needed, what) = largest_tensor_bytes(config, model);
    let largest = limits.largest_tensor_bytes() as f64;
    if needed <= largest {
        return Ok(());
    }
    let offload = match what.contains("expert") {
        true => ", `--offload-experts` (the experts in CPU memory)",
        false => "",
    };
    Err(TrainError::Memory(format!(
        "{what} of a step ({} for a micro-batch of {} x {} tokens) is larger than the largest buffer the wgpu adapter {adapter} allows ({}); lower `--batch-size`, `--context` or the model's width{offload}, or use `--backend flex`",
        bytes(needed),
        config.optim.batch_size,
        config.model.context_length,
        bytes(largest),
    )))
}

/// `1.5 GB` and the like (powers of 1000).
pub fn bytes(value: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut value = value;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}
