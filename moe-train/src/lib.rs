//! # moe-train: the program that trains burn-moe models
//!
//! `burn-moe train` trains a Wudao-style MoE language model on Chinese poetry (the npm package
//! `chinese-poetry`) or your own text, or the multimodal model on a digits task; `burn-moe
//! generate` streams text from a checkpoint; `burn-moe eval` reports validation loss and
//! expert load. The pieces:
//!
//! - [`backend`]: `--backend auto|wgpu|ndarray|flex`, the one place where a backend is chosen;
//! - [`allocator`]: heap reuse for the CPU backends' many large temporary buffers;
//! - [`threads`]: running the work on the CPU backends' compute threads;
//! - [`config`]: presets, config files and flags;
//! - [`corpus`], [`split`], [`tokenizer`], [`data`]: from files to batches;
//! - [`optimizer`]: AdamW with a fused update ([`optimizer::FusedAdamW`]).
//! - [`trainer`]: the loop (AdamW, schedule, clipping, accumulation), with [`schedule`],
//!   [`clip`], [`loss_scale`] (mixed precision), [`readout`] (a logged step's values in one
//!   read), [`checkpoint`], [`metrics`] and [`plots`];
//! - what keeps a long run safe: [`run_dir`] (one process owns a run folder, nothing is
//!   overwritten by accident), [`divergence`] (a non-finite loss stops the run before it
//!   replaces a finite checkpoint), [`memory`] (a model that cannot fit is refused before it
//!   is allocated);
//! - [`tasks`]: text and digits;
//! - [`commands`]: generation and evaluation; [`compare`]: an MoE config against its dense
//!   twin.

#![warn(missing_docs)]

pub mod allocator;
pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod clip;
pub mod commands;
pub mod compare;
pub mod config;
pub mod corpus;
pub mod data;
pub mod divergence;
pub mod error;
pub mod export;
pub mod form;
pub mod hf;
pub mod loss_scale;
pub mod memory;
pub mod metrics;
pub mod optimizer;
pub mod parallel;
pub mod plots;
pub mod readout;
pub mod run_dir;
pub mod schedule;
pub mod serve;
pub mod sharded_state;
pub mod split;
pub mod tasks;
pub mod threads;
pub mod tokenizer;
pub mod trainer;

pub use error::{Result, TrainError};
