//! Eager initialisation of Burn's `Linear` and `Embedding`, so that the seed set before `init`
//! decides every weight and a model built on one device can be moved to another unchanged.

use burn::nn::{Embedding, Linear};
use burn::tensor::Device;
use moe_core::init::{normal, uniform};

/// A `Linear` with weights `U(-1/sqrt(d_in), 1/sqrt(d_in))`, as Burn draws them.
pub(crate) fn linear(d_input: usize, d_output: usize, bias: bool, device: &Device) -> Linear {
    Linear {
        weight: uniform([d_input, d_output], d_input, device),
        bias: bias.then(|| uniform([d_output], d_input, device)),
    }
}

/// An `Embedding` with weights `N(0, 0.02^2)` (GPT-2's choice).
pub(crate) fn embedding(count: usize, d_model: usize, device: &Device) -> Embedding {
    Embedding {
        weight: normal([count, d_model], 0.02, device),
    }
}
