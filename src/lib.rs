//! burn-moe facade
pub use moe_core;
