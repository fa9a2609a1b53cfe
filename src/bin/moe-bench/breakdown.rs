//! W6 taken apart (`--only w6-ops`): every operation of W6's layer timed on its own, forward
//! and backward, so that each change to the layer is chosen by what it removes.
//!
//! Each operation runs on the inputs the layer gives it (the same seed, router and tokens), as
//! leaves of the autodiff graph. Its forward time is the median of running it; its backward
//! time is the median time of back-propagating `Σ sum(out * g)` (a fixed random `g` per
//! output), less that of the same probe's backward on leaves of the outputs' shapes. The
//! operations' sum is printed beside the whole layer's time. What the parts do not account
//! for is the layer's glue (auxiliary loss, statistics), the autodiff graph's bookkeeping and
//! the caches: an operation timed alone finds its inputs in cache, in the layer it finds them
//! where the operations before it left them.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor};
use burn_moe::core::dispatch::DispatchPlan;
use burn_moe::core::gate::{
    assignment_fraction, to_expert_matrix, top_k_indices, GateInput, GateOutput,
};
use burn_moe::core::losses::load_balancing_loss;
use burn_moe::core::{gelu, Activation, ExpertConfig, ExpertKind, Experts, Moe, RoutingMode};
use burn_moe::kernels::{batched_matmul, grouped_bias, grouped_matmul, softmax};
use serde::Serialize;

use crate::granularity::{ACTIVE_HIDDEN, D_MODEL, TOKENS};
use crate::layer::benchmark_layer;
use crate::timing::median;

/// The layers taken apart: `(experts, top_k)`, `(1, 1)` for the dense FFN of width 512.
pub const SHAPES: [(usize, usize); 3] = [(1, 1), (16, 4), (64, 16)];

/// One operation of one layer.
#[derive(Debug, Clone, Serialize)]
pub struct OperationRow {
    /// Experts of the layer (1: the dense FFN).
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// What the operation is; "layer" for the whole layer, "sum" for the operations' sum.
    pub operation: String,
    /// Median milliseconds of the forward pass.
    pub forward_ms: f64,
    /// Median milliseconds of the backward pass (see the module docs).
    pub backward_ms: f64,
}

/// An operation on leaves of the autodiff graph, giving its float outputs as matrices.
type Operation<'a> = Box<dyn Fn() -> Vec<Tensor<2>> + 'a>;

/// `x` as a new leaf that takes a gradient.
fn leaf<const D: usize>(x: &Tensor<D>) -> Tensor<D> {
    x.clone().detach().require_grad()
}

/// Times every operation of each layer of [`SHAPES`].
pub fn measure(device: &Device, warmup: usize, repeats: usize) -> Vec<OperationRow> {
    let device = device.clone().autodiff();
    SHAPES
        .iter()
        .flat_map(|&(experts, top_k)| {
            let operations = match experts {
                1 => dense_operations(&device),
                _ => moe_operations(&device, experts, top_k),
            };
            let mut rows: Vec<OperationRow> = operations
                .into_iter()
                .map(|(name, operation)| {
                    let [forward, backward] = time(&device, &operation, warmup, repeats);
                    OperationRow {
                        experts,
                        top_k,
                        operation: name.into(),
                        forward_ms: forward * 1e3,
                        backward_ms: backward * 1e3,
                    }
                })
                .collect();
            let parts = &rows[..rows.len() - 1];
            let counted = parts.iter().filter(|row| !row.operation.starts_with(' '));
            let sum = |get: fn(&OperationRow) -> f64| counted.clone().map(get).sum::<f64>();
            let total = OperationRow {
                experts,
                top_k,
                operation: "sum of the operations".into(),
                forward_ms: sum(|row| row.forward_ms),
                backward_ms: sum(|row| row.backward_ms),
            };
            rows.push(total);
            rows
        })
        .collect()
}

/// `[forward, backward]` median seconds of `operation`.
fn time(device: &Device, operation: &Operation, warmup: usize, repeats: usize) -> [f64; 2] {
    let sample = operation();
    let upstream: Vec<Tensor<2>> = sample
        .iter()
        .map(|out| Tensor::random(out.dims(), Distribution::Normal(0.0, 1.0), device))
        .collect();
    let on_leaves = || sample.iter().map(leaf).collect::<Vec<_>>();
    let mut forward = Vec::new();
    let mut backward = Vec::new();
    for round in 0..warmup + repeats.max(1) {
        let start = Instant::now();
        let outputs = operation();
        device.sync().expect("device sync");
        let seconds = start.elapsed().as_secs_f64();
        let with_operation = backward_seconds(device, outputs, &upstream);
        let probe_alone = backward_seconds(device, on_leaves(), &upstream);
        if round >= warmup {
            forward.push(seconds);
            backward.push(with_operation - probe_alone);
        }
    }
    [median(forward), median(backward).max(0.0)]
}

/// Seconds of the backward pass of `Σ sum(outputs[i] * upstream[i])`, the forward of that
/// sum not counted (0 for an operation without float outputs). The random `upstream` makes
/// each output's gradient a dense tensor like the one the layer's backward pass hands it (a
/// plain sum would hand it a broadcast constant, which some backward steps read for free).
fn backward_seconds(device: &Device, outputs: Vec<Tensor<2>>, upstream: &[Tensor<2>]) -> f64 {
    if outputs.is_empty() {
        return 0.0;
    }
    let sums: Vec<Tensor<1>> = outputs
        .into_iter()
        .zip(upstream)
        .map(|(out, g)| (out * g.clone()).sum())
        .collect();
    let loss = Tensor::cat(sums, 0).sum();
    device.sync().expect("device sync");
    let start = Instant::now();
    let _ = loss.backward();
    device.sync().expect("device sync");
    start.elapsed().as_secs_f64()
}

/// Tokens of W6's step.
fn tokens(device: &Device) -> Tensor<2> {
    device.seed(6);
    Tensor::random([TOKENS, D_MODEL], Distribution::Normal(0.0, 1.0), device)
}

/// The dense FFN's operations: `gelu(x W_in + b_in) W_out + b_out`, then the whole.
fn dense_operations(device: &Device) -> Vec<(&'static str, Operation<'static>)> {
    let x = tokens(device).unsqueeze_dim::<3>(0);
    let ffn = ExpertConfig::new(ACTIVE_HIDDEN)
        .with_kind(ExpertKind::Ffn(Activation::Gelu))
        .init(1, D_MODEL, device);
    let flat = |y: Tensor<3>| vec![y.squeeze_dim::<2>(0)];
    let hidden = batched_matmul(x.clone(), ffn.w_in.val()).detach();
    let b_in = ffn.b_in.as_ref().expect("FFN bias").val();
    let w_out = ffn.w_out.val();
    let b_out = ffn.b_out.as_ref().expect("FFN bias").val();
    let output = batched_matmul(gelu(hidden.clone()), w_out.clone()).detach();
    let w_in = ffn.w_in.val();
    vec![
        ("up product", {
            let (x, w_in) = (x.clone(), w_in);
            Box::new(move || flat(batched_matmul(leaf(&x), leaf(&w_in))))
        }),
        ("up bias", {
            let (hidden, b_in) = (hidden.clone(), b_in);
            Box::new(move || flat(leaf(&hidden) + leaf(&b_in).unsqueeze_dim(1)))
        }),
        ("activation", {
            let hidden = hidden.clone();
            Box::new(move || flat(gelu(leaf(&hidden))))
        }),
        ("down product", {
            let (hidden, w_out) = (gelu(hidden), w_out);
            Box::new(move || flat(batched_matmul(leaf(&hidden), leaf(&w_out))))
        }),
        ("down bias", {
            Box::new(move || flat(leaf(&output) + leaf(&b_out).unsqueeze_dim(1)))
        }),
        ("layer", Box::new(move || flat(ffn.forward(leaf(&x))))),
    ]
}

/// The MoE layer's operations in the order the forward pass runs them, then the whole.
fn moe_operations(
    device: &Device,
    experts: usize,
    top_k: usize,
) -> Vec<(&'static str, Operation<'static>)> {
    let x = tokens(device);
    let moe = benchmark_layer(D_MODEL, ACTIVE_HIDDEN / top_k, experts, top_k, true)
        .init(device)
        .expect("valid config");
    let route = {
        let moe = moe.clone();
        move |x: Tensor<2>| -> GateOutput {
            moe.config().gate.route(GateInput {
                x,
                router: &moe.router,
                top_k,
                mode: RoutingMode::Train,
            })
        }
    };
    let gate = route(x.clone());
    let slots = TOKENS * top_k;
    let plan = DispatchPlan::dropless(gate.candidates.clone(), gate.weights.clone(), slots);
    let offsets = plan.offsets.clone();
    let buffer = plan.dispatch(x.clone()).detach();
    let chain = ExpertChain::new(&moe.experts, &buffer, &offsets);

    let mut operations: Vec<(&'static str, Operation<'static>)> =
        vec![("router (gate and balancing loss)", {
            let (x, route) = (x.clone(), route.clone());
            Box::new(move || {
                let gate = route(leaf(&x));
                let loss = gate.balance_loss.expect("softmax top-k balances");
                vec![gate.weights, loss.reshape([1, 1])]
            })
        })];
    operations.extend(router_parts(&moe, &x, top_k));
    operations.extend::<Vec<(&'static str, Operation<'static>)>>(vec![
        ("plan", {
            let (candidates, weights) = (gate.candidates.clone(), gate.weights.clone());
            Box::new(move || {
                let plan = DispatchPlan::dropless(candidates.clone(), leaf(&weights), slots);
                vec![plan.weight_of_slot.reshape([slots, 1])]
            })
        }),
        ("dispatch (gather)", {
            let (x, plan) = (x.clone(), plan.clone());
            Box::new(move || vec![plan.dispatch(leaf(&x))])
        }),
    ]);
    operations.extend(chain.operations());
    operations.push(("combine", {
        let (plan, output) = (plan.clone(), chain.output.clone());
        let weight = plan.weight_of_slot.clone().detach();
        Box::new(move || {
            let mut plan = plan.clone();
            plan.weight_of_slot = leaf(&weight);
            vec![plan.combine(leaf(&output), TOKENS)]
        })
    }));
    operations.push(("layer", {
        Box::new(move || {
            let out = moe.forward_with_mode(leaf(&x), RoutingMode::Train);
            vec![out.output, out.aux_loss.reshape([1, 1])]
        })
    }));
    operations
}

/// The softmax top-k gate's steps ([`burn_moe::core::gate`]), each on its own; the router
/// row above times them together. Parts of the router, not counted in the sum.
fn router_parts(moe: &Moe, x: &Tensor<2>, top_k: usize) -> Vec<(&'static str, Operation<'static>)> {
    let experts = moe.router.num_experts();
    let logits = moe.router.logits(x.clone()).detach();
    let probs = softmax(logits.clone(), 1);
    let indices = top_k_indices(logits.clone(), top_k);
    let chosen = probs.clone().gather(1, indices.clone());
    let (_, candidates) = to_expert_matrix(indices.clone(), chosen.clone(), experts);
    let weights_of = move |probs: Tensor<2>, indices: &Tensor<2, Int>| {
        let chosen = probs.gather(1, indices.clone());
        let chosen = chosen.clone() / chosen.sum_dim(1);
        to_expert_matrix(indices.clone(), chosen, experts).0
    };
    let router = moe.router.clone();
    vec![
        ("  router: logits", {
            let x = x.clone();
            Box::new(move || vec![router.logits(leaf(&x))])
        }),
        ("  router: softmax", {
            let logits = logits.clone();
            Box::new(move || vec![softmax(leaf(&logits), 1)])
        }),
        ("  router: top-k", {
            Box::new(move || {
                let _ = top_k_indices(logits.clone(), top_k);
                Vec::new()
            })
        }),
        ("  router: weights matrix", {
            let probs = probs.clone();
            Box::new(move || vec![weights_of(leaf(&probs), &indices)])
        }),
        ("  router: balancing loss", {
            Box::new(move || {
                let fraction = assignment_fraction(candidates.clone(), top_k);
                vec![load_balancing_loss(leaf(&probs), fraction).reshape([1, 1])]
            })
        }),
    ]
}

/// The experts' four steps on the ragged buffer, with each step's input.
struct ExpertChain {
    buffer: Tensor<2>,
    hidden: Tensor<2>,
    activated: Tensor<2>,
    projected: Tensor<2>,
    output: Tensor<2>,
    w_in: Tensor<3>,
    b_in: Tensor<2>,
    w_out: Tensor<3>,
    b_out: Tensor<2>,
    offsets: Tensor<1, Int>,
}

impl ExpertChain {
    /// The intermediate values of `experts` on `buffer`.
    fn new(experts: &Experts, buffer: &Tensor<2>, offsets: &Tensor<1, Int>) -> Self {
        let w_in = experts.w_in.val().detach();
        let w_out = experts.w_out.val().detach();
        let b_in = experts.b_in.as_ref().expect("FFN bias").val().detach();
        let b_out = experts.b_out.as_ref().expect("FFN bias").val().detach();
        let product = grouped_matmul(buffer.clone(), w_in.clone(), offsets.clone());
        let hidden = grouped_bias(product, b_in.clone(), offsets.clone());
        let activated = gelu(hidden.clone());
        let projected = grouped_matmul(activated.clone(), w_out.clone(), offsets.clone());
        let output = grouped_bias(projected.clone(), b_out.clone(), offsets.clone());
        Self {
            buffer: buffer.clone(),
            hidden,
            activated,
            projected,
            output,
            w_in,
            b_in,
            w_out,
            b_out,
            offsets: offsets.clone(),
        }
    }

    /// The up product, its bias, the activation, the down product and its bias.
    fn operations(&self) -> Vec<(&'static str, Operation<'static>)> {
        let product = |x: &Tensor<2>, w: &Tensor<3>, offsets: &Tensor<1, Int>| -> Operation {
            let (x, w, offsets) = (x.clone(), w.clone(), offsets.clone());
            Box::new(move || vec![grouped_matmul(leaf(&x), leaf(&w), offsets.clone())])
        };
        let bias = |x: &Tensor<2>, b: &Tensor<2>, offsets: &Tensor<1, Int>| -> Operation {
            let (x, b, offsets) = (x.clone(), b.clone(), offsets.clone());
            Box::new(move || vec![grouped_bias(leaf(&x), leaf(&b), offsets.clone())])
        };
        let activated = self.hidden.clone();
        vec![
            (
                "up product",
                product(&self.buffer, &self.w_in, &self.offsets),
            ),
            ("up bias", bias(&self.hidden, &self.b_in, &self.offsets)),
            ("activation", Box::new(move || vec![gelu(leaf(&activated))])),
            (
                "down product",
                product(&self.activated, &self.w_out, &self.offsets),
            ),
            (
                "down bias",
                bias(&self.projected, &self.b_out, &self.offsets),
            ),
        ]
    }
}

/// Prints the rows as one table per layer.
pub fn print(rows: &[OperationRow]) {
    let mut layer = None;
    for row in rows {
        if layer != Some((row.experts, row.top_k)) {
            layer = Some((row.experts, row.top_k));
            let name = match row.experts {
                1 => format!("dense FFN of width {ACTIVE_HIDDEN}"),
                e => format!(
                    "{e} experts of width {}, top-{}",
                    ACTIVE_HIDDEN / row.top_k,
                    row.top_k
                ),
            };
            println!("\n{name}");
            println!(
                "{:<34} {:>11} {:>12}",
                "operation", "forward ms", "backward ms"
            );
        }
        println!(
            "{:<34} {:>11.3} {:>12.3}",
            row.operation, row.forward_ms, row.backward_ms
        );
    }
}
