//! `burn-moe train`: the loop ([`run`](mod@run), steps in `session` and `step`) and what it is made of:
//! AdamW with a fused update ([`optimizer`]), warm-up and cosine schedule ([`schedule`]),
//! global-norm clipping ([`clip`]), dynamic loss scaling for mixed precision ([`loss_scale`]), a
//! logged step's values in one read ([`readout`]), the guard against non-finite and exploding
//! losses ([`divergence`]), data and expert parallelism over devices ([`parallel`]) and the
//! data-parallel replicas that keep their weights ([`replicas`]).

pub mod clip;
pub mod divergence;
pub mod loss_scale;
pub mod optimizer;
pub mod parallel;
pub mod readout;
pub mod replicas;
pub mod run;
pub mod schedule;
mod session;
mod step;

pub use run::{loss_digits, perplexity, run, train, Resumed, RunOptions, RunSummary, StepHook};
