//! Global-norm gradient clipping (Pascanu et al. 2013): all gradients are scaled together by
//! `min(1, max_norm / ||g||)`, `||g||` the norm of every gradient of the model seen as one
//! vector. (Burn's own clipping scales each parameter's gradient separately.)

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let squares = grad.square().sum();
            self.total = Some(match self.total.take() {
                Some(total) => total + squares,
                None => squares,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    scale: Tensor<1>,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let scale = self.scale.clone().reshape([1; D]);
            self.grads.register(param.id, grad * scale);
        }
    }
}

/// Clips `grads` of `module` to global norm `max_norm` (no-op when `max_norm <= 0`); returns the
/// norm before clipping, `[1]`, on the device (read it only when logging).
pub fn clip_global_norm<M: Module>(
    grads: &mut GradientsParams,
    module: &M,
    max_norm: f64,
) -> Option<Tensor<1>> {
    let mut norm = SquaredNorm { grads, total: None };
    module.visit(&mut norm);
    let norm = norm.total?.sqrt();
    if max_norm > 0.0 {
        let scale = (norm.clone().add_scalar(1e-6))
            .recip()
            .mul_scalar(max_norm)
            .clamp_max(1.0);
        module.visit(&mut Scale { grads, scale });
    }
    Some(norm)
}
