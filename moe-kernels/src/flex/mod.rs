//! The flex backend's implementations of this crate's operations: hand-written kernels where
//! flex's own ops are slow for what moe-core asks of them.

mod activations;
mod grouped_matmul;
