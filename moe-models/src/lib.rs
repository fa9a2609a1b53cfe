//! moe-models
