//! moe-train
