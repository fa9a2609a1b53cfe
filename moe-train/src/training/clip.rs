//! Global-norm gradient clipping (Pascanu et al. 2013): all gradients are scaled together by
//! `min(1, max_norm / ||g||)`, `||g||` the norm of every gradient of the model seen as one
//! vector. (Burn's own clipping scales each parameter's gradient separately.)

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let squares = grad.square().sum();
            // Experts placed on other devices: their part of the sum comes to the first's.
            self.total = Some(match self.total.take() {
                Some(total) => {
                    let home = total.device();
                    total + squares.to_device(&home)
                }
                None => squares,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    /// The factor on each device a gradient lives on, moved there once (a transfer to a
    /// remote device is a message).
    scales: Vec<Tensor<1>>,
}

impl Scale<'_> {
    fn on(&mut self, device: &Device) -> Tensor<1> {
        if let Some(scale) = self.scales.iter().find(|scale| scale.device() == *device) {
            return scale.clone();
        }
        let scale = self.scales[0].clone().to_device(device);
        self.scales.push(scale.clone());
        scale
    }
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let scale = self.on(&grad.device()).reshape([1; D]);
            self.grads.register(param.id, grad * scale);
        }
    }
}

/// The norms [`unscale_and_clip`] measured.
pub struct GradientNorms {
    /// The global norm of the gradients as computed (scaled by the loss scale, when there is
    /// one), `[1]`: not finite when the scaled backward pass overflowed.
    pub scaled: Tensor<1>,
    /// The global norm of the loss's gradients before clipping, `[1]`.
    pub norm: Tensor<1>,
    /// What every gradient was multiplied by, `[1]` (`None`: nothing was done to them): the
    /// same factor for the data-parallel replicas' gradients ([`scale_gradients`]).
    pub factor: Option<Tensor<1>>,
}

/// Multiplies `grads` of `module` by `unscale` (`1 / S` under loss scaling,
/// [`crate::training::loss_scale`]) and clips the result to global norm `max_norm` (no clipping
/// when `max_norm <= 0`), in one multiplication per gradient; `None` when the module has no
/// gradient.
pub fn unscale_and_clip<M: Module>(
    grads: &mut GradientsParams,
    module: &M,
    unscale: Option<Tensor<1>>,
    max_norm: f64,
) -> Option<GradientNorms> {
    let mut squares = SquaredNorm { grads, total: None };
    module.visit(&mut squares);
    let scaled = squares.total?.sqrt();
    let norm = match &unscale {
        Some(unscale) => scaled.clone() * unscale.clone(),
        None => scaled.clone(),
    };
    let clip = (max_norm > 0.0).then(|| {
        (norm.clone().add_scalar(1e-6))
            .recip()
            .mul_scalar(max_norm)
            .clamp_max(1.0)
    });
    let factor = match (unscale, clip) {
        (Some(unscale), Some(clip)) => Some(unscale * clip),
        (Some(factor), None) | (None, Some(factor)) => Some(factor),
        (None, None) => None,
    };
    if let Some(scale) = &factor {
        scale_gradients(grads, module, scale.clone());
    }
    Some(GradientNorms {
        scaled,
        norm,
        factor,
    })
}

/// Multiplies each gradient of `module`'s parameters in `grads` by `factor` (`[1]`, moved to
/// each gradient's device).
pub fn scale_gradients<M: Module>(grads: &mut GradientsParams, module: &M, factor: Tensor<1>) {
    module.visit(&mut Scale {
        grads,
        scales: vec![factor],
    });
}
