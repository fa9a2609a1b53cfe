//! What the kernel tests share: the backends they run on.

use burn::tensor::Device;

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
