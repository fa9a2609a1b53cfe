//! Autodiff gradients of the layer against central finite differences, in f64 on ndarray.
//!
//! The loss is `sum(output * R) + aux_loss` for a fixed random `R`, so the gradients of the
//! combine, the experts, the gate weights and the auxiliary losses are all checked. Routing is
//! piecewise constant; the perturbation (1e-6) is far below the gaps between router scores of
//! these random inputs, so no decision flips.

use std::sync::OnceLock;

use burn::module::{Module, Param};
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use moe_core::{
    CapacityConfig, ExpertConfig, ExpertKind, GateConfig, LossConfig, Moe, MoeConfig, RoutingMode,
};

mod common;

use common::SplitMix64;

/// ndarray with f64 as the default float type (configured once per process).
fn device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            #[allow(deprecated)]
            let mut device = Device::ndarray();
            device
                .configure(FloatDType::F64)
                .expect("ndarray supports f64");
            device
        })
        .clone()
}

fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64(seed);
    (0..len).map(|_| rng.uniform()).collect()
}

fn tensor<const D: usize>(values: Vec<f64>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.try_into_vec_as::<f64>().unwrap()
}

/// Which tensor of the layer a gradient is checked for.
#[derive(Clone, Copy, Debug)]
enum Target {
    Input,
    Router,
    ExpertIn,
    ExpertOut,
}

struct Problem {
    moe: Moe,
    x: Vec<f64>,
    x_shape: [usize; 2],
    r: Vec<f64>,
}

impl Problem {
    /// The loss for the given input and layer, as a plain number (no gradient).
    fn loss(&self, moe: &Moe, x: Vec<f64>) -> f64 {
        let device = device();
        let out = moe.forward_with_mode(tensor(x, self.x_shape, &device), RoutingMode::Eval);
        let r = tensor(self.r.clone(), self.x_shape, &device);
        host((out.output * r).sum() + out.aux_loss)[0]
    }

    /// A copy of the layer with `target` replaced by `values` (inputs are not in the layer).
    fn with(&self, target: Target, values: Vec<f64>) -> Moe {
        let device = device();
        let mut moe = self.moe.clone();
        match target {
            Target::Input => {}
            Target::Router => {
                let shape = moe.router.weight.shape().dims::<2>();
                moe.router.weight = Param::from_tensor(tensor(values, shape, &device));
            }
            Target::ExpertIn => {
                let shape = moe.experts.w_in.shape().dims::<3>();
                moe.experts.w_in = Param::from_tensor(tensor(values, shape, &device));
            }
            Target::ExpertOut => {
                let shape = moe.experts.w_out.shape().dims::<3>();
                moe.experts.w_out = Param::from_tensor(tensor(values, shape, &device));
            }
        }
        moe
    }

    fn values_of(&self, target: Target) -> Vec<f64> {
        match target {
            Target::Input => self.x.clone(),
            Target::Router => host(self.moe.router.weight.val()),
            Target::ExpertIn => host(self.moe.experts.w_in.val()),
            Target::ExpertOut => host(self.moe.experts.w_out.val()),
        }
    }

    /// Central difference of the loss along coordinate `i` of `target`.
    fn finite_difference(&self, target: Target, i: usize) -> f64 {
        let eps = 1e-6;
        let mut plus = self.values_of(target);
        let mut minus = plus.clone();
        plus[i] += eps;
        minus[i] -= eps;
        let eval = |values: Vec<f64>| match target {
            Target::Input => self.loss(&self.moe, values),
            _ => self.loss(&self.with(target, values), self.x.clone()),
        };
        (eval(plus) - eval(minus)) / (2.0 * eps)
    }

    /// Autodiff gradients of every target.
    fn autodiff(&self) -> Vec<(Target, Vec<f64>)> {
        let device = device().autodiff();
        let moe = self.moe.clone().train();
        let x = tensor(self.x.clone(), self.x_shape, &device).require_grad();
        let out = moe.forward_with_mode(x.clone(), RoutingMode::Eval);
        let r = tensor(self.r.clone(), self.x_shape, &device);
        let grads = ((out.output * r).sum() + out.aux_loss).backward();
        vec![
            (Target::Input, host(x.grad(&grads).unwrap())),
            (
                Target::Router,
                host(moe.router.weight.val().grad(&grads).unwrap()),
            ),
            (
                Target::ExpertIn,
                host(moe.experts.w_in.val().grad(&grads).unwrap()),
            ),
            (
                Target::ExpertOut,
                host(moe.experts.w_out.val().grad(&grads).unwrap()),
            ),
        ]
    }
}

fn check(name: &str, config: MoeConfig, tokens: usize, seed: u64) {
    let device = device();
    device.seed(seed);
    let d_model = config.d_model;
    let problem = Problem {
        moe: config.init(&device).unwrap(),
        x: random(tokens * d_model, seed + 1),
        x_shape: [tokens, d_model],
        r: random(tokens * d_model, seed + 2),
    };
    let mut rng = SplitMix64(seed + 3);
    for (target, gradient) in problem.autodiff() {
        assert!(
            gradient.iter().any(|g| g.abs() > 1e-8),
            "{name}: {target:?} has no gradient"
        );
        for _ in 0..6 {
            let i = rng.below(gradient.len());
            let numeric = problem.finite_difference(target, i);
            let analytic = gradient[i];
            assert!(
                (numeric - analytic).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{name}: d loss / d {target:?}[{i}]: autodiff {analytic}, finite difference {numeric}"
            );
        }
    }
}

fn config(gate: GateConfig, top_k: usize, kind: ExpertKind) -> MoeConfig {
    MoeConfig::new(5, 4, ExpertConfig::new(7).with_kind(kind))
        .with_top_k(top_k)
        .with_gate(gate)
        .with_losses(
            LossConfig::new()
                .with_balance_weight(0.3)
                .with_z_loss_weight(0.05),
        )
}

#[test]
fn gradients_match_finite_differences_for_every_gate() {
    let ffn = ExpertKind::Ffn(moe_core::Activation::Gelu);
    let cases = [
        ("naive", config(GateConfig::naive(), 2, ffn)),
        ("softmax top-k", config(GateConfig::softmax_top_k(), 2, ffn)),
        ("noisy", config(GateConfig::noisy(), 2, ffn)),
        ("gshard", config(GateConfig::gshard(), 2, ffn)),
        ("switch", config(GateConfig::switch(), 1, ffn)),
        ("expert choice", config(GateConfig::expert_choice(), 2, ffn)),
        (
            "swiglu + shared",
            config(GateConfig::softmax_top_k(), 2, ExpertKind::SwiGlu).with_shared_experts(1),
        ),
        (
            "capacity drops",
            config(GateConfig::softmax_top_k(), 2, ffn).with_capacity(
                CapacityConfig::new()
                    .with_eval_factor(0.5)
                    .with_min_capacity(1),
            ),
        ),
    ];
    for (i, (name, config)) in cases.into_iter().enumerate() {
        check(name, config, 12, 40 + 10 * i as u64);
    }
}
