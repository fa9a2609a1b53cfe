//! # moe-train: the program that trains burn-moe models
//!
//! `burn-moe train` trains a Wudao-style MoE language model on Chinese poetry (the npm package
//! `chinese-poetry`) or your own text, or the multimodal model on a digits task; `burn-moe
//! generate` streams text from a checkpoint; `burn-moe eval` reports validation loss and
//! expert load. The crate in folders:
//!
//! - [`cli`] and [`config`]: flags, presets and config files, resolved into one
//!   [`config::TrainConfig`];
//! - [`training`]: the loop and its parts (optimizer, schedule, clipping, loss scaling, the
//!   divergence guard, parallelism);
//! - [`data`]: corpora, the validation split, the tokenizer, batches and the tasks (text,
//!   digits);
//! - [`store`]: what a run keeps on disk (the run folder it owns, checkpoints, metrics,
//!   plots);
//! - [`runtime`]: where the work runs (the backend chooser, CPU heap reuse and threads, the
//!   memory check);
//! - [`commands`]: the other subcommands (generate, eval, export, compare, serve);
//! - [`error`]: every error the program reports; [`checksum`]: how checksums are written.

#![warn(missing_docs)]

pub mod checksum;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod error;
pub mod runtime;
pub mod store;
pub mod training;

pub use error::{Result, TrainError};
