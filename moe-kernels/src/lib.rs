//! Fused operations and kernels for burn-moe.
//!
//! moe-core is written once on Burn's tensor API. Where that API leaves a hot spot slow on some
//! backend, the fix lives here, as a Burn *backend extension*: one trait, a default body that
//! composes Burn's own ops (right on every backend), and a hand-written kernel for the backends
//! that need one. moe-core calls the plain `Tensor` functions of this crate and never sees a
//! backend. The flex kernels are Rust (`flex/`), the wgpu ones CubeCL (`cube/`);
//! [`launches`] counts the kernels work launches and the reads it makes on wgpu. Each trait is
//! declared with `#[moe_extension]` (crate `moe-macros`), which names the backends every
//! operation dispatches to in one place.
//!
//! - [`gelu()`]: the exact GELU, `x Φ(x)`, with its exact gradient `Φ(x) + x φ(x)`. On flex its
//!   forward and backward are single vectorised passes (Burn composes it from six ops, and flex
//!   evaluates `erf` one element at a time through libm).
//! - [`silu()`]: SiLU, `x σ(x)`, with its gradient `σ(x) (1 + x (1 - σ(x)))`, fused on flex
//!   the same way (the gate activation of SwiGLU experts).
//! - [`softmax()`], [`log_softmax()`]: along one dimension, with gradients from the output
//!   alone; on flex one vectorised pass per row and direction (Burn composes five ops and
//!   flex's `exp` is scalar libm); on wgpu one cube per row and direction.
//!   [`causal_softmax()`]: attention's softmax with the causal mask folded in (no mask tensor;
//!   flex and cube skip the masked keys).
//! - [`adamw_update()`]: one AdamW step of a parameter (burn-optim's formula and order); on
//!   flex one parallel pass that writes the parameter and both moments once, instead of a dozen
//!   element-wise ops on one core.
//! - [`cross_entropy()`]: `-ln softmax(x)[target]` per row, keeping only the row's
//!   log-normaliser for its gradient `softmax(x) - one_hot(target)`; no `[rows, classes]`
//!   log-probabilities forward and no zero-filled one backward, and on flex one pass over the
//!   rows per direction.
//! - [`dropout()`]: inverted dropout whose mask is one operation; on flex a single pass of
//!   counter-based random draws instead of Burn's per-element sampler.
//! - [`grouped_matmul()`], [`grouped_bias()`]: one matmul (and bias row) per expert over the
//!   expert's own rows of the ragged `[S, K]` buffer (rows grouped by expert, `offsets` say
//!   where each group starts), with their gradients; on flex one GEMM per group where its rows
//!   lie, on wgpu tiled CubeCL kernels that find each tile's group on the device.
//! - [`top_k_indices()`]: each row's `k` largest (a gate's experts); on flex a partial
//!   selection per row instead of Burn's sort of the whole row.
//! - [`exclusive_cumsum()`], [`invert_slots()`]: the dispatch plan's integer steps (each
//!   expert's tokens numbered in order; the pair each buffer row holds); on wgpu a column scan
//!   and a parallel scatter in CubeCL instead of Burn's quadratic `cumsum` and its
//!   single-thread 1-D `select_assign`.
//! - [`matmul()`], [`batched_matmul()`], [`multi_head_matmul()`]: dense products (a linear
//!   layer's weight; stacked experts; attention's heads) with their gradients; on flex one GEMM
//!   call per matrix whose output is written once (flex's own matmul writes it three times),
//!   whose operands are read through their strides (transposed or head-split views cost
//!   nothing) and, for the heads, whose output and gradients are stored as the next operation
//!   reads them.
//! - [`gather_rows()`], [`combine_rows()`]: the layer's dispatch (`y[s] = x[index[s]]`) and
//!   combine (a weighted scatter-add back to the tokens), each with its own backward pass; on
//!   flex one pass over the rows per direction instead of Burn's `select`/`select_assign` and
//!   their `[slots, d]` intermediates; on wgpu the scatter-adds as parallel gathers over each
//!   token's listed rows (no float atomics, deterministic).
//! - [`rms_norm()`]: RMSNorm with its gradients for the input and the scale, one autodiff node
//!   that keeps only its inputs; on flex one pass over the rows per direction, on wgpu one
//!   launch forward and two backward (Burn's `RmsNorm` composes six ops and keeps most of their
//!   outputs).
//! - [`rotary()`]: rotary position encoding, its gradient the inverse rotation (nothing saved
//!   but the angle tables); on flex one pass over the rows, on wgpu one launch (Burn's
//!   `RotaryEncoding` runs a batched matmul with a `[2, 4]` sign matrix and keeps twice the
//!   input).

#![warn(missing_docs)]

pub mod activation;
pub mod adamw;
#[cfg(feature = "wgpu")]
pub mod adapter;
mod autodiff;
pub mod counter_rng;
pub mod cross_entropy;
pub mod dequantize;
pub mod dropout;
pub mod frozen;
pub mod gather_scatter;
pub mod grouped_matmul;
#[cfg(feature = "wgpu")]
pub mod launches;
pub mod math;
pub mod matmul;
pub mod parity;
pub mod rms_norm;
pub mod rotary;
pub mod routing;
pub mod softmax;
pub mod testing;
pub mod top_k;

#[cfg(feature = "wgpu")]
mod cube;
#[cfg(feature = "flex")]
mod flex;

pub use activation::{gelu, silu, ActivationBackend};
pub use adamw::{adamw_update, AdamWBackend, AdamWStep};
pub use cross_entropy::{cross_entropy, CrossEntropyBackend};
pub use dequantize::{dequantize, dequantize_experts, in_dtype, quant_store};
pub use dropout::{dropout, DropoutBackend};
pub use frozen::{
    batched_matmul_held, frozen_grouped_matmul, frozen_matmul, matmul_held, FrozenProductBackend,
};
pub use gather_scatter::{combine_rows, gather_rows, permute_rows, GatherScatterBackend};
pub use grouped_matmul::{grouped_bias, grouped_matmul, grouped_matmul_held, GroupedMatmulBackend};
pub use matmul::{batched_matmul, matmul, multi_head_matmul, HeadLayout, MatmulBackend};
pub use rms_norm::{rms_norm, RmsNormBackend};
pub use rotary::{rotary, RotaryBackend};
pub use routing::{exclusive_cumsum, invert_slots, RoutingBackend};
pub use softmax::{causal_softmax, log_softmax, softmax, SoftmaxBackend};
pub use top_k::{top_k_indices, TopKBackend};
