//! Tests of the MoE transformers on the CPU backend (ndarray).

#[path = "models/common.rs"]
mod common;

#[path = "models/causality.rs"]
mod causality;
#[path = "models/config.rs"]
mod config;
#[path = "models/dense.rs"]
mod dense;
#[path = "models/generation.rs"]
mod generation;
#[path = "models/hf.rs"]
mod hf;
#[cfg(feature = "learner")]
#[path = "models/learner.rs"]
mod learner;
#[path = "models/lora.rs"]
mod lora;
#[path = "models/loss.rs"]
mod loss;
#[path = "models/multimodal.rs"]
mod multimodal;
#[path = "models/overfit.rs"]
mod overfit;
#[path = "models/parameters.rs"]
mod parameters;
#[path = "models/peft.rs"]
mod peft;
#[path = "models/placement.rs"]
mod placement;
#[path = "models/storage.rs"]
mod storage;
#[path = "models/upcycle.rs"]
mod upcycle;
