//! Auxiliary losses that keep the router balanced and stable.
//!
//! Each gate produces its own balancing loss (see the gate's documentation); the router z-loss
//! applies to every gate. [`LossConfig`] weighs them into the layer's `aux_loss`.

mod balance;
mod cv_squared;
mod smooth_load;
mod z_loss;

pub use balance::load_balancing_loss;
pub use cv_squared::cv_squared;
pub use smooth_load::smooth_load;
pub use z_loss::router_z_loss;

use burn::config::Config;

use crate::error::{check_non_negative, MoeError};

/// Weights of the auxiliary losses in `aux_loss = balance_weight * balance + z_loss_weight * z`.
#[derive(Config, Debug, PartialEq)]
pub struct LossConfig {
    /// Weight of the gate's balancing loss (Switch's `alpha`; 0.01 in the Switch paper).
    #[config(default = 0.01)]
    pub balance_weight: f64,
    /// Weight of the router z-loss (ST-MoE uses 0.001); 0 turns it off.
    #[config(default = 0.0)]
    pub z_loss_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl LossConfig {
    /// No auxiliary loss at all.
    pub fn none() -> Self {
        Self::new().with_balance_weight(0.0)
    }

    pub(crate) fn validate(&self) -> Result<(), MoeError> {
        check_non_negative("losses.balance_weight", self.balance_weight)?;
        check_non_negative("losses.z_loss_weight", self.z_loss_weight)?;
        Ok(())
    }
}

/// Which auxiliary loss a value in [`RoutingStats::losses`](crate::RoutingStats) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossKind {
    /// The gate's balancing loss, unweighted.
    Balance,
    /// The router z-loss, unweighted.
    ZLoss,
}

impl LossKind {
    /// A short name for logs and metrics files.
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Balance => "balance",
            LossKind::ZLoss => "z_loss",
        }
    }
}
