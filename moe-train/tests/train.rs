//! Tests of the training program on the CPU backend (ndarray).

#[path = "train/common.rs"]
mod common;

#[path = "train/checkpoints.rs"]
mod checkpoints;
#[path = "train/compare.rs"]
mod compare;
#[path = "train/config.rs"]
mod config;
#[path = "train/corpus.rs"]
mod corpus;
#[path = "train/export.rs"]
mod export;
#[path = "train/guards.rs"]
mod guards;
#[path = "train/mnist.rs"]
mod mnist;
#[path = "train/old_files.rs"]
mod old_files;
#[path = "train/runs.rs"]
mod runs;
#[path = "train/tokenizer.rs"]
mod tokenizer;
