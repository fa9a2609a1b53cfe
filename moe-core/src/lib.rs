//! # moe-core: a Mixture-of-Experts layer for Burn
//!
//! A sparsely-gated Mixture-of-Experts (MoE) feed-forward layer written once on Burn's tensor
//! API: the same code runs on the wgpu backend (Vulkan, Metal, DX12) and on the CPU backends
//! (ndarray, flex). The backend is chosen by the [`Device`](burn::tensor::Device) you pass to
//! [`MoeConfig::init`].
//!
//! ```no_run
//! use burn::tensor::{Device, Distribution, Tensor};
//! use moe_core::{ExpertConfig, GateConfig, MoeConfig};
//!
//! # #[allow(deprecated)]
//! let device = Device::ndarray().autodiff();
//! let moe = MoeConfig::new(64, 8, ExpertConfig::new(256))
//!     .with_top_k(2)
//!     .with_gate(GateConfig::softmax_top_k())
//!     .init(&device)
//!     .expect("valid config");
//! let x = Tensor::<3>::random([4, 16, 64], Distribution::Default, &device);
//! let out = moe.forward(x);
//! let loss = out.output.powi_scalar(2).mean() + out.aux_loss; // aux_loss trains the router
//! let _grads = loss.backward();
//! ```
//!
//! The pieces, one file each:
//! - [`gate`]: how tokens choose experts (naive top-k, softmax top-k, noisy, GShard, Switch,
//!   expert choice), each with its formula and paper;
//! - [`Router`]: the router's parameters (shared by all gates);
//! - [`Experts`]: all experts stored stacked as `[experts, d_model, d_hidden]` and run as one
//!   batched matmul;
//! - [`dispatch`]: capacity, the expert buffer layout, gather and scatter-add;
//! - [`losses`]: balancing and z-loss;
//! - [`placement`]: the experts of a layer spread over several devices (expert parallelism);
//! - [`lora`]: low-rank adapters on the router, the experts and a model's attention;
//! - [`balancing`]: auxiliary-loss-free balancing by a per-expert bias;
//! - [`reference`](mod@reference): a deliberately simple loop implementation that the tests compare against;
//! - [`init`] and [`rng`]: eager parameter initialisation and a small seeded generator.

#![warn(missing_docs)]

pub mod balancing;
mod capacity;
pub mod dispatch;
mod error;
mod experts;
pub mod gate;
pub mod init;
pub mod lora;
pub mod losses;
mod moe;
pub mod placement;
pub mod precision;
pub mod reference;
pub mod rng;
mod router;
mod stats;
mod token_order;

pub use balancing::BiasBalancingConfig;
pub use capacity::{CapacityConfig, DropPolicy};
pub use error::MoeError;
pub use experts::{gelu, silu, Activation, ExpertConfig, ExpertKind, Experts};
pub use gate::GateConfig;
pub use losses::{LossConfig, LossKind};
pub use moe::{Moe, MoeConfig, MoeOutput};
pub use router::Router;
pub use stats::{RoutingStats, RoutingSummary};

/// Re-export of the Burn version this crate is built on.
pub use burn;

/// Whether the layer routes as in training (noise, jitter, random routing, training capacity)
/// or as in evaluation (deterministic, evaluation capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingMode {
    /// Training: the gate's noise is on and the training capacity factor applies.
    Train,
    /// Evaluation and generation: deterministic routing, evaluation capacity factor.
    Eval,
}

impl RoutingMode {
    /// `Train` on an autodiff device, `Eval` otherwise (the rule Burn's `Dropout` follows).
    pub fn for_device(device: &burn::tensor::Device) -> Self {
        if device.is_autodiff() {
            RoutingMode::Train
        } else {
            RoutingMode::Eval
        }
    }
}
