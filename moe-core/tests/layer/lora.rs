//! LoRA adapters on the layer's router and experts: the merged weights against a hand sum, the
//! adapted layer against the loop reference on those weights, gradients against finite
//! differences, and the refusals.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Distribution, Tensor};
use moe_core::lora::{self, LoraAdapter, LoraConfig, LoraTarget};
use moe_core::reference::ReferenceMoe;
use moe_core::{
    Activation, CapacityConfig, ExpertConfig, ExpertKind, GateConfig, Moe, MoeConfig, MoeError,
};

use crate::common::{assert_close, cpu, matrix, random_values, values};

/// Replaces every parameter whose path ends in `suffix` with values drawn from
/// `U(-0.5, 0.5)`, keeping its id and whether it trains; records the paths it saw.
struct Redraw {
    suffix: &'static str,
    path: Vec<String>,
    seen: Vec<String>,
}

impl Redraw {
    fn new(suffix: &'static str) -> Self {
        Self {
            suffix,
            path: Vec::new(),
            seen: Vec::new(),
        }
    }
}

impl ModuleMapper for Redraw {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        self.seen.push(path.clone());
        if !path.ends_with(self.suffix) {
            return param;
        }
        param.map(|tensor| {
            let trains = tensor.is_require_grad();
            Tensor::random(
                tensor.shape(),
                Distribution::Uniform(-0.5, 0.5),
                &tensor.device(),
            )
            .set_require_grad(trains)
        })
    }
}

fn layer_config(kind: ExpertKind, capacity: CapacityConfig) -> MoeConfig {
    MoeConfig::new(6, 4, ExpertConfig::new(10).with_kind(kind))
        .with_top_k(2)
        .with_gate(GateConfig::softmax_top_k())
        .with_capacity(capacity)
        .with_shared_experts(1)
        .with_shared_d_hidden(Some(7))
        .with_shared_gate(true)
}

/// A layer with adapters on its router and experts whose `B` factors are not zero.
fn adapted_layer(kind: ExpertKind, capacity: CapacityConfig, device: &Device) -> Moe {
    device.seed(7);
    let moe = layer_config(kind, capacity).init(device).unwrap();
    let config = LoraConfig::new(3)
        .with_alpha(Some(4.5))
        .with_targets(vec![LoraTarget::Router, LoraTarget::Experts]);
    let moe = lora::attach(moe, &config).unwrap();
    moe.map(&mut Redraw::new("lora.b"))
}

/// `W_0 + s A B` of one `[E, d_in, d_out]` weight by loops over host values.
fn merged_by_hand(weight: &Param<Tensor<3>>) -> Vec<f64> {
    let adapter: &LoraAdapter = weight.reparameterization().expect("an adapter");
    let [e_count, d_in, d_out] = weight.shape().dims::<3>();
    let rank = adapter.rank();
    let (base, a, b) = (
        values(weight.base()),
        values(adapter.a.val()),
        values(adapter.b.val()),
    );
    let mut merged = base;
    for e in 0..e_count {
        for i in 0..d_in {
            for j in 0..d_out {
                let update: f64 = (0..rank)
                    .map(|r| a[(e * d_in + i) * rank + r] * b[(e * rank + r) * d_out + j])
                    .sum();
                merged[(e * d_in + i) * d_out + j] += adapter.scale * update;
            }
        }
    }
    merged
}

#[test]
fn adapters_sit_under_their_weights_and_merge_to_the_hand_sum() {
    let device = cpu();
    let moe = adapted_layer(ExpertKind::SwiGlu, CapacityConfig::dropless(), &device);
    let mut paths = Redraw::new("-");
    let moe = moe.map(&mut paths);
    for expected in [
        "router.weight.lora.a",
        "router.weight.lora.b",
        "experts.w_in.lora.a",
        "experts.w_gate.lora.b",
        "experts.w_out.lora.a",
        "shared_experts.w_out.lora.b",
        "shared_gate.lora.a",
    ] {
        assert!(
            paths.seen.iter().any(|p| p == expected),
            "{expected} not among {:?}",
            paths.seen
        );
    }
    // Router, shared gate, three routed and three shared expert weights.
    assert_eq!(lora::adapter_count(&moe), 8);
    let adapter: &LoraAdapter = moe.experts.w_in.reparameterization().unwrap();
    assert_eq!(adapter.a.shape().dims::<3>(), [4, 6, 3]);
    assert_eq!(adapter.b.shape().dims::<3>(), [4, 3, 10]);
    assert_eq!(adapter.scale, 1.5);
    for (name, weight) in [
        ("w_in", &moe.experts.w_in),
        ("w_out", &moe.experts.w_out),
        (
            "shared w_gate",
            moe.shared_experts
                .as_ref()
                .unwrap()
                .w_gate
                .as_ref()
                .unwrap(),
        ),
    ] {
        assert_close(name, &values(weight.val()), &merged_by_hand(weight), 1e-6);
    }
}

#[test]
fn adapted_layer_matches_the_reference_on_merged_weights() {
    let device = cpu();
    let capacities = [
        ("dropless", CapacityConfig::dropless()),
        ("capacity", CapacityConfig::new().with_eval_factor(0.75)),
    ];
    for kind in [ExpertKind::Ffn(Activation::Gelu), ExpertKind::SwiGlu] {
        for (name, capacity) in capacities.clone() {
            let moe = adapted_layer(kind, capacity, &device).valid();
            let tokens = 23;
            let x = random_values(tokens * 6, 5);
            let out = moe.forward(matrix(&x, tokens, 6, &device));
            // The reference reads each weight's `val()`, `W_0 + s A B`; the layer computes
            // `x W_0 + s (x A) B`.
            let reference = ReferenceMoe::from_module(&moe)
                .forward(&x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
            let what = format!("{kind:?}, {name}");
            assert_close(&what, &values(out.output.clone()), &reference.output, 1e-5);

            // Merging the adapters into the weights gives the same layer.
            let merged = moe.clone().materialize();
            assert_eq!(lora::adapter_count(&merged), 0, "{what}: merged");
            let again = merged.forward(matrix(&x, tokens, 6, &device));
            assert_close(&what, &values(again.output), &values(out.output), 1e-5);
        }
    }
}

/// Sum of squares of the layer's output plus its auxiliary loss, for `x`.
fn loss(moe: &Moe, x: &[f32], device: &Device) -> Tensor<1> {
    let out = moe.forward(matrix(x, x.len() / 6, 6, device));
    out.output.powi_scalar(2).sum() + out.aux_loss
}

#[test]
fn only_the_adapters_train_and_their_gradients_match_finite_differences() {
    let device = cpu().autodiff();
    let moe = adapted_layer(ExpertKind::SwiGlu, CapacityConfig::dropless(), &device);
    let x = random_values(9 * 6, 11);
    let grads = loss(&moe, &x, &device).backward();
    assert!(
        moe.experts.w_in.base().grad(&grads).is_none(),
        "the base weights are frozen"
    );
    assert!(moe.router.weight.base().grad(&grads).is_none());
    let adapter: &LoraAdapter = moe.experts.w_out.reparameterization().unwrap();
    let grad_b = values(adapter.b.val().grad(&grads).expect("B trains"));
    let grad_a = values(
        moe.router
            .weight
            .reparameterization::<LoraAdapter>()
            .unwrap()
            .a
            .val()
            .grad(&grads)
            .expect("A trains"),
    );

    // Central differences in f64 on the layer without autodiff, one entry of each factor.
    let host = cpu();
    let plain = moe.valid();
    let step = 1e-3;
    let nudged = |path: &'static str, index: usize, by: f64| -> f64 {
        let mut nudge = Nudge {
            path,
            index,
            by,
            current: Vec::new(),
        };
        let moe = plain.clone().map(&mut nudge);
        f64::from(loss(&moe, &x, &host).into_scalar::<f32>())
    };
    for (path, index, analytic) in [
        ("experts.w_out.lora.b", 17, grad_b[17]),
        ("router.weight.lora.a", 5, grad_a[5]),
    ] {
        let numeric = (nudged(path, index, step) - nudged(path, index, -step)) / (2.0 * step);
        assert!(
            (numeric - analytic).abs() < 2e-2 * (1.0 + analytic.abs()),
            "{path}[{index}]: finite difference {numeric}, autodiff {analytic}"
        );
    }
}

/// Adds `by` to element `index` (row-major) of the parameter at `path`.
struct Nudge {
    path: &'static str,
    index: usize,
    by: f64,
    current: Vec<String>,
}

impl ModuleMapper for Nudge {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.current.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.current.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.current.join(".") != self.path {
            return param;
        }
        let (index, by) = (self.index, self.by);
        param.map(|tensor| {
            let shape = tensor.shape();
            let mut data = values(tensor.clone());
            data[index] += by;
            let data: Vec<f32> = data.into_iter().map(|v| v as f32).collect();
            Tensor::<1>::from_floats(data.as_slice(), &tensor.device()).reshape(shape)
        })
    }
}

#[test]
fn attach_refuses_what_it_cannot_do() {
    let device = cpu();
    let moe = || {
        layer_config(ExpertKind::SwiGlu, CapacityConfig::dropless())
            .init(&device)
            .unwrap()
    };
    let error = lora::attach(moe(), &LoraConfig::new(0)).unwrap_err();
    assert!(
        matches!(error, MoeError::Zero { field: "lora.rank" }),
        "{error}"
    );
    let error = lora::attach(moe(), &LoraConfig::new(2).with_alpha(Some(f64::NAN))).unwrap_err();
    assert!(error.to_string().contains("lora.alpha"), "{error}");
    // A bare layer has no attention.
    let error = lora::attach(moe(), &LoraConfig::new(2)).unwrap_err();
    assert!(error.to_string().contains("match no weight"), "{error}");
    let config = LoraConfig::new(2).with_targets(vec![LoraTarget::Experts]);
    let adapted = lora::attach(moe(), &config).unwrap();
    let error = lora::attach(adapted, &config).unwrap_err();
    assert!(
        error.to_string().contains("already has LoRA adapters"),
        "{error}"
    );
}
