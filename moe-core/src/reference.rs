//! A deliberately simple Mixture-of-Experts forward pass, and small helpers, for tests.
//!
//! Plain loops on the host, in `f64`, over tokens and the experts they chose: no gather, no
//! scatter, no buffers. It shares no routing or dispatch code with the layer, so comparing the
//! two checks the layer's tensor formulation. It routes as the layer does in evaluation (no
//! noise, no jitter, no random routing, the evaluation capacity factor). Slow by design.

use burn::tensor::Tensor;

use crate::gate::GateConfig;
use crate::rng::SplitMix64;
use crate::{Activation, CapacityConfig, DropPolicy, ExpertKind, Experts, Moe};

/// A [`Moe`] layer's weights copied to the host, with a loop-based forward pass.
#[derive(Debug, Clone)]
pub struct ReferenceMoe {
    d_model: usize,
    num_experts: usize,
    top_k: usize,
    gate: GateConfig,
    capacity: CapacityConfig,
    routed_scale: f64,
    router: Vec<f64>,
    selection_bias: Option<Vec<f64>>,
    experts: Vec<ReferenceExpert>,
    shared: Option<ReferenceExpert>,
    /// The shared experts' sigmoid gate weight, `[d_model]`.
    shared_gate: Option<Vec<f64>>,
}

/// Output of [`ReferenceMoe::forward`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceOutput {
    /// Layer output, `[tokens * d_model]`, row-major.
    pub output: Vec<f64>,
    /// The (token, expert) pairs the experts processed, sorted.
    pub kept: Vec<(usize, usize)>,
    /// Gate weight of each kept pair, in the order of `kept`.
    pub kept_weights: Vec<f64>,
}

#[derive(Debug, Clone)]
struct ReferenceExpert {
    kind: ExpertKind,
    d_hidden: usize,
    w_in: Vec<f64>,
    b_in: Option<Vec<f64>>,
    w_gate: Option<Vec<f64>>,
    w_out: Vec<f64>,
    b_out: Option<Vec<f64>>,
}

impl ReferenceMoe {
    /// Copies the layer's weights (reads them back from the device).
    pub fn from_module(moe: &Moe) -> Self {
        let config = moe.config();
        let num_experts = config.num_experts;
        let experts = (0..num_experts)
            .map(|e| ReferenceExpert::from_stack(&moe.experts, e))
            .collect();
        Self {
            d_model: config.d_model,
            num_experts,
            top_k: config.top_k,
            gate: config.gate.clone(),
            capacity: config.capacity.clone(),
            routed_scale: config.routed_scale,
            router: host(moe.router.weight.val()),
            selection_bias: moe.router.selection_bias.as_ref().map(|b| host(b.val())),
            experts,
            shared: moe
                .shared_experts
                .as_ref()
                .map(|shared| ReferenceExpert::from_stack(shared, 0)),
            shared_gate: moe.shared_gate.as_ref().map(|gate| host(gate.val())),
        }
    }

    /// The layer's output for `x` (`[tokens * d_model]`, row-major), routing as in evaluation.
    pub fn forward(&self, x: &[f64]) -> ReferenceOutput {
        let d = self.d_model;
        let num_tokens = x.len() / d;
        let e_count = self.num_experts;

        // Router logits and probabilities of every token.
        let mut logits = vec![vec![0.0; e_count]; num_tokens];
        for (n, row) in logits.iter_mut().enumerate() {
            for (e, logit) in row.iter_mut().enumerate() {
                *logit = (0..d)
                    .map(|i| x[n * d + i] * self.router[i * e_count + e])
                    .sum();
            }
        }
        let probs: Vec<Vec<f64>> = logits.iter().map(|row| softmax(row)).collect();

        // Candidate (token, expert, weight) triples, per expert, in token order.
        let mut candidates: Vec<Vec<(usize, f64)>> = vec![Vec::new(); e_count];
        let assignments_per_token;
        if let GateConfig::ExpertChoice(_) = self.gate {
            assignments_per_token = 1;
            for (n, row) in probs.iter().enumerate() {
                for (e, &p) in row.iter().enumerate() {
                    candidates[e].push((n, p));
                }
            }
        } else {
            assignments_per_token = self.top_k;
            for n in 0..num_tokens {
                for (e, w) in self.token_choice(&logits[n], &probs[n]) {
                    candidates[e].push((n, w));
                }
            }
        }

        // Capacity.
        let dropless = self.capacity.dropless && !matches!(self.gate, GateConfig::ExpertChoice(_));
        let capacity = if dropless {
            usize::MAX
        } else {
            let expected = (assignments_per_token * num_tokens) as f64 / e_count as f64;
            let c = (expected * self.capacity.eval_factor).ceil() as usize;
            c.max(self.capacity.min_capacity).min(num_tokens).max(1)
        };
        let by_probability = matches!(self.gate, GateConfig::ExpertChoice(_))
            || self.capacity.drop_policy == DropPolicy::Probability;
        let mut kept = Vec::new();
        for (e, list) in candidates.iter_mut().enumerate() {
            if by_probability {
                // Stable sort: equal weights keep token order.
                list.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("finite weights"));
            }
            for &(n, w) in list.iter().take(capacity) {
                kept.push((n, e, w));
            }
        }
        kept.sort_by_key(|&(n, e, _)| (n, e));

        // Combine.
        let mut output = vec![0.0; num_tokens * d];
        for &(n, e, w) in &kept {
            let y = self.experts[e].forward(&x[n * d..(n + 1) * d]);
            for i in 0..d {
                output[n * d + i] += self.routed_scale * w * y[i];
            }
        }
        if let Some(shared) = &self.shared {
            for n in 0..num_tokens {
                let token = &x[n * d..(n + 1) * d];
                let y = shared.forward(token);
                // sigmoid(x . w_s), a plain loop.
                let scale = self.shared_gate.as_ref().map_or(1.0, |w| {
                    let z: f64 = token.iter().zip(w).map(|(a, b)| a * b).sum();
                    1.0 / (1.0 + (-z).exp())
                });
                for i in 0..d {
                    output[n * d + i] += scale * y[i];
                }
            }
        }
        ReferenceOutput {
            output,
            kept: kept.iter().map(|&(n, e, _)| (n, e)).collect(),
            kept_weights: kept.iter().map(|&(_, _, w)| w).collect(),
        }
    }

    /// The experts one token chooses and their combine weights, for a token-choice gate.
    fn token_choice(&self, logits: &[f64], probs: &[f64]) -> Vec<(usize, f64)> {
        let scores: Vec<f64> = match &self.selection_bias {
            Some(bias) => logits.iter().zip(bias).map(|(l, b)| l + b).collect(),
            None => logits.to_vec(),
        };
        let k = self.top_k;
        let chosen = top_k(&scores, k);
        let weights: Vec<f64> = match &self.gate {
            GateConfig::Naive(_) | GateConfig::Noisy(_) => {
                softmax(&chosen.iter().map(|&e| logits[e]).collect::<Vec<_>>())
            }
            GateConfig::SoftmaxTopK(gate) => {
                let picked: Vec<f64> = chosen.iter().map(|&e| probs[e]).collect();
                let total: f64 = picked.iter().sum();
                if gate.renormalize {
                    picked.iter().map(|p| p / total).collect()
                } else {
                    picked
                }
            }
            GateConfig::GShard(_) => {
                let total = probs[chosen[0]] + probs[chosen[1]];
                vec![probs[chosen[0]] / total, probs[chosen[1]] / total]
            }
            GateConfig::Switch(_) => vec![probs[chosen[0]]],
            GateConfig::ExpertChoice(_) => unreachable!("expert choice is not a token choice"),
        };
        chosen.into_iter().zip(weights).collect()
    }
}

impl ReferenceExpert {
    fn from_stack(stack: &Experts, e: usize) -> Self {
        let slice3 = |t: Tensor<3>| {
            let [_, a, b] = t.dims();
            host(t.narrow(0, e, 1).reshape([a * b]))
        };
        let slice2 = |t: Tensor<2>| {
            let [_, a] = t.dims();
            host(t.narrow(0, e, 1).reshape([a]))
        };
        Self {
            kind: stack.kind,
            d_hidden: stack.d_hidden(),
            w_in: slice3(stack.w_in.val()),
            b_in: stack.b_in.as_ref().map(|b| slice2(b.val())),
            w_gate: stack.w_gate.as_ref().map(|w| slice3(w.val())),
            w_out: slice3(stack.w_out.val()),
            b_out: stack.b_out.as_ref().map(|b| slice2(b.val())),
        }
    }

    fn forward(&self, x: &[f64]) -> Vec<f64> {
        let d = x.len();
        let h = self.d_hidden;
        let project = |w: &[f64], j: usize| (0..d).map(|i| x[i] * w[i * h + j]).sum::<f64>();
        let hidden: Vec<f64> = (0..h)
            .map(|j| {
                let mut value = project(&self.w_in, j);
                if let Some(b) = &self.b_in {
                    value += b[j];
                }
                match self.kind {
                    ExpertKind::Ffn(Activation::Gelu) => {
                        0.5 * value * (1.0 + libm::erf(value / std::f64::consts::SQRT_2))
                    }
                    ExpertKind::Ffn(Activation::Relu) => value.max(0.0),
                    ExpertKind::Ffn(Activation::Silu) => value / (1.0 + (-value).exp()),
                    ExpertKind::SwiGlu => {
                        let gate = project(self.w_gate.as_ref().expect("SwiGLU gate"), j);
                        gate / (1.0 + (-gate).exp()) * value
                    }
                }
            })
            .collect();
        (0..d)
            .map(|i| {
                let mut value: f64 = (0..h).map(|j| hidden[j] * self.w_out[j * d + i]).sum();
                if let Some(b) = &self.b_out {
                    value += b[i];
                }
                value
            })
            .collect()
    }
}

/// Indices of the `k` largest scores, largest first; equal scores in index order.
fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).expect("finite scores"));
    order.truncate(k);
    order
}

fn softmax(values: &[f64]) -> Vec<f64> {
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = values.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|v| v / total).collect()
}

/// A float tensor's values on the host, as `f64`.
pub fn host<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    tensor
        .try_into_vec_as::<f64>()
        .expect("a float tensor converts to f64")
}

/// `len` values drawn uniformly from `[-1, 1)` with a fixed seed.
pub fn random_values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..len).map(|_| rng.uniform() as f32).collect()
}
