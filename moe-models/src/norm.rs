//! Layer normalisation, LayerNorm or RMSNorm.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{DType, Device, Tensor};
use moe_core::precision::to_dtype;
use moe_kernels::rms_norm;

/// Which normalisation the blocks use.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / std * gamma + beta` (Ba et al. 2016; GPT-2).
    LayerNorm,
    /// `x / rms(x) * gamma` (Zhang & Sennrich 2019; LLaMA).
    RmsNorm,
}

/// A normalisation layer of either kind.
#[derive(Module, Debug)]
pub struct Norm {
    /// Set for [`NormKind::LayerNorm`].
    pub layer: Option<LayerNorm>,
    /// Set for [`NormKind::RmsNorm`].
    pub rms: Option<RmsNorm>,
}

impl NormKind {
    /// A norm over `d_model` features that adds `epsilon` to the variance (LayerNorm) or
    /// the mean square (RMSNorm) before the square root.
    pub fn init(self, d_model: usize, epsilon: f64, device: &Device) -> Norm {
        match self {
            NormKind::LayerNorm => Norm {
                layer: Some(
                    LayerNormConfig::new(d_model)
                        .with_epsilon(epsilon)
                        .init(device),
                ),
                rms: None,
            },
            NormKind::RmsNorm => Norm {
                layer: None,
                rms: Some(
                    RmsNormConfig::new(d_model)
                        .with_epsilon(epsilon)
                        .init(device),
                ),
            },
        }
    }

    /// Parameters of one norm over `d_model` features.
    pub fn num_params(self, d_model: usize) -> usize {
        match self {
            NormKind::LayerNorm => 2 * d_model,
            NormKind::RmsNorm => d_model,
        }
    }
}

impl Norm {
    /// Normalises the last dimension. Half-precision activations (mixed precision) are
    /// normalised in the parameters' precision and returned in their own: the mean and the
    /// variance are sums over the whole row, which 16 bits would round.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let compute = match dtype {
            DType::F32 | DType::F64 => x,
            _ => x.cast(self.param_dtype()),
        };
        let y = match (&self.layer, &self.rms) {
            (Some(layer), _) => layer.forward(compute),
            // One operation with its own backward pass (`moe_kernels::rms_norm`).
            (None, Some(rms)) => match compute.dtype() {
                DType::F32 | DType::F64 => rms_norm(compute, rms.gamma.val(), rms.epsilon),
                _ => rms.forward(compute),
            },
            (None, None) => compute,
        };
        to_dtype(y, dtype)
    }

    /// The precision of the norm's own parameters (f32 when there are none).
    fn param_dtype(&self) -> DType {
        match (&self.layer, &self.rms) {
            (Some(layer), _) => layer.gamma.val().dtype(),
            (None, Some(rms)) => rms.gamma.val().dtype(),
            (None, None) => DType::F32,
        }
    }
}
