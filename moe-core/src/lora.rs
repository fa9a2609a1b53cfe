//! Low-rank adaptation (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
//! Models") of a model's weights, experts included.
//!
//! Fine-tuning with LoRA freezes every weight `W_0: [d_in, d_out]` and learns, for the weights
//! it targets, a low-rank update: `W = W_0 + s A B`, `A: [d_in, r]`, `B: [r, d_out]`,
//! `s = alpha / r`. `B` starts at zero, so the adapted model starts as the base model; `A` is
//! drawn as Burn's `Linear` draws weights, `U(-1/sqrt(d_in), 1/sqrt(d_in))` (PEFT's Kaiming
//! uniform with `a = sqrt(5)`). Only `A` and `B` train, so the optimizer holds state for them
//! alone: rank 8 on a 2048-wide projection is 0.8 % of its weights.
//!
//! Stacked experts `[E, d_in, d_out]` get one pair per expert, `A: [E, d_in, r]`,
//! `B: [E, r, d_out]`: each expert learns its own update, as PEFT's per-expert `nn.Linear`
//! adapters would.
//!
//! The adapters are Burn reparameterizations ([`burn::module::Reparameterization`]): the
//! weight's [`Param::val`] is `W_0 + s A B`, the factors are parameters of their own under the
//! weight's path (`<weight>.lora.a`, `<weight>.lora.b`) that the optimizer, records and devices
//! see, and Burn's [`Module::materialize`] merges them into the weights. The forward passes of
//! our modules do not form `W_0 + s A B`: [`project`] computes `x W_0 + s (x A) B`, which costs
//! `r (d_in + d_out)` per row instead of a weight-sized matrix per call and keeps no
//! weight-sized tensor for the backward pass.

use burn::config::Config;
use burn::module::{Module, ModuleVisitor, Param, ParamGroup, Reparameterization, Reparameterizer};
use burn::tensor::{DType, Tensor};

use crate::error::{check_nonzero, check_positive, MoeError};
use crate::init::{uniform, zeros};
use crate::precision::to_dtype;

/// Which weights receive adapters.
#[derive(Config, Debug, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    /// The attention projections: the 2-D weights under a module named `attention` (query, key,
    /// value and output).
    Attention,
    /// The router: the 2-D weights under a module named `router` (the router weight and the
    /// noisy gate's noise weight) and the shared experts' gate `shared_gate`.
    Router,
    /// The experts: every stacked expert weight `[E, d_in, d_out]` (routed and shared experts,
    /// and the dense feed-forward layers, which are one-expert stacks).
    Experts,
}

impl LoraTarget {
    /// Every target.
    pub const ALL: [LoraTarget; 3] = [Self::Attention, Self::Router, Self::Experts];

    /// Its name on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attention => "attention",
            Self::Router => "router",
            Self::Experts => "experts",
        }
    }

    /// Whether the parameter at `path` with `rank` dimensions is one of this target's weights.
    pub fn matches(self, path: &str, rank: usize) -> bool {
        let parts: Vec<&str> = path.split('.').collect();
        let last = parts.last().copied().unwrap_or_default();
        match self {
            Self::Attention => rank == 2 && parts.contains(&"attention") && last == "weight",
            Self::Router => rank == 2 && (parts.contains(&"router") || last == "shared_gate"),
            Self::Experts => rank == 3,
        }
    }
}

/// Rank, scale and targets of LoRA adapters.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of each update.
    pub rank: usize,
    /// `alpha` of the scale `s = alpha / r`; `None` for `2 r` (a scale of 2).
    #[config(default = "None")]
    pub alpha: Option<f64>,
    /// The weights that receive adapters.
    #[config(default = "vec![LoraTarget::Attention]")]
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// The scale `s = alpha / r` of the updates.
    pub fn scale(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64) / self.rank.max(1) as f64
    }

    /// Refuses a zero rank, a non-finite or non-positive alpha and an empty target list.
    pub fn validate(&self) -> Result<(), MoeError> {
        check_nonzero("lora.rank", self.rank)?;
        if let Some(alpha) = self.alpha {
            check_positive("lora.alpha", alpha)?;
        }
        if self.targets.is_empty() {
            return Err(MoeError::Zero {
                field: "lora.targets",
            });
        }
        Ok(())
    }

    /// Whether the parameter at `path` with `rank` dimensions receives an adapter.
    pub fn targets(&self, path: &str, rank: usize) -> bool {
        self.targets.iter().any(|target| target.matches(path, rank))
    }
}

/// The adapter of one weight: `A: [E, d_in, r]`, `B: [E, r, d_out]` with `E = 1` for a 2-D
/// weight, and the scale `s`. Its reparameterization gives `W_0 + s A B`.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// Down-projection `A`, `[E, d_in, r]`.
    pub a: Param<Tensor<3>>,
    /// Up-projection `B`, `[E, r, d_out]`, zero at the start.
    pub b: Param<Tensor<3>>,
    /// `s = alpha / r`.
    pub scale: f64,
}

impl LoraAdapter {
    /// The update `s A B`, `[E, d_in, d_out]`, in f32.
    pub fn delta(&self) -> Tensor<3> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }

    /// Rank of the update.
    pub fn rank(&self) -> usize {
        self.a.shape().dims::<3>()[2]
    }
}

impl Reparameterization for LoraAdapter {
    const NAME: &'static str = "lora";

    /// `W_0 + s A B`, in the base's type; in f32 for a quantized base (a merged update is not
    /// re-quantized).
    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let dtype = match base.dtype() {
            DType::QFloat(_) => DType::F32,
            dtype => dtype,
        };
        let delta = self.delta().reshape(base.shape());
        to_dtype(to_dtype(base, DType::F32) + delta, dtype)
    }
}

/// The [`Reparameterizer`] that freezes every parameter and attaches a [`LoraAdapter`] to the
/// weights `config` targets.
struct AttachLora<'a> {
    config: &'a LoraConfig,
}

impl Reparameterizer for AttachLora<'_> {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let base = param.set_require_grad(false);
        if !(D == 2 || D == 3) || !self.config.targets(path, D) {
            return (base, None);
        }
        let dims = base.shape().dims::<D>();
        let (experts, d_in, d_out) = if D == 3 {
            (dims[0], dims[1], dims[2])
        } else {
            (1, dims[0], dims[1])
        };
        let device = base.device();
        let rank = self.config.rank;
        let adapter = LoraAdapter {
            a: uniform([experts, d_in, rank], d_in, &device),
            b: zeros([experts, rank, d_out], &device),
            scale: self.config.scale(),
        };
        (base, Some(adapter))
    }
}

/// `module` with every parameter frozen and LoRA adapters on the weights `config` targets.
/// Refuses an invalid config, a module that already has adapters, and targets that match no
/// weight of `module`.
pub fn attach<M: Module>(module: M, config: &LoraConfig) -> Result<M, MoeError> {
    config.validate()?;
    if adapter_count(&module) > 0 {
        return Err(MoeError::Lora(
            "the model already has LoRA adapters: merge them first".into(),
        ));
    }
    let module = module.apply_reparameterization(AttachLora { config });
    if adapter_count(&module) == 0 {
        let names: Vec<&str> = config.targets.iter().map(|t| t.name()).collect();
        return Err(MoeError::Lora(format!(
            "the targets {} match no weight of the model",
            names.join(", ")
        )));
    }
    Ok(module)
}

/// The adapters' factors of a module: the parameters whose path ends in `.lora.a` or
/// `.lora.b`. What a LoRA checkpoint saves ([`Module::into_record_group`]).
pub fn adapter_group() -> ParamGroup {
    ParamGroup::from_regex(r"\.lora\.(a|b)$").expect("a valid pattern")
}

/// Number of weights of `module` that carry an adapter.
pub fn adapter_count<M: Module>(module: &M) -> usize {
    count(module).weights
}

/// Number of adapter parameters (the entries of every `A` and `B`) of `module`: what a LoRA
/// fine-tuning trains.
pub fn adapter_params<M: Module>(module: &M) -> usize {
    count(module).params
}

fn count<M: Module>(module: &M) -> AdapterCounter {
    let mut counter = AdapterCounter::default();
    module.visit(&mut counter);
    counter
}

/// Counts the adapted weights and the adapters' parameters of a module while walking it.
#[derive(Default)]
struct AdapterCounter {
    path: Vec<String>,
    weights: usize,
    params: usize,
}

impl ModuleVisitor for AdapterCounter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = self.path.len();
        if n >= 2 && self.path[n - 2] == LoraAdapter::NAME {
            self.params += param.shape().num_elements();
            self.weights += usize::from(self.path[n - 1] == "a");
        }
    }
}

/// `x W` for `x: [..., d_in]` and a 2-D weight `W: [d_in, d_out]` that may carry an adapter,
/// in the type of `x`; `matmul(x, w)` multiplies by a 2-D matrix, reading `w` in the type of
/// `x` (`w` may be the weight as it is held: [`crate::precision::to_dtype`]). With an
/// adapter: `x W_0 + s (x A) B` (the same value as `x (W_0 + s A B)`, without forming the
/// sum).
pub fn project<const D: usize>(
    x: Tensor<D>,
    weight: &Param<Tensor<2>>,
    matmul: impl Fn(Tensor<D>, Tensor<2>) -> Tensor<D>,
) -> Tensor<D> {
    project_with(x, weight, matmul, |factor| factor.squeeze_dim(0))
}

/// `x W` for stacked expert weights `W: [E, d_in, d_out]` that may carry an adapter, in the type
/// of `x`; `product(x, w)` multiplies each expert's rows by its slice of `w` (a grouped or a
/// batched matmul), reading `w` in the type of `x` (`w` may be held in fewer bits). With an
/// adapter: `x W_0 + s (x A) B`, expert by expert.
pub fn project_experts<const D: usize>(
    x: Tensor<D>,
    weight: &Param<Tensor<3>>,
    product: impl Fn(Tensor<D>, Tensor<3>) -> Tensor<D>,
) -> Tensor<D> {
    project_with(x, weight, product, |factor| factor)
}

/// `x W` by `product`, with the adapter's `s (x A) B` added when `weight` has one; `shaped`
/// gives a `[E, ., .]` factor the weight's rank.
fn project_with<const D: usize, const W: usize>(
    x: Tensor<D>,
    weight: &Param<Tensor<W>>,
    product: impl Fn(Tensor<D>, Tensor<W>) -> Tensor<D>,
    shaped: impl Fn(Tensor<3>) -> Tensor<W>,
) -> Tensor<D> {
    let dtype = x.dtype();
    match weight.reparameterization::<LoraAdapter>() {
        None => product(x, weight.val()),
        Some(adapter) => {
            let factor = |factor: &Param<Tensor<3>>| shaped(to_dtype(factor.val(), dtype));
            let base = product(x.clone(), weight.base());
            let down = product(x, factor(&adapter.a));
            base + product(down, factor(&adapter.b)).mul_scalar(adapter.scale)
        }
    }
}
