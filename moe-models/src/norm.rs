//! Layer normalisation, LayerNorm or RMSNorm.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{DType, Device, Tensor};
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
    /// A norm over `d_model` features.
    pub fn init(self, d_model: usize, device: &Device) -> Norm {
        match self {
            NormKind::LayerNorm => Norm {
                layer: Some(LayerNormConfig::new(d_model).init(device)),
                rms: None,
            },
            NormKind::RmsNorm => Norm {
                layer: None,
                rms: Some(RmsNormConfig::new(d_model).init(device)),
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
    /// Normalises the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match (&self.layer, &self.rms) {
            (Some(layer), _) => layer.forward(x),
            // One operation with its own backward pass (`moe_kernels::rms_norm`) in f32 and
            // f64; Burn's composed module in half precision, where it sums the squares in f32.
            (None, Some(rms)) => match x.dtype() {
                DType::F32 | DType::F64 => rms_norm(x, rms.gamma.val(), rms.epsilon),
                _ => rms.forward(x),
            },
            (None, None) => x,
        }
    }
}
