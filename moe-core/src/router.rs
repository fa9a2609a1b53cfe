//! The router's parameters: the linear map from a token to one score per expert.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use crate::init::{uniform, zeros};
use crate::lora;

/// Router parameters shared by every gate: `logits = x W`, `W: [d_model, num_experts]`.
///
/// The gates ([`crate::gate`]) turn these logits into expert choices; the noisy gate also uses
/// `noise_weight`, and auxiliary-loss-free balancing keeps its per-expert bias here so that it
/// is saved and loaded with the model.
#[derive(Module, Debug)]
pub struct Router {
    /// Router weight `W_g`, `[d_model, num_experts]`.
    pub weight: Param<Tensor<2>>,
    /// Noise weight `W_noise` of the noisy gate, `[d_model, num_experts]`.
    pub noise_weight: Option<Param<Tensor<2>>>,
    /// Selection bias of auxiliary-loss-free balancing, `[num_experts]`. Not trained by
    /// gradient (see [`crate::balancing`]).
    pub selection_bias: Option<Param<Tensor<1>>>,
}

impl Router {
    /// A router with weights drawn as Burn's `Linear` draws them (`U(-1/sqrt(d), 1/sqrt(d))`);
    /// the noise weight starts at zero, as in Shazeer et al. (2017), and the bias at zero.
    pub(crate) fn init(
        d_model: usize,
        num_experts: usize,
        noisy: bool,
        selection_bias: bool,
        device: &Device,
    ) -> Self {
        let weight = uniform([d_model, num_experts], d_model, device);
        let noise_weight = noisy.then(|| zeros([d_model, num_experts], device));
        let selection_bias =
            selection_bias.then(|| zeros([num_experts], device).set_require_grad(false));
        Self {
            weight,
            noise_weight,
            selection_bias,
        }
    }

    /// Router logits `x W`, `[tokens, num_experts]` (with a LoRA adapter on `W`, its update
    /// added: [`lora::project`]).
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        lora::project(x, &self.weight, |x, w| {
            let w = crate::precision::to_dtype(w, x.dtype());
            x.matmul(w)
        })
    }

    /// Scores used to **choose** experts: `logits + bias` when auxiliary-loss-free balancing
    /// is on, the logits otherwise. The bias carries no gradient.
    pub fn selection_scores(&self, logits: Tensor<2>) -> Tensor<2> {
        match &self.selection_bias {
            Some(bias) => logits + bias.val().detach().unsqueeze_dim(0),
            None => logits,
        }
    }

    /// Number of experts this router scores.
    pub fn num_experts(&self) -> usize {
        self.weight.shape().dims::<2>()[1]
    }
}
