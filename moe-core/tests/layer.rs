//! Tests of the MoE layer on the CPU backend (ndarray, f32).

mod common;

#[path = "layer/balancing.rs"]
mod balancing;
#[path = "layer/capacity.rs"]
mod capacity;
#[path = "layer/config.rs"]
mod config;
#[path = "layer/custom_gate.rs"]
mod custom_gate;
#[path = "layer/dense.rs"]
mod dense;
#[path = "layer/lora.rs"]
mod lora;
#[path = "layer/losses.rs"]
mod losses;
#[path = "layer/placement.rs"]
mod placement;
#[path = "layer/reference_parity.rs"]
mod reference_parity;
