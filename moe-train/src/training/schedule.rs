//! The learning-rate schedule: linear warm-up, then cosine decay.
//!
//! A pure function of the step, so a resumed run follows exactly the same schedule without
//! any scheduler state to save.

use crate::config::OptimConfig;

/// Learning rate for optimizer step `step` (from 1) of `total`:
///
/// - `lr * step / warmup` during the first `warmup` steps (Goyal et al. 2017);
/// - then `min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`, `t` going from 0 to 1 over the
///   remaining steps (Loshchilov & Hutter, "SGDR", 2017).
pub fn learning_rate(step: usize, total: usize, optim: &OptimConfig) -> f64 {
    let warmup = optim.warmup_steps.min(total.saturating_sub(1));
    if step <= warmup && warmup > 0 {
        return optim.lr * step as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).clamp(0.0, 1.0);
    optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}
