//! The experts: feed-forward networks stored stacked, run as grouped matmuls over the ragged
//! expert buffer (or one batched matmul over a dense one).

use std::ops::Range;

use burn::config::Config;
use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor};
use moe_kernels::{batched_matmul_held, grouped_bias, grouped_matmul_held};

use crate::error::{check_nonzero, MoeError};
use crate::init::uniform;
use crate::lora;
use crate::precision::param_for;

/// Activation of an [`ExpertKind::Ffn`] expert.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu(x)` (exact, erf-based), as in GPT-2 / BERT.
    Gelu,
    /// `max(x, 0)`.
    Relu,
    /// `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    /// Applies the activation.
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Gelu => gelu(x),
            Activation::Relu => relu(x),
            Activation::Silu => silu(x),
        }
    }
}

/// Exact GELU, `x Φ(x) = x (1 + erf(x / √2)) / 2` (Hendrycks and Gimpel 2016), with its exact
/// gradient `Φ(x) + x φ(x)`: one operation from [`moe_kernels`], fused on backends that have a
/// kernel for it. Burn 0.22's `activation::gelu` computes this forward but back-propagates the
/// derivative of the tanh approximation on ndarray (a relative gradient error of about 1e-3,
/// caught by our finite-difference test).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    moe_kernels::gelu(x)
}

/// SiLU (swish), `x σ(x) = x / (1 + e^{-x})`, with its gradient `σ(x) (1 + x (1 - σ(x)))`:
/// one operation from [`moe_kernels`], fused on backends that have a kernel for it, in the
/// input's precision (Burn 0.22's `activation::sigmoid`, and so `silu`, computes in f32 even on
/// f64 tensors).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    moe_kernels::silu(x)
}

/// The form of one expert.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ExpertKind {
    /// `act(x W_in + b_in) W_out + b_out` (Transformer FFN).
    Ffn(Activation),
    /// `(silu(x W_gate) * (x W_in)) W_out`, no biases (Shazeer 2020, "GLU Variants Improve
    /// Transformer"; LLaMA, Mixtral).
    SwiGlu,
}

/// Shape and form of every expert of a layer.
#[derive(Config, Debug, PartialEq)]
pub struct ExpertConfig {
    /// Hidden size of one expert.
    pub d_hidden: usize,
    /// Feed-forward or SwiGLU.
    #[config(default = "ExpertKind::Ffn(Activation::Gelu)")]
    pub kind: ExpertKind,
}

impl ExpertConfig {
    pub(crate) fn validate(&self) -> Result<(), MoeError> {
        check_nonzero("expert.d_hidden", self.d_hidden)
    }

    /// `num_experts` experts of this form on `d_model`-sized tokens, stacked. Weights are drawn
    /// as Burn's `Linear` draws them: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn init(&self, num_experts: usize, d_model: usize, device: &Device) -> Experts {
        let (e, d, h) = (num_experts, d_model, self.d_hidden);
        let has_bias = matches!(self.kind, ExpertKind::Ffn(_));
        Experts {
            w_in: uniform([e, d, h], d, device),
            b_in: has_bias.then(|| uniform([e, h], d, device)),
            w_gate: matches!(self.kind, ExpertKind::SwiGlu).then(|| uniform([e, d, h], d, device)),
            w_out: uniform([e, h, d], h, device),
            b_out: has_bias.then(|| uniform([e, d], h, device)),
            kind: self.kind,
        }
    }

    /// LoRA parameters of one expert's adapters of rank `rank` ([`crate::lora`]): `r (d_in +
    /// d_out)` for each of its two (FFN) or three (SwiGLU) weights.
    pub fn lora_params_per_expert(&self, d_model: usize, rank: usize) -> usize {
        let weights = match self.kind {
            ExpertKind::Ffn(_) => 2,
            ExpertKind::SwiGlu => 3,
        };
        weights * rank * (d_model + self.d_hidden)
    }

    /// Parameters of one expert.
    pub fn params_per_expert(&self, d_model: usize) -> usize {
        let (d, h) = (d_model, self.d_hidden);
        match self.kind {
            ExpertKind::Ffn(_) => 2 * d * h + h + d,
            ExpertKind::SwiGlu => 3 * d * h,
        }
    }
}

/// `E` experts of one form, stacked so that all of them run as one grouped matmul per
/// projection: on the ragged buffer `[S, d_model]` ([`Experts::forward_grouped`]), or on a
/// dense `[E, C, d_model]` one ([`Experts::forward`]).
#[derive(Module, Debug)]
pub struct Experts {
    /// Input projection, `[E, d_model, d_hidden]`.
    pub w_in: Param<Tensor<3>>,
    /// Input bias, `[E, d_hidden]` (FFN only).
    pub b_in: Option<Param<Tensor<2>>>,
    /// Gate projection, `[E, d_model, d_hidden]` (SwiGLU only).
    pub w_gate: Option<Param<Tensor<3>>>,
    /// Output projection, `[E, d_hidden, d_model]`.
    pub w_out: Param<Tensor<3>>,
    /// Output bias, `[E, d_model]` (FFN only).
    pub b_out: Option<Param<Tensor<2>>>,
    /// The form of the experts.
    #[module(skip)]
    pub kind: ExpertKind,
}

impl Experts {
    /// Runs expert `e` on slice `e` of `x: [E, C, d_model]`, every row of it (a batched
    /// matmul): the shared experts, which see every token.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.run(x, batched_matmul_held, |y, bias| {
            let bias = param_for(bias, &y);
            y + bias.unsqueeze_dim(1)
        })
    }

    /// Runs expert `e` on rows `offsets[e]..offsets[e + 1]` of the ragged buffer
    /// `x: [S, d_model]` (see [`crate::dispatch`]), giving `[S, d_model]`: each product is a
    /// [`moe_kernels::grouped_matmul()`] over the experts' own rows, so no expert pays for
    /// another's load (a weight held in fewer bits converts only the experts with rows where
    /// the backend allows: [`moe_kernels::grouped_matmul_held`]). The rows after `offsets[E]`
    /// are padding: their output is zero (no bias is added there) and no gradient flows back
    /// through them.
    pub fn forward_grouped(&self, x: Tensor<2>, offsets: Tensor<1, Int>) -> Tensor<2> {
        self.run(
            x,
            |x, weight| grouped_matmul_held(x, weight, offsets.clone()),
            |y, bias| {
                let bias = param_for(bias, &y);
                grouped_bias(y, bias, offsets.clone())
            },
        )
    }

    /// The expert formula with the products and bias additions of one layout: `product(x, w)`
    /// multiplies each expert's rows by its slice of `w` (read in the type of `x`),
    /// `add_bias(y, b)` adds its row of `b`. A weight with a LoRA adapter adds its low-rank
    /// update ([`lora::project_experts`]).
    fn run<const D: usize>(
        &self,
        x: Tensor<D>,
        product: impl Fn(Tensor<D>, Tensor<3>) -> Tensor<D>,
        add_bias: impl Fn(Tensor<D>, &Param<Tensor<2>>) -> Tensor<D>,
    ) -> Tensor<D> {
        let project = |x, weight: &Param<Tensor<3>>| lora::project_experts(x, weight, &product);
        let with_bias = |y: Tensor<D>, bias: &Option<Param<Tensor<2>>>| match bias {
            Some(bias) => add_bias(y, bias),
            None => y,
        };
        let hidden = with_bias(project(x.clone(), &self.w_in), &self.b_in);
        let hidden = match (self.kind, &self.w_gate) {
            (ExpertKind::SwiGlu, Some(w_gate)) => silu(project(x, w_gate)) * hidden,
            (ExpertKind::Ffn(activation), _) => activation.apply(hidden),
            (ExpertKind::SwiGlu, None) => unreachable!("SwiGLU experts are built with a gate"),
        };
        with_bias(project(hidden, &self.w_out), &self.b_out)
    }

    /// The experts `range` of the stack on `device`, as parameters of their own that train:
    /// one device's share under an expert placement ([`crate::placement`]).
    pub fn slice_to(&self, range: Range<usize>, device: &Device) -> Experts {
        let part = |param: &Param<Tensor<3>>| moved(param, range.clone(), device);
        let part2 = |param: &Param<Tensor<2>>| moved(param, range.clone(), device);
        Experts {
            w_in: part(&self.w_in),
            b_in: self.b_in.as_ref().map(part2),
            w_gate: self.w_gate.as_ref().map(part),
            w_out: part(&self.w_out),
            b_out: self.b_out.as_ref().map(part2),
            kind: self.kind,
        }
    }

    /// The stacks `parts` (of one form, in expert order) as one stack on `device`, with
    /// parameters of its own: the inverse of [`Experts::slice_to`] over a placement's ranges.
    ///
    /// # Panics
    ///
    /// If `parts` is empty.
    pub fn concat(parts: &[Experts], device: &Device) -> Experts {
        Experts {
            w_in: joined(parts, |e| Some(&e.w_in), device).expect("a stack has w_in"),
            b_in: joined(parts, |e| e.b_in.as_ref(), device),
            w_gate: joined(parts, |e| e.w_gate.as_ref(), device),
            w_out: joined(parts, |e| Some(&e.w_out), device).expect("a stack has w_out"),
            b_out: joined(parts, |e| e.b_out.as_ref(), device),
            kind: parts[0].kind,
        }
    }

    /// The ids of the stack's parameters in one fixed order: `w_in`, `b_in`, `w_gate`, `w_out`,
    /// `b_out`, those present. Two stacks of one form list theirs alike, parameter by parameter.
    pub fn param_ids(&self) -> Vec<ParamId> {
        let mut ids = vec![self.w_in.id];
        ids.extend(self.b_in.as_ref().map(|param| param.id));
        ids.extend(self.w_gate.as_ref().map(|param| param.id));
        ids.push(self.w_out.id);
        ids.extend(self.b_out.as_ref().map(|param| param.id));
        ids
    }

    /// The stack with its parameters under `ids` (in [`Experts::param_ids`]'s order): how a
    /// gathered stack takes back the ids it had before it was placed, which the optimizer's
    /// state and the saved records know it by.
    ///
    /// # Panics
    ///
    /// If `ids` does not hold one id per parameter.
    pub fn with_param_ids(self, ids: &[ParamId]) -> Experts {
        assert_eq!(ids.len(), self.param_ids().len(), "one id per parameter");
        let mut ids = ids.iter().copied();
        let mut next = || ids.next().expect("one id per parameter");
        Experts {
            w_in: renamed(self.w_in, next()),
            b_in: self.b_in.map(|param| renamed(param, next())),
            w_gate: self.w_gate.map(|param| renamed(param, next())),
            w_out: renamed(self.w_out, next()),
            b_out: self.b_out.map(|param| renamed(param, next())),
            kind: self.kind,
        }
    }

    /// Number of experts in the stack.
    pub fn num_experts(&self) -> usize {
        self.w_in.shape().dims::<3>()[0]
    }

    /// Hidden size of one expert.
    pub fn d_hidden(&self) -> usize {
        self.w_in.shape().dims::<3>()[2]
    }
}

/// Experts `range` of `param` (detached) on `device`, as a new trainable parameter.
fn moved<const D: usize>(
    param: &Param<Tensor<D>>,
    range: Range<usize>,
    device: &Device,
) -> Param<Tensor<D>> {
    let part = param
        .val()
        .without_autodiff()
        .narrow(0, range.start, range.len());
    Param::from_tensor(plain_on(part, device))
}

/// `param` under `id`.
fn renamed<const D: usize>(mut param: Param<Tensor<D>>, id: ParamId) -> Param<Tensor<D>> {
    param.id = id;
    param
}

/// The untracked `value` on `device`, with autodiff when `device` has it.
fn plain_on<const D: usize>(value: Tensor<D>, device: &Device) -> Tensor<D> {
    let value = value.without_autodiff().to_device(device);
    if device.is_autodiff() {
        value.autodiff()
    } else {
        value
    }
}

/// The parameter `get` picks from each of `parts`, concatenated along the experts on `device`;
/// `None` where the stacks have none.
fn joined<const D: usize>(
    parts: &[Experts],
    get: impl Fn(&Experts) -> Option<&Param<Tensor<D>>>,
    device: &Device,
) -> Option<Param<Tensor<D>>> {
    let values: Option<Vec<Tensor<D>>> = parts
        .iter()
        .map(|part| get(part).map(|param| plain_on(param.val(), device)))
        .collect();
    values.map(|values| Param::from_tensor(Tensor::cat(values, 0)))
}
