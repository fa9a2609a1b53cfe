//! What the kernel tests share: the backends they run on, exact test values, and comparisons.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use burn::tensor::{Device, FloatDType, Gradients, Tensor, TensorData};

/// The CPU backends built in, with autodiff: ndarray runs each operation's default body (Burn's
/// composed ops), flex its hand-written kernels.
#[allow(deprecated)] // `Device::ndarray`: deprecated in Burn 0.22, still a backend we serve
pub fn devices() -> Vec<(&'static str, Device)> {
    vec![
        #[cfg(feature = "ndarray")]
        ("ndarray", Device::ndarray().autodiff()),
        #[cfg(feature = "flex")]
        ("flex", Device::flex().autodiff()),
    ]
}

/// [`devices`] and, where a Vulkan, Metal or DX12 device opens, wgpu (whose kernels are
/// CubeCL's): for the operations that have cube kernels. Without such a device wgpu is left out
/// with a line saying why, unless `BURN_MOE_REQUIRE_WGPU=1` (set by `.ci/run` once it has
/// installed a software Vulkan driver), which makes a missing device a failure.
pub fn devices_with_wgpu() -> Vec<(&'static str, Device)> {
    let mut all = devices();
    #[cfg(feature = "wgpu")]
    if let Some(device) = wgpu() {
        all.push(("wgpu", device.autodiff()));
    }
    all
}

/// The wgpu device on wgpu's default adapter, opened once per test binary.
#[cfg(feature = "wgpu")]
fn wgpu() -> Option<Device> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let opened = DEVICE.get_or_init(|| {
        Device::wgpu_options()
            .device_kind(burn::tensor::DeviceKind::DefaultDevice)
            .init()
            .map_err(|error| error.to_string())
    });
    match opened {
        Ok(device) => Some(device.clone()),
        Err(error) => {
            let required = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "BURN_MOE_REQUIRE_WGPU=1 but wgpu opens no device: {error}"
            );
            eprintln!("wgpu: skipped: {error}");
            None
        }
    }
}

/// The float types `device` computes in among [`DTYPES`].
pub fn dtypes(device: &Device) -> Vec<(FloatDType, f64)> {
    DTYPES
        .into_iter()
        .filter(|(dtype, _)| device.supports_dtype(*dtype))
        .collect()
}

/// The float types the products are checked in, with their relative tolerances.
pub const DTYPES: [(FloatDType, f64); 2] = [(FloatDType::F32, 1e-5), (FloatDType::F64, 1e-12)];

/// Values in [-1, 1) in steps of 1/8 (exact in f32, and so are their short sums of products).
pub fn values(len: usize, seed: usize) -> Vec<f64> {
    (0..len)
        .map(|i| ((i * seed + 7) % 17) as f64 / 8.0 - 1.0)
        .collect()
}

/// `[rows, columns]` from row-major values; when `transposed`, stored as `[columns, rows]` and
/// viewed back (a strided view, not a copy).
pub fn matrix(
    values: &[f64],
    [rows, columns]: [usize; 2],
    transposed: bool,
    dtype: FloatDType,
    device: &Device,
) -> Tensor<2> {
    if !transposed {
        return Tensor::<2>::from_data(TensorData::new(values.to_vec(), [rows, columns]), device)
            .cast(dtype);
    }
    let mut stored = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..columns {
            stored[c * rows + r] = values[r * columns + c];
        }
    }
    Tensor::<2>::from_data(TensorData::new(stored, [columns, rows]), device)
        .cast(dtype)
        .transpose()
}

/// A tensor's values on the host, as f64.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.try_into_vec_as::<f64>().unwrap()
}

pub use moe_kernels::testing::assert_close;

/// Asserts that the gradients of both operands of a product, `x` and `w`, are in `grads` and
/// close to `grad_x` and `grad_w`.
pub fn assert_gradients<const D: usize, const E: usize>(
    what: &str,
    grads: &Gradients,
    (x, grad_x): (&Tensor<D>, &[f64]),
    (w, grad_w): (&Tensor<E>, &[f64]),
    tolerance: f64,
) {
    let got_x = host(x.grad(grads).expect("x has a gradient"));
    let got_w = host(w.grad(grads).expect("w has a gradient"));
    assert_close(&format!("{what} grad_x"), &got_x, grad_x, tolerance);
    assert_close(&format!("{what} grad_w"), &got_w, grad_w, tolerance);
}
