//! # moe-train: training and running burn-moe models
//!
//! - [`backend`]: `--backend auto|wgpu|ndarray|flex`, the one place where a backend is chosen.

#![warn(missing_docs)]

pub mod backend;
