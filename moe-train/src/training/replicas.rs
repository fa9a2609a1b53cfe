//! Data parallelism whose replicas keep their weights, and whose gradients meet in an
//! all-reduce that has no central device.
//!
//! Each device a micro-batch is split over holds a replica of the model for the whole run (the
//! first device's is the training loop's model; the others are made once, with
//! [`ExpertParallel::replica_with_own_weights_on`]): nothing is broadcast per micro-batch.
//! Placed experts are not replicated: every replica sends its tokens to them, and their
//! gradients add up where they live. After a step's backward passes, the gradients of the
//! replicated parameters are summed over the replicas by a reduce-scatter and an all-gather
//! over Burn's device-to-device transfers (server to server when both devices are remote):
//!
//! - each replica's replicated gradients are laid end to end in one vector of `L` values, in
//!   the module's order, and cut into `N` contiguous shards;
//! - shard `i` of every replica travels to device `i`, which sums the `N` pieces in device
//!   order (the reduce-scatter);
//! - every device gathers the `N` summed shards (the all-gather).
//!
//! Each device sends and receives `2 (N - 1) / N · L` values a step, whatever `N` (as much as a
//! ring all-reduce, Patarasuk and Yuan 2009, in `2` rounds of transfers instead of
//! `2 (N - 1)`); with Burn's transfers each of a round's pieces is its own message. Each sum is
//! formed once, on one device, in a fixed order, and copied: every replica receives the same
//! bits, clips them by the same factor (computed on the first device, which also holds the
//! placed experts' gradients) and applies the same AdamW update with an optimizer of its own,
//! so the replicas stay identical (PyTorch's `DistributedDataParallel` works the same way,
//! with NCCL's all-reduce). What each device sent and received is counted in a
//! [`TransferLedger`].
//!
//! With [`ReducePrecision::Bf16`] the gradients travel in bf16, half the bytes (PyTorch's
//! `bf16_compress_hook` does the same): each device's gradients are rounded to bf16, each
//! owner adds its pieces in f32 and rounds the sum to bf16, and every device, the owner too,
//! takes that rounded sum, so the replicas still stay identical.

use std::collections::HashSet;
use std::ops::Range;

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{DType, Device, Gradients, Tensor};
use moe_models::ExpertParallel;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::store::sharded_state;
use crate::training::clip::scale_gradients;

/// What the replicas' gradients travel as in the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReducePrecision {
    /// As computed, in f32.
    #[default]
    F32,
    /// Rounded to bf16: half the bytes, sums with bf16's 8 significant bits.
    Bf16,
}

impl ReducePrecision {
    /// The name `--all-reduce` takes.
    pub fn name(self) -> &'static str {
        match self {
            ReducePrecision::F32 => "f32",
            ReducePrecision::Bf16 => "bf16",
        }
    }

    /// The type the gradients travel as.
    fn dtype(self) -> DType {
        match self {
            ReducePrecision::F32 => DType::F32,
            ReducePrecision::Bf16 => DType::BF16,
        }
    }
}

/// Bytes each data-parallel device sent and received in gradient reductions, in device order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferLedger {
    /// Bytes sent by each device.
    pub sent: Vec<u64>,
    /// Bytes received by each device.
    pub received: Vec<u64>,
    /// Gradient reductions counted.
    pub reductions: u64,
}

impl TransferLedger {
    fn new(devices: usize) -> Self {
        Self {
            sent: vec![0; devices],
            received: vec![0; devices],
            reductions: 0,
        }
    }

    fn record(&mut self, from: usize, to: usize, bytes: u64) {
        if from != to {
            self.sent[from] += bytes;
            self.received[to] += bytes;
        }
    }
}

/// What data parallelism did in a run, for [`crate::training::RunSummary`].
#[derive(Debug, Clone)]
pub struct DataParallelReport {
    /// The replicated parameters' values, `L`: what each all-reduce sums.
    pub replicated_values: usize,
    /// Bytes moved by the all-reduces.
    pub ledger: TransferLedger,
    /// The largest difference between a replica's weights and the first device's at the end
    /// of the run (0 when they are identical, as they should be), when
    /// [`crate::training::RunOptions::compare_replicas`] asked for it.
    pub replica_gap: Option<f64>,
}

impl DataParallelReport {
    /// One line for the user: what the all-reduces moved, per step and device.
    pub fn describe(&self) -> String {
        let reductions = self.ledger.reductions.max(1) as f64;
        let most = |bytes: &[u64]| bytes.iter().copied().max().unwrap_or(0) as f64;
        format!(
            "data parallel: {} gradient all-reduces of {} values; per step each device sent at most {:.1} MB and received at most {:.1} MB",
            self.ledger.reductions,
            self.replicated_values,
            most(&self.ledger.sent) / reductions / 1e6,
            most(&self.ledger.received) / reductions / 1e6
        )
    }
}

/// The replicas of the devices after the first, their optimizers, and the all-reduce.
pub struct Replicas<M> {
    /// One replica per data-parallel device after the first (the first's is the loop's model).
    others: Vec<M>,
    /// Each replica's optimizer, for its replicated parameters.
    optimizers: Vec<ModuleOptimizer>,
    /// The replicated parameters (all but the placed experts', of those that are trained).
    replicated: HashSet<ParamId>,
    ledger: TransferLedger,
    replicated_values: usize,
    precision: ReducePrecision,
}

impl<M: ExpertParallel> Replicas<M> {
    /// Replicas of `model` on `devices` (with autodiff; `devices[0]` is `model`'s own and gets
    /// none), each with an optimizer built by `fresh_optimizer` holding the states `optimizer`
    /// (the model's, perhaps resumed) has for the replicated parameters; the gradients travel
    /// as `precision` says. Refuses bf16 where a device does not hold it.
    pub fn new(
        model: &M,
        devices: &[Device],
        optimizer: &ModuleOptimizer,
        fresh_optimizer: impl Fn() -> ModuleOptimizer,
        precision: ReducePrecision,
    ) -> Result<Self> {
        let dtype = precision.dtype();
        if let Some((index, _)) = devices
            .iter()
            .enumerate()
            .find(|(_, device)| !device.supports_dtype(dtype))
        {
            return Err(TrainError::Config(format!(
                "`--all-reduce {}`: device {} of `--devices` does not hold {dtype:?} tensors (WGSL and ndarray have no bf16): give `--all-reduce f32`",
                precision.name(),
                index + 1
            )));
        }
        let others: Vec<M> = devices
            .iter()
            .skip(1)
            .map(|device| model.replica_with_own_weights_on(device))
            .collect();
        let placed: HashSet<ParamId> = model
            .sharded_params()
            .iter()
            .flat_map(|param| param.shards.iter().map(|(id, _)| *id))
            .collect();
        let mut trained = TrainedParams::default();
        model.visit(&mut trained);
        let replicated_sizes: Vec<(ParamId, usize)> = trained
            .0
            .into_iter()
            .filter(|(id, _)| !placed.contains(id))
            .collect();
        let replicated_values = replicated_sizes.iter().map(|(_, size)| size).sum();
        let replicated: HashSet<ParamId> = replicated_sizes.into_iter().map(|(id, _)| id).collect();
        let state = optimizer_state(optimizer, &replicated)?;
        let optimizers = others
            .iter()
            .map(|_| fresh_optimizer().from_bytes(state.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|error| {
                TrainError::Config(format!("the replicas' optimizer state: {error}"))
            })?;
        Ok(Self {
            others,
            optimizers,
            replicated,
            ledger: TransferLedger::new(devices.len()),
            replicated_values,
            precision,
        })
    }

    /// The data-parallel devices, the model's included.
    pub fn devices(&self) -> usize {
        self.others.len() + 1
    }

    /// The replica on data-parallel device `index` (`index >= 1`; device 0 holds the model).
    pub fn replica(&self, index: usize) -> &M {
        &self.others[index - 1]
    }

    /// Each device's gradients out of `grads` (one backward pass through every replica): the
    /// model's first (with the placed experts'), then each replica's.
    pub fn gradients(&self, grads: &mut Gradients, model: &M) -> Vec<GradientsParams> {
        std::iter::once(GradientsParams::from_module(grads, model))
            .chain(
                self.others
                    .iter()
                    .map(|replica| GradientsParams::from_module(grads, replica)),
            )
            .collect()
    }

    /// Sums the replicated parameters' gradients over the devices, in place: afterwards every
    /// device's `grads` hold the same sum, bit for bit (see the module's documentation).
    pub fn all_reduce(&mut self, grads: &mut [GradientsParams], model: &M) {
        let modules: Vec<&M> = std::iter::once(model).chain(&self.others).collect();
        let flat: Vec<Option<Tensor<1>>> = modules
            .iter()
            .zip(grads.iter_mut())
            .map(|(module, grads)| {
                let mut visitor = Flatten {
                    grads,
                    replicated: &self.replicated,
                    pieces: Vec::new(),
                };
                module.visit(&mut visitor);
                (!visitor.pieces.is_empty())
                    .then(|| Tensor::cat(visitor.pieces, 0).cast(self.precision.dtype()))
            })
            .collect();
        let Some(flat) = flat.into_iter().collect::<Option<Vec<_>>>() else {
            return;
        };
        let summed = reduce_scatter(&flat, &mut self.ledger);
        for (index, (module, grads)) in modules.iter().zip(grads.iter_mut()).enumerate() {
            let whole = all_gather(&summed, index, &flat[index].device(), &mut self.ledger)
                .cast(DType::F32);
            module.visit(&mut Unflatten {
                grads,
                replicated: &self.replicated,
                whole,
                offset: 0,
            });
        }
        self.ledger.reductions += 1;
    }

    /// Each replica's update: its (all-reduced) gradients multiplied by `factor` (the model's
    /// clipping factor, when there is one) and applied by its optimizer at learning rate `lr`;
    /// then the placed experts of `model`, just updated, shared again.
    pub fn update(
        &mut self,
        grads: Vec<GradientsParams>,
        factor: Option<&Tensor<1>>,
        lr: f64,
        model: &M,
    ) {
        let replicas = std::mem::take(&mut self.others);
        self.others = replicas
            .into_iter()
            .zip(grads)
            .zip(&mut self.optimizers)
            .map(|((replica, mut grads), optimizer)| {
                if let Some(factor) = factor {
                    scale_gradients(&mut grads, &replica, factor.clone());
                }
                let mut replica = optimizer.step(lr, replica, grads);
                replica.share_placed_experts(model);
                replica
            })
            .collect();
    }

    /// What the replicas did: the all-reduces' bytes and, with `compare`, how far each
    /// replica's replicated weights are from `model`'s (read back to the host).
    pub fn report(&self, model: &M, compare: bool) -> DataParallelReport {
        DataParallelReport {
            replicated_values: self.replicated_values,
            ledger: self.ledger.clone(),
            replica_gap: compare.then(|| self.replica_gap(model)),
        }
    }

    /// The largest difference between a replica's replicated weights and `model`'s (infinite
    /// when a device's weights cannot be read back).
    fn replica_gap(&self, model: &M) -> f64 {
        let values = |module: &M| {
            let mut read = ReadReplicated {
                replicated: &self.replicated,
                values: Some(Vec::new()),
            };
            module.visit(&mut read);
            read.values
        };
        let Some(reference) = values(model) else {
            return f64::INFINITY;
        };
        self.others
            .iter()
            .map(|replica| match values(replica) {
                Some(values) => values
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs() as f64)
                    .fold(0.0, f64::max),
                None => f64::INFINITY,
            })
            .fold(0.0, f64::max)
    }
}

/// Shard `i` of every device's `flat` summed on device `i`, in device order, in f32, and
/// returned in `flat`'s type.
fn reduce_scatter(flat: &[Tensor<1>], ledger: &mut TransferLedger) -> Vec<Tensor<1>> {
    let bytes = flat[0].dtype().size() as u64;
    let ranges = shards(flat[0].dims()[0], flat.len());
    ranges
        .iter()
        .enumerate()
        .map(|(owner, range)| {
            let home = flat[owner].device();
            let mut pieces = flat.iter().enumerate().map(|(from, values)| {
                ledger.record(from, owner, bytes * range.len() as u64);
                moved(values.clone().slice(range.clone()), &home)
            });
            let first = pieces.next().expect("at least one device").cast(DType::F32);
            pieces
                .fold(first, |sum, piece| sum + piece.cast(DType::F32))
                .cast(flat[owner].dtype())
        })
        .collect()
}

/// The summed shards gathered on device `index` (`device`), end to end.
fn all_gather(
    summed: &[Tensor<1>],
    index: usize,
    device: &Device,
    ledger: &mut TransferLedger,
) -> Tensor<1> {
    let pieces = summed
        .iter()
        .enumerate()
        .map(|(owner, shard)| {
            let bytes = shard.dtype().size() as u64 * shard.dims()[0] as u64;
            ledger.record(owner, index, bytes);
            moved(shard.clone(), device)
        })
        .collect();
    Tensor::cat(pieces, 0)
}

/// `tensor` on `device`, untouched when it is there already (a remote device is not asked to
/// copy a tensor to itself).
fn moved(tensor: Tensor<1>, device: &Device) -> Tensor<1> {
    match tensor.device() == *device {
        true => tensor,
        false => tensor.to_device(device),
    }
}

/// `len` values cut into `parts` contiguous shards whose lengths differ by at most one.
fn shards(len: usize, parts: usize) -> Vec<Range<usize>> {
    (0..parts)
        .map(|part| part * len / parts..(part + 1) * len / parts)
        .collect()
}

/// The states `optimizer` holds for the `replicated` parameters, as optimizer-record bytes.
fn optimizer_state(
    optimizer: &ModuleOptimizer,
    replicated: &HashSet<ParamId>,
) -> Result<burn::tensor::Bytes> {
    let keep: Vec<ParamId> = replicated.iter().copied().collect();
    optimizer
        .into_bytes()
        .map_err(|error| error.to_string())
        .and_then(|bytes| sharded_state::keep_only(bytes, &keep))
        .map_err(|error| TrainError::Config(format!("the replicas' optimizer state: {error}")))
}

/// The id and size of each parameter that is trained (that takes a gradient).
#[derive(Default)]
struct TrainedParams(Vec<(ParamId, usize)>);

impl ModuleVisitor for TrainedParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.is_require_grad() {
            self.0.push((param.id, param.shape().num_elements()));
        }
    }
}

/// Takes the replicated parameters' gradients out of `grads` as flat pieces, in the module's
/// order (a parameter without a gradient on this device gives zeros).
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    replicated: &'a HashSet<ParamId>,
    pieces: Vec<Tensor<1>>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.replicated.contains(&param.id) {
            return;
        }
        let grad = self
            .grads
            .remove::<D>(param.id)
            .unwrap_or_else(|| param.val().without_autodiff().zeros_like());
        self.pieces.push(grad.flatten(0, D - 1));
    }
}

/// Puts the replicated parameters' gradients back into `grads`, cut out of `whole` in the
/// module's order.
struct Unflatten<'a> {
    grads: &'a mut GradientsParams,
    replicated: &'a HashSet<ParamId>,
    whole: Tensor<1>,
    offset: usize,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.replicated.contains(&param.id) {
            return;
        }
        let shape = param.shape();
        let end = self.offset + shape.num_elements();
        let grad = self.whole.clone().slice(self.offset..end).reshape(shape);
        self.grads.register::<D>(param.id, grad);
        self.offset = end;
    }
}

/// The replicated parameters' values, read to the host, end to end (`None` once a read
/// fails).
struct ReadReplicated<'a> {
    replicated: &'a HashSet<ParamId>,
    values: Option<Vec<f32>>,
}

impl ModuleVisitor for ReadReplicated<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.replicated.contains(&param.id) {
            return;
        }
        let read = param
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>();
        match (&mut self.values, read) {
            (Some(values), Ok(read)) => values.extend(read),
            _ => self.values = None,
        }
    }
}
