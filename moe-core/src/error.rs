//! Typed configuration errors for the MoE layer.

use thiserror::Error;

/// Why a [`MoeConfig`](crate::MoeConfig) was refused by [`MoeConfig::init`](crate::MoeConfig::init).
///
/// Every variant names the offending field by its path in the config (for example
/// `capacity.train_factor`), so the message can be shown to a user as is.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MoeError {
    /// A size that must be at least one was zero.
    #[error("`{field}` must be at least 1, got 0")]
    Zero {
        /// Path of the field in the config.
        field: &'static str,
    },

    /// More experts per token were asked for than there are experts.
    #[error("`top_k` ({top_k}) cannot exceed `num_experts` ({num_experts})")]
    TopKExceedsExperts {
        /// The requested number of experts per token.
        top_k: usize,
        /// The number of experts in the layer.
        num_experts: usize,
    },

    /// The gate is defined for a fixed number of experts per token (GShard: 2, Switch: 1).
    #[error("the {gate} gate sends each token to exactly {required} expert(s): set `top_k = {required}` (got {top_k})")]
    GateNeedsTopK {
        /// Name of the gate.
        gate: &'static str,
        /// The `top_k` the gate is defined for.
        required: usize,
        /// The `top_k` in the config.
        top_k: usize,
    },

    /// A real-valued field is outside its allowed range (or is NaN / infinite).
    #[error("`{field}` must be {expected}, got {value}")]
    OutOfRange {
        /// Path of the field in the config.
        field: &'static str,
        /// The value found.
        value: f64,
        /// The allowed range, in words.
        expected: &'static str,
    },

    /// An option that only token-choice gates support was combined with the expert-choice gate.
    #[error("`{field}` does not apply to the expert-choice gate: {reason}")]
    NotForExpertChoice {
        /// Path of the field in the config.
        field: &'static str,
        /// Why the combination makes no sense.
        reason: &'static str,
    },
    /// A shared-expert setting was given to a layer without shared experts.
    #[error("`{field}` is set but `shared_experts` is 0; it only applies to shared experts")]
    NeedsSharedExperts {
        /// Path of the field in the config.
        field: &'static str,
    },
    /// LoRA adapters could not be attached as asked.
    #[error("LoRA: {0}")]
    Lora(String),

    /// An expert placement that cannot be made ([`crate::placement::ExpertPlacement`]).
    #[error("expert placement: {0}")]
    Placement(String),
}

/// Checks that a size is not zero.
pub(crate) fn check_nonzero(field: &'static str, value: usize) -> Result<(), MoeError> {
    if value == 0 {
        Err(MoeError::Zero { field })
    } else {
        Ok(())
    }
}

/// Checks that `value` is finite and `> 0`.
pub(crate) fn check_positive(field: &'static str, value: f64) -> Result<(), MoeError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(MoeError::OutOfRange {
            field,
            value,
            expected: "a finite number > 0",
        })
    }
}

/// Checks that `value` is finite and `>= 0`.
pub(crate) fn check_non_negative(field: &'static str, value: f64) -> Result<(), MoeError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(MoeError::OutOfRange {
            field,
            value,
            expected: "a finite number >= 0",
        })
    }
}

/// Checks that `value` lies in `[0, 1)`.
pub(crate) fn check_unit_interval(field: &'static str, value: f64) -> Result<(), MoeError> {
    if value.is_finite() && (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(MoeError::OutOfRange {
            field,
            value,
            expected: "in [0, 1)",
        })
    }
}
