//! Every operation of this crate on two devices from the same inputs: the outputs and the
//! gradients (of `Σ output · u` for a fixed random `u`), and their largest difference relative
//! to the reference's largest magnitude. `moe-bench gpu-check` runs it at GPU sizes against
//! flex (f32, and f16 where the device computes in it); the remote test runs it small.
//!
//! Integer outputs (top-k indices, scans, slot maps) must match exactly. In f16 the device
//! computes from f16 inputs and the reference in f32 from the same values rounded to f16, so
//! the difference measures the f16 computation alone.

use std::panic::{catch_unwind, AssertUnwindSafe};

use burn::tensor::{Device, FloatDType, Gradients, Int, Tensor, TensorData};

use crate::{AdamWStep, HeadLayout};

/// The sizes the operations run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Rows (tokens) of the row-wise operations.
    pub rows: usize,
    /// Width of a row (`d_model`).
    pub width: usize,
    /// Expert hidden width.
    pub hidden: usize,
    /// Experts (groups of the grouped matmul).
    pub experts: usize,
    /// Classes of the cross-entropy.
    pub classes: usize,
    /// Attention heads.
    pub heads: usize,
    /// Sequence length of the attention operations.
    pub sequence: usize,
}

impl Sizes {
    /// Small sizes, for tests on slow devices.
    pub fn small() -> Self {
        Self {
            rows: 24,
            width: 12,
            hidden: 20,
            experts: 3,
            classes: 30,
            heads: 2,
            sequence: 6,
        }
    }

    /// Sizes a GPU sees in the presets: 4,096 tokens of width 512, 16 experts of width 1,024
    /// (off the kernels' tile sizes by a few rows), a 6,000-word vocabulary, 8 heads of 128
    /// positions.
    pub fn gpu() -> Self {
        Self {
            rows: 4_100,
            width: 512,
            hidden: 1_000,
            experts: 16,
            classes: 6_000,
            heads: 8,
            sequence: 128,
        }
    }
}

/// One operation's comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The operation.
    pub name: &'static str,
    /// `f32` or `f16`.
    pub dtype: &'static str,
    /// The largest difference, relative to the reference's largest magnitude (0 for exact
    /// integer matches, infinity for a mismatch of shapes or integers).
    pub difference: f64,
    /// The largest difference allowed.
    pub tolerance: f64,
    /// Why the operation did not run, if it did not (the panic's message).
    pub error: Option<String>,
}

impl Outcome {
    /// Whether the operation ran and its difference is within the tolerance.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.difference <= self.tolerance
    }
}

/// What one operation returns for comparison: float tensors (outputs and gradients) and
/// integer ones.
#[derive(Default)]
struct Results {
    floats: Vec<Vec<f64>>,
    ints: Vec<Vec<i64>>,
}

impl Results {
    fn float<const D: usize>(mut self, tensor: Tensor<D>) -> Self {
        self.floats.push(host_floats(tensor));
        self
    }

    fn int<const D: usize>(mut self, tensor: Tensor<D, Int>) -> Self {
        self.ints
            .push(tensor.into_data().convert::<i64>().iter::<i64>().collect());
        self
    }
}

fn host_floats<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    tensor
        .cast(FloatDType::F32)
        .into_data()
        .iter::<f64>()
        .collect()
}

/// Deterministic values in `[-1, 1)`.
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Makes float inputs on one device, in one dtype, tracked for gradients.
struct Maker {
    device: Device,
    dtype: FloatDType,
    /// Round the values through f16 and compute in f32 (the reference of an f16 run).
    round_to_f16: bool,
}

impl Maker {
    fn tensor<const D: usize>(&self, shape: [usize; D], seed: u64) -> Tensor<D> {
        let mut values = random(shape.iter().product(), seed);
        if self.round_to_f16 {
            for value in &mut values {
                *value = burn::tensor::f16::from_f32(*value).to_f32();
            }
        }
        Tensor::<D>::from_data(TensorData::new(values, shape), &self.device)
            .cast(self.dtype)
            .require_grad()
    }

    /// A frozen weight of `shape` held in 8 bits (one scale for the tensor), the same bytes on
    /// every device: symmetric integers from a fixed pattern.
    fn quantized<const D: usize>(&self, shape: [usize; D]) -> Tensor<D> {
        use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};
        let count = shape.iter().product::<usize>();
        let values: Vec<i8> = (0..count).map(|i| ((i * 37) % 255) as i8).collect();
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q8S)
            .per_tensor(ScaleDtype::F32);
        let data = TensorData::quantized(values, shape, scheme, &[0.004], None);
        Tensor::<D>::from_data(data, &self.device)
    }

    fn ints<const D: usize>(&self, values: Vec<i64>, shape: [usize; D]) -> Tensor<D, Int> {
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }

    /// `Σ y · u` for a fixed random `u` of `y`'s shape: the loss whose gradients are compared.
    fn loss<const D: usize>(&self, y: Tensor<D>, seed: u64) -> Tensor<1> {
        let upstream = self.tensor(y.dims(), seed).detach();
        (y * upstream).sum()
    }
}

/// Group offsets for `rows` rows in `experts` groups: uneven, one group empty, and a few rows
/// of padding at the end.
fn group_offsets(rows: usize, experts: usize) -> Vec<i64> {
    let routed = rows - rows / 50;
    let mut offsets = vec![0i64];
    for e in 0..experts {
        let share = match e % 4 {
            1 => 0.0,
            2 => 1.6,
            _ => 1.0,
        };
        offsets.push(offsets[e] + (share * routed as f64 / experts as f64) as i64);
    }
    let last = offsets.len() - 1;
    offsets[last] = offsets[last].min(routed as i64);
    offsets
}

type Case = (&'static str, fn(&Maker, &Sizes) -> Results);

/// The operations, each with its forward and backward passes: a table, one entry per
/// operation, long by design.
fn cases() -> Vec<Case> {
    vec![
        ("gelu", |m, s| elementwise(m, s, crate::gelu)),
        ("silu", |m, s| elementwise(m, s, crate::silu)),
        ("softmax", |m, s| {
            elementwise(m, s, |x| crate::softmax(x, 1))
        }),
        ("log_softmax", |m, s| {
            elementwise(m, s, |x| crate::log_softmax(x, 1))
        }),
        ("causal_softmax", |m, s| {
            let x = m.tensor([1, s.heads, s.sequence, s.sequence], 1);
            let y = crate::causal_softmax(x.clone(), 0);
            gradients(m, y, &[&x])
        }),
        ("rms_norm", |m, s| {
            let (x, gamma) = (m.tensor([s.rows, s.width], 1), m.tensor([s.width], 2));
            let y = crate::rms_norm(x.clone(), gamma.clone(), 1e-5);
            gradients(m, y, &[&x, &gamma])
        }),
        ("rotary", |m, s| {
            let x = m.tensor([s.heads, s.sequence, 64], 1);
            let angles = m.tensor([s.sequence, 32], 2).detach();
            let y = crate::rotary(x.clone(), angles.clone().cos(), angles.sin());
            gradients(m, y, &[&x])
        }),
        ("cross_entropy", |m, s| {
            let logits = m.tensor([s.rows, s.classes], 1);
            let targets: Vec<i64> = (0..s.rows)
                .map(|r| ((r * 7919) % s.classes) as i64)
                .collect();
            let y = crate::cross_entropy(logits.clone(), m.ints(targets, [s.rows]));
            gradients(m, y, &[&logits])
        }),
        ("matmul", |m, s| {
            let (x, w) = (
                m.tensor([s.rows, s.width], 1),
                m.tensor([s.width, s.hidden], 2),
            );
            let y = crate::matmul(x.clone(), w.clone());
            gradients(m, y, &[&x, &w])
        }),
        ("batched_matmul", |m, s| {
            let x = m.tensor([s.experts, s.rows / s.experts, s.width], 1);
            let w = m.tensor([s.experts, s.width, s.hidden], 2);
            let y = crate::batched_matmul(x.clone(), w.clone());
            gradients(m, y, &[&x, &w])
        }),
        ("multi_head_matmul", |m, s| {
            let q = m.tensor([2, s.heads, s.sequence, 64], 1);
            let k = m.tensor([2, s.heads, 64, s.sequence], 2);
            let y = crate::multi_head_matmul(q.clone(), k.clone(), HeadLayout::Merged);
            gradients(m, y, &[&q, &k])
        }),
        ("grouped_matmul + bias", |m, s| {
            let x = m.tensor([s.rows, s.width], 1);
            let w = m.tensor([s.experts, s.width, s.hidden], 2);
            let bias = m.tensor([s.experts, s.hidden], 3);
            let offsets = m.ints(group_offsets(s.rows, s.experts), [s.experts + 1]);
            let y = crate::grouped_bias(
                crate::grouped_matmul(x.clone(), w.clone(), offsets.clone()),
                bias.clone(),
                offsets,
            );
            gradients(m, y, &[&x, &w, &bias])
        }),
        ("frozen_grouped_matmul (8-bit weight)", |m, s| {
            let x = m.tensor([s.rows, s.width], 1);
            let w = m.quantized([s.experts, s.width, s.hidden]);
            let offsets = m.ints(group_offsets(s.rows, s.experts), [s.experts + 1]);
            let y = crate::frozen_grouped_matmul(x.clone(), w, offsets);
            gradients(m, y, &[&x])
        }),
        ("gather_rows + combine_rows", |m, s| {
            let x = m.tensor([s.rows, s.width], 1);
            let slots = 2 * s.rows;
            // Every token twice, then padding (the index `rows`: no token).
            let index: Vec<i64> = (0..slots)
                .map(|slot| match slot % 9 {
                    8 => s.rows as i64,
                    _ => ((slot * 5) % s.rows) as i64,
                })
                .collect();
            let index = m.ints(index, [slots]);
            let weight = m.tensor([slots], 2);
            let gathered = crate::gather_rows(x.clone(), index.clone());
            let y = crate::combine_rows(gathered, weight.clone(), index, s.rows);
            gradients(m, y, &[&x, &weight])
        }),
        ("top_k_indices", |m, s| {
            let x = m.tensor([s.rows, s.experts * 4], 1);
            Results::default().int(crate::top_k_indices(x, 4))
        }),
        ("exclusive_cumsum + invert_slots", |m, s| {
            let (tokens, experts) = (s.rows, s.experts);
            let kept: Vec<i64> = (0..tokens * experts)
                .map(|p| i64::from(p % 3 != 0))
                .collect();
            let scan = crate::exclusive_cumsum(m.ints(kept, [tokens, experts]));
            let slot_of_pair: Vec<i64> = (0..tokens * experts)
                .map(|p| {
                    if p % 3 == 0 {
                        (tokens * experts) as i64
                    } else {
                        (p - p / 3 - 1) as i64
                    }
                })
                .collect();
            let inverted =
                crate::invert_slots(m.ints(slot_of_pair, [tokens, experts]), tokens * experts);
            Results::default().int(scan).int(inverted)
        }),
        ("adamw_update", |m, s| {
            let shape = [s.width, s.hidden];
            let (param, grad) = (m.tensor(shape, 1).detach(), m.tensor(shape, 2).detach());
            let moments = (
                m.tensor(shape, 3).detach(),
                m.tensor(shape, 4).detach().abs(),
            );
            let step = AdamWStep {
                lr: 1e-3,
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.1,
                time: 7,
            };
            let (param, moment_1, moment_2) = crate::adamw_update(param, grad, Some(moments), step);
            Results::default()
                .float(param)
                .float(moment_1)
                .float(moment_2)
        }),
    ]
}

/// `f(x)` for `x: [rows, width]`, with its gradient.
fn elementwise(m: &Maker, s: &Sizes, f: impl Fn(Tensor<2>) -> Tensor<2>) -> Results {
    let x = m.tensor([s.rows, s.width], 1);
    let y = f(x.clone());
    gradients(m, y, &[&x])
}

/// A tracked input of any rank, whose gradient is compared.
trait Tracked {
    fn gradient(&self, grads: &Gradients) -> Vec<f64>;
}

impl<const D: usize> Tracked for Tensor<D> {
    fn gradient(&self, grads: &Gradients) -> Vec<f64> {
        host_floats(self.grad(grads).expect("the input is tracked"))
    }
}

/// The output `y` and the gradients of `Σ y · u` for `inputs`.
fn gradients<const D: usize>(m: &Maker, y: Tensor<D>, inputs: &[&dyn Tracked]) -> Results {
    let grads = m.loss(y.clone(), 99).backward();
    let mut results = Results::default().float(y);
    for input in inputs {
        results.floats.push(input.gradient(&grads));
    }
    results
}

/// Runs every operation on `device` and on `reference` in `dtype` and compares them:
/// tolerance 1e-4 of the reference's largest magnitude in f32, 2e-2 in f16.
pub fn compare(
    reference: &Device,
    device: &Device,
    sizes: &Sizes,
    dtype: FloatDType,
) -> Vec<Outcome> {
    let half = dtype != FloatDType::F32;
    let (label, tolerance) = if half { ("f16", 2e-2) } else { ("f32", 1e-4) };
    let here = Maker {
        device: reference.clone().autodiff(),
        dtype: FloatDType::F32,
        round_to_f16: half,
    };
    let there = Maker {
        device: device.clone().autodiff(),
        dtype,
        round_to_f16: false,
    };
    cases()
        .into_iter()
        .map(|(name, case)| {
            let run = catch_unwind(AssertUnwindSafe(|| {
                difference(&case(&here, sizes), &case(&there, sizes))
            }));
            let (difference, error) = match run {
                Ok(difference) => (difference, None),
                Err(panic) => (f64::INFINITY, Some(panic_message(panic))),
            };
            Outcome {
                name,
                dtype: label,
                difference,
                tolerance,
                error,
            }
        })
        .collect()
}

/// A panic's message, where it has one.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The largest float difference relative to the reference's largest magnitude (per tensor),
/// and infinity where integers or lengths differ.
fn difference(reference: &Results, other: &Results) -> f64 {
    if reference.ints != other.ints || reference.floats.len() != other.floats.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (a, b) in reference.floats.iter().zip(&other.floats) {
        if a.len() != b.len() {
            return f64::INFINITY;
        }
        let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        let gap = a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
            let gap = (x - y).abs();
            // NaN anywhere is a failure.
            if gap.is_nan() {
                f64::INFINITY
            } else {
                m.max(gap)
            }
        });
        worst = worst.max(gap / scale);
    }
    worst
}
