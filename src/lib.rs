//! # burn-moe
//!
//! Mixture-of-Experts for Burn, in pure Rust. This crate re-exports the parts:
//!
//! - [`core`] (`moe-core`): the MoE layer: gates, experts, dispatch, balancing losses;
//! - [`kernels`] (`moe-kernels`): fused element-wise operations with a kernel per backend;
//! - [`models`] (`moe-models`): MoE transformers built from the layer;
//! - [`train`] (`moe-train`): training, generation and the backend chooser;
//! - [`parity`]: the backend parity cases that the tests and `moe-bench gpu-check` run;
//! - [`bench`](mod@bench): the report `moe-bench` writes, its rows and their typed keys.

pub use moe_core as core;
pub use moe_kernels as kernels;
pub use moe_models as models;
pub use moe_train as train;

pub use moe_core::burn;

pub mod bench;
pub mod parity;
