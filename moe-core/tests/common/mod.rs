//! Helpers shared by the moe-core tests.
#![allow(dead_code)]

use burn::tensor::{Device, Tensor, TensorData};

/// The CPU test backend.
#[allow(deprecated)]
pub fn cpu() -> Device {
    Device::ndarray()
}

/// `len` values drawn uniformly from `[-1, 1)` with a fixed seed (host-side, so every backend
/// sees the same numbers).
pub fn random_values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..len).map(|_| rng.uniform() as f32).collect()
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator for test data, so the tests
/// need no random-number crate of their own.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

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

/// Asserts `|actual - expected| <= tolerance * (1 + |expected|)` elementwise.
pub fn assert_close(actual: &[f64], expected: &[f64], tolerance: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tolerance * (1.0 + e.abs()),
            "{what}: element {i} is {a}, expected {e} (tolerance {tolerance})"
        );
    }
}
