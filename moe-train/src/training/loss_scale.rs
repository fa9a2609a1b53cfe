//! Dynamic loss scaling for mixed precision (Micikevicius et al. 2018, "Mixed Precision
//! Training", section 3.2), kept entirely on the device.
//!
//! The backward pass of a model that computes in f16 rounds gradients below about 6e-8 to zero.
//! Multiplying the loss by a scale `S` before the backward pass lifts them into f16's range;
//! the f32 gradients of the master weights are then divided by `S` again. Too large an `S`
//! overflows: a step whose gradient norm is not finite is skipped (the parameters and the
//! optimizer's moments keep their values) and `S` halves; after `growth_interval` finite steps
//! in a row `S` doubles. PyTorch's `GradScaler` makes the same moves, but reads the overflow
//! flag back to the host every step; here the flag, the scale and the count of skipped steps
//! stay tensors, the skip is a select inside the optimizer ([`UpdateVeto`]), and nothing is
//! read until a step is logged.

use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Tensor, TensorData, Transaction};
use serde::{Deserialize, Serialize};

/// The scale a run starts with, `2^16` (PyTorch's default).
pub const INITIAL_SCALE: f64 = 65536.0;
/// Finite steps in a row after which the scale doubles.
pub const GROWTH_INTERVAL: usize = 1000;

/// The loss scale and its bookkeeping, as `[1]` tensors on the training device.
#[derive(Debug, Clone)]
pub struct LossScaler {
    /// The current scale `S`.
    scale: Tensor<1>,
    /// Finite steps since the scale last changed.
    good_steps: Tensor<1>,
    /// Steps skipped so far for a non-finite gradient.
    skipped: Tensor<1>,
    growth_interval: usize,
}

impl LossScaler {
    /// A scaler starting at [`INITIAL_SCALE`], doubling after `growth_interval` finite steps.
    pub fn new(device: &Device, growth_interval: usize) -> Self {
        let device = device.clone().without_autodiff();
        Self {
            scale: Tensor::from_floats([INITIAL_SCALE as f32], &device),
            good_steps: Tensor::zeros([1], &device),
            skipped: Tensor::zeros([1], &device),
            growth_interval: growth_interval.max(1),
        }
    }

    /// A scaler continuing from `state` (a checkpoint's).
    pub fn restore(device: &Device, state: LossScaleState, growth_interval: usize) -> Self {
        let device = device.clone().without_autodiff();
        let scalar = |value: f64| Tensor::from_floats([value as f32], &device);
        Self {
            scale: scalar(state.scale),
            good_steps: scalar(state.good_steps as f64),
            skipped: scalar(state.skipped as f64),
            growth_interval: growth_interval.max(1),
        }
    }

    /// The scaler's state on the host, read in one transaction (for a checkpoint).
    pub fn state(&self) -> LossScaleState {
        let data = Transaction::default()
            .register(self.scale.clone())
            .register(self.good_steps.clone())
            .register(self.skipped.clone())
            .execute();
        let value = |data: &TensorData| {
            data.iter::<f64>()
                .next()
                .expect("a [1] tensor holds one value")
        };
        LossScaleState {
            scale: value(&data[0]),
            good_steps: value(&data[1]) as u64,
            skipped: value(&data[2]) as u64,
        }
    }

    /// `loss * S`, what the backward pass starts from (the scale, without autodiff, is a
    /// constant of the graph).
    pub fn scale_loss(&self, loss: Tensor<1>) -> Tensor<1> {
        loss * self.scale.clone()
    }

    /// `1 / S`: what turns the scaled gradients back into the loss's gradients.
    pub fn unscale_factor(&self) -> Tensor<1> {
        self.scale.clone().recip()
    }

    /// Ends a step whose scaled gradients have the global norm `scaled_norm`: returns whether
    /// the optimizer may apply it (`[1]`, 1 or 0) and moves the scale.
    pub fn update(&mut self, scaled_norm: Tensor<1>) -> Tensor<1> {
        let keep = scaled_norm.is_finite().float();
        let counted = (self.good_steps.clone() + 1.0) * keep.clone();
        let grow = counted
            .clone()
            .greater_equal_elem(self.growth_interval as f64);
        // Overflow: halve. Enough finite steps: double and start counting again. Else: keep.
        let factor = keep
            .clone()
            .mul_scalar(0.5)
            .add_scalar(0.5)
            .mask_fill(grow.clone(), 2.0);
        self.scale = self.scale.clone() * factor;
        self.good_steps = counted.mask_fill(grow, 0.0);
        self.skipped = self.skipped.clone() + keep.clone().neg().add_scalar(1.0);
        keep
    }

    /// The current scale, `[1]` (read it on a logged step).
    pub fn scale(&self) -> Tensor<1> {
        self.scale.clone()
    }

    /// Steps skipped so far, `[1]` (read it on a logged step).
    pub fn skipped(&self) -> Tensor<1> {
        self.skipped.clone()
    }
}

/// A [`LossScaler`]'s state as a checkpoint stores it, so that a resumed run goes on with the
/// scale it had reached instead of starting again from [`INITIAL_SCALE`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    /// The scale `S`.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
    /// Steps skipped so far for a non-finite gradient.
    pub skipped: u64,
}

/// Whether the optimizer applies its next step: a `[1]` tensor, 1 to apply and 0 to leave the
/// parameters and the optimizer's state as they are, shared between the training loop (which
/// sets it each step) and the optimizer (which reads it for every parameter).
#[derive(Debug, Clone, Default)]
pub struct UpdateVeto(Arc<Mutex<Option<Tensor<1>>>>);

impl UpdateVeto {
    /// Sets the flag the next step reads (`None`: always apply).
    pub fn set(&self, keep: Option<Tensor<1>>) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = keep;
    }

    /// The flag set for this step.
    pub fn get(&self) -> Option<Tensor<1>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(deprecated)]
    fn cpu() -> Device {
        Device::ndarray()
    }

    fn step(scaler: &mut LossScaler, norm: f32) -> f64 {
        let keep = scaler.update(Tensor::from_floats([norm], &cpu()));
        keep.into_scalar::<f64>()
    }

    /// Hand-worked sequence with a growth interval of 2: finite, overflow (halve, skip),
    /// finite, finite (double), NaN (halve, skip).
    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_the_interval() {
        let mut scaler = LossScaler::new(&cpu(), 2);
        let expected = [
            (1.0, 1.0, 65536.0, 1, 0),
            (f32::INFINITY, 0.0, 32768.0, 0, 1),
            (3.0, 1.0, 32768.0, 1, 1),
            (3.0, 1.0, 65536.0, 0, 1),
            (f32::NAN, 0.0, 32768.0, 0, 2),
        ];
        for (norm, keep, scale, good_steps, skipped) in expected {
            assert_eq!(step(&mut scaler, norm), keep, "keep after norm {norm}");
            let state = scaler.state();
            assert_eq!(
                state,
                LossScaleState {
                    scale,
                    good_steps,
                    skipped
                },
                "after norm {norm}"
            );
        }
    }

    #[test]
    fn a_restored_scaler_continues_where_the_saved_one_was() {
        let saved = LossScaleState {
            scale: 1024.0,
            good_steps: 1,
            skipped: 5,
        };
        let mut scaler = LossScaler::restore(&cpu(), saved, 2);
        assert_eq!(scaler.state(), saved);
        step(&mut scaler, 1.0);
        assert_eq!(
            scaler.state().scale,
            2048.0,
            "the second finite step doubles"
        );
        let loss = scaler.scale_loss(Tensor::from_floats([0.5], &cpu()));
        assert_eq!(loss.into_scalar::<f64>(), 1024.0);
    }
}
