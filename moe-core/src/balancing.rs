//! Auxiliary-loss-free load balancing (DeepSeek-V3).
//!
//! A per-expert bias `b` is added to the router scores **for expert selection only**; the
//! combine weights use the unbiased scores. After each step the bias moves towards balance:
//!
//! `b_e <- b_e + u * sign(mean_load - load_e)`
//!
//! so overloaded experts become less attractive and idle ones more. No gradient is involved.
//!
//! Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (2024);
//! DeepSeek-AI, "DeepSeek-V3 Technical Report" (2024), section 2.1.2.

use burn::config::Config;
use burn::tensor::Tensor;

use crate::error::{check_positive, MoeError};

/// Settings of the auxiliary-loss-free balancing bias.
#[derive(Config, Debug, PartialEq)]
pub struct BiasBalancingConfig {
    /// The bias update speed `u` (DeepSeek-V3 uses 0.001).
    #[config(default = 0.001)]
    pub update_rate: f64,
}

impl BiasBalancingConfig {
    pub(crate) fn validate(&self) -> Result<(), MoeError> {
        check_positive("balance_bias.update_rate", self.update_rate)
    }
}

/// One bias update: `bias + rate * sign(mean(load) - load)`, computed on the device.
///
/// `load` is the number of assignments each expert received (before capacity), `[experts]`.
pub fn updated_bias(bias: Tensor<1>, load: Tensor<1>, rate: f64) -> Tensor<1> {
    let mean_load = load.clone().mean();
    let direction = (load.neg() + mean_load).sign();
    bias + direction.mul_scalar(rate)
}
