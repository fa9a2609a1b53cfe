//! The subcommands, each file one command, printing its own results (`train`'s loop is
//! [`crate::training`]).
//!
//! - [`train`](mod@train): the training command around the loop;
//! - [`generate`](mod@generate): text or digit images from a checkpoint, streamed;
//! - [`eval`]: validation loss, perplexity and expert load of a checkpoint, and with `--form`
//!   whether sampled poems keep their form ([`form`]);
//! - [`hf`]: `--hf DIR`, a Hugging Face model folder in `generate` and `eval`;
//! - [`export`]: a checkpoint's model as a Hugging Face folder;
//! - [`compare`]: an MoE config against its dense twin;
//! - [`serve`]: this machine's device for other machines' runs;
//! - [`loading`]: the checkpoint loading `generate`, `eval` and `export` share; [`stream`](mod@stream):
//!   generated text printed as it grows.

pub mod compare;
pub mod eval;
pub mod export;
pub mod form;
pub mod generate;
pub mod hf;
pub mod loading;
pub mod serve;
pub mod stream;
pub mod train;

pub use eval::{evaluate, load_summary, EvalReport};
pub use generate::generate;
pub use loading::load_finite;
pub use stream::stream;
