//! Parameter initialisation, done eagerly so that a seed set just before `init` decides the
//! weights, whatever runs afterwards.

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor};

/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, the distribution Burn's `Linear` uses.
pub fn uniform<const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    device: &Device,
) -> Param<Tensor<D>> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Param::from_tensor(Tensor::random(
        shape,
        Distribution::Uniform(-bound, bound),
        device,
    ))
}

/// All zeros.
pub fn zeros<const D: usize>(shape: [usize; D], device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(Tensor::zeros(shape, device))
}

/// `N(0, std^2)`.
pub fn normal<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(Tensor::random(
        shape,
        Distribution::Normal(0.0, std),
        device,
    ))
}
