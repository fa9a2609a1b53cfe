//! Helpers shared by the moe-core tests.
#![allow(dead_code)]

use burn::tensor::{Device, Tensor, TensorData};

/// The CPU test backend.
#[allow(deprecated)]
pub fn cpu() -> Device {
    Device::ndarray()
}

#[allow(unused_imports)]
pub use moe_core::reference::random_values;
#[allow(unused_imports)]
pub use moe_core::rng::SplitMix64;
#[allow(unused_imports)]
pub use moe_kernels::testing::assert_close;

/// A `[rows, columns]` tensor from row-major values.
pub fn matrix(values: &[f32], rows: usize, columns: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), [rows, columns]), device)
}

/// Values of a float tensor as `f64`.
pub fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    moe_core::reference::host(tensor)
}

/// Values of an int tensor as `i64`.
pub fn ints<const D: usize>(tensor: Tensor<D, burn::tensor::Int>) -> Vec<i64> {
    tensor.try_into_vec_as::<i64>().unwrap()
}

/// Values of a bool tensor.
pub fn bools<const D: usize>(tensor: Tensor<D, burn::tensor::Bool>) -> Vec<bool> {
    tensor.try_into_vec_as::<bool>().unwrap()
}
