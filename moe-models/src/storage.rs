//! How a model holds its weights: f32, bf16, or block-quantized to 8 or 4 bits.
//!
//! The people who run and fine-tune MoE checkpoints on their own machines hold the frozen
//! weights in fewer bits than f32 (bf16 as the checkpoints ship; 8 or 4 bits as llama.cpp,
//! mlx-lm and QLoRA, Dettmers et al. 2023, do). Here the big matrices (attention, experts,
//! dense and shared feed-forward projections) are held in the chosen [`Storage`]; the norms,
//! biases and routers (small, and what routing decisions hang on) stay f32; the embeddings and
//! an untied output head are held in bf16 for any format below f32 unless
//! [`StorageOptions::embeddings`] says otherwise ([`Held`] is that rule, by parameter path).
//! Each use reads a weight in the activations' type ([`moe_core::precision::to_dtype`]): the
//! products compute in f32.
//!
//! A Hugging Face folder loads straight into its storage ([`crate::hf::load_with`]); a model
//! already in memory (a burn-moe checkpoint) converts with [`hold`]. Held weights are frozen:
//! they are for inference and as the base of LoRA adapters (QLoRA).
//!
//! Quantization is Burn's symmetric scheme ([`QuantValue::Q8S`], [`QuantValue::Q4S`]): per
//! block of 64 consecutive values along a weight's last axis (the output features in our
//! `[.., d_in, d_out]` layout; QLoRA's block size) one f32 scale `s = max|x| / q_max`, and
//! `x ~ s round(x / s)` with `q_max` 127 or 7. A weight whose last axis is not a multiple of 64
//! takes the largest of 32, 16, 8, 4, 2 that divides it (the committed fixtures are that
//! small), else one scale for the tensor. The rounding error of a value is at most `s / 2`.
//! Blocks of 64 rather than llama.cpp's 32 because Burn's flex backend keeps each scale as an
//! f32 beside the values and a spare 4 bytes per block in the values' buffer: 0.125 bytes a
//! weight at 64, not 0.25.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{DType, Tensor, TensorData};

use crate::MoeTransformer;

/// The format the weights of a loaded model are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// 32-bit floats (4 bytes a weight).
    #[default]
    F32,
    /// bfloat16 (2 bytes), how most checkpoints ship: a bf16 file loads without rounding.
    Bf16,
    /// Symmetric 8-bit integers with a scale per block of 64 (1 byte plus 1/16).
    Q8,
    /// Symmetric 4-bit integers with a scale per block of 64 (half a byte plus 1/16 where the
    /// backend packs them; Burn's flex backend holds one value a byte, so q4 takes what q8
    /// takes there).
    Q4,
}

/// The block sizes a quantized weight takes: the largest that divides its last axis.
const BLOCK_SIZES: [u8; 6] = [64, 32, 16, 8, 4, 2];

impl Storage {
    /// Every format, in order of size.
    pub const ALL: [Storage; 4] = [Self::F32, Self::Bf16, Self::Q8, Self::Q4];

    /// Its name on the command line: `f32`, `bf16`, `q8`, `q4`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Q8 => "q8",
            Self::Q4 => "q4",
        }
    }

    /// The format called `name` ([`Storage::name`]).
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|format| format.name() == name)
    }

    /// Bytes a weight takes (the values; block scales add 4/64 to q8 and q4).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Self::F32 => 4.0,
            Self::Bf16 => 2.0,
            Self::Q8 => 1.0 + 0.0625,
            Self::Q4 => 0.5 + 0.0625,
        }
    }

    /// The format embeddings take when the weights take `self`: bf16 below f32 (a lookup
    /// reads one row, and 8-bit rows would cost the logits most; see the module docs).
    pub fn for_embeddings(self) -> Self {
        match self {
            Self::F32 => Self::F32,
            _ => Self::Bf16,
        }
    }

    /// The Burn quantization scheme for a weight of `shape` stored as `store` says, `None`
    /// for the float formats and for a weight that `store` cannot pack (a last axis that is
    /// not a whole number of u32 words: 4 values for q8, 8 for q4), which stays f32.
    pub(crate) fn scheme(self, shape: &[usize], store: QuantStore) -> Option<QuantScheme> {
        let value = match self {
            Self::F32 | Self::Bf16 => return None,
            Self::Q8 => QuantValue::Q8S,
            Self::Q4 => QuantValue::Q4S,
        };
        let scheme = QuantScheme::default().with_value(value).with_store(store);
        let last = shape.last().copied().unwrap_or(1);
        if matches!(store, QuantStore::PackedU32(_)) && !last.is_multiple_of(scheme.num_quants()) {
            return None;
        }
        Some(
            match BLOCK_SIZES
                .into_iter()
                .find(|&b| last.is_multiple_of(b as usize))
            {
                Some(block) => scheme.per_block([block], ScaleDtype::F32),
                None => scheme.per_tensor(ScaleDtype::F32),
            },
        )
    }

    /// The Burn type a weight of `shape` is held in, quantized values stored as `store` says
    /// ([`moe_kernels::quant_store`] of the device).
    pub(crate) fn dtype(self, shape: &[usize], store: QuantStore) -> DType {
        match self.scheme(shape, store) {
            Some(scheme) => DType::QFloat(scheme),
            None if self == Self::Bf16 => DType::BF16,
            None => DType::F32,
        }
    }

    /// `tensor` (a float tensor) in this format.
    fn convert<const D: usize>(self, tensor: Tensor<D>) -> Tensor<D> {
        if self == Self::F32 {
            return tensor;
        }
        let device = tensor.device();
        let data = self.encode(tensor.into_data(), store_on(&device));
        let dtype = data.dtype();
        Tensor::from_data(data, (&device, dtype))
    }

    /// `data` (a float tensor's) in this format: f32 as it is, bf16 converted, q8/q4 quantized
    /// on the host with the values stored as `store` says, ready for `Tensor::from_data` on a
    /// device that stores them so.
    pub(crate) fn encode(self, data: TensorData, store: QuantStore) -> TensorData {
        match (self, self.scheme(data.shape(), store)) {
            (Self::F32, _) => data,
            (Self::Bf16, _) => data.convert_dtype(DType::BF16),
            (_, Some(scheme)) => quantized(data.convert::<f32>(), &scheme),
            (_, None) => data.convert::<f32>(),
        }
    }
}

impl std::fmt::Display for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `data` (f32) quantized with `scheme` on the host, on every core: for each run of values
/// that shares a scale (a block along the last axis, or the whole tensor) `s = 2 max|x| /
/// (q_max - q_min)` (`max|x| / q_max` for the symmetric values), `q = round(x / s)` clamped to
/// the value's range, computed as Burn's flex backend does (`x * (1 / s)`, a zero scale
/// replaced by the smallest normal f32), so either gives the same bytes.
fn quantized(data: TensorData, scheme: &QuantScheme) -> TensorData {
    use rayon::prelude::*;
    let shape = data.shape().to_vec();
    let values = data
        .try_into_vec::<f32>()
        .expect("the caller converts to f32");
    let run = match scheme.block_size() {
        Some(block) => *block.as_slice().last().unwrap_or(&1) as usize,
        None => values.len().max(1),
    };
    let (low, high) = scheme.value.range();
    let scale_of = |run: &[f32]| {
        let peak = run.iter().fold(0.0f32, |peak, x| peak.max(x.abs()));
        let scale = 2.0 * peak / (high - low);
        if scale > 0.0 && scale.is_finite() {
            scale
        } else {
            f32::MIN_POSITIVE
        }
    };
    let scales: Vec<f32> = values.par_chunks(run).map(scale_of).collect();
    // Room for the scales Burn appends to the values' buffer (aligned), so that appending
    // them does not reallocate it to twice its size, slack the backend would keep.
    let mut quantized = Vec::with_capacity(values.len() + 4 * scales.len() + 64);
    quantized.resize(values.len(), 0i8);
    quantized
        .par_chunks_mut(run)
        .zip(values.par_chunks(run))
        .zip(scales.par_iter())
        .for_each(|((out, values), &scale)| {
            let inverse = 1.0 / scale;
            for (q, &x) in out.iter_mut().zip(values) {
                *q = (x * inverse).round().clamp(low, high) as i8;
            }
        });
    match scheme.store {
        QuantStore::PackedU32(_) => packed(&quantized, shape, scheme, &scales),
        _ => TensorData::quantized(quantized, shape, *scheme, &scales, None),
    }
}

/// How `device` stores quantized values ([`moe_kernels::quant_store`]); one a byte where it
/// has no way, as [`StorageOptions::check_device`] refuses 8 and 4 bits there.
pub(crate) fn store_on(device: &burn::tensor::Device) -> QuantStore {
    moe_kernels::quant_store(device).unwrap_or(QuantStore::Native)
}

/// Quantized `values` packed into u32 words as Burn's cube kernels read them (value `i` of a
/// word in bits `b i .. b i + b`, two's complement, `b` the value's bits; the words little
/// endian), followed by the f32 `scales`: the bytes of a `QuantStore::PackedU32` tensor.
fn packed(values: &[i8], shape: Vec<usize>, scheme: &QuantScheme, scales: &[f32]) -> TensorData {
    let bits = scheme.value.size_bits();
    let mask = (1u32 << bits) - 1;
    let mut bytes = Vec::with_capacity(values.len() * bits / 8 + 4 * scales.len());
    for word in values.chunks(32 / bits) {
        let word = word.iter().enumerate().fold(0u32, |acc, (i, &q)| {
            acc | ((q as i32 as u32) & mask) << (bits * i)
        });
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    let scales = match scheme.block_size() {
        Some(_) => scales,
        None => &scales[..1],
    };
    for scale in scales {
        bytes.extend_from_slice(&scale.to_le_bytes());
    }
    TensorData::from_bytes_vec(bytes, shape, DType::QFloat(*scheme))
}

/// The formats a model's parameters are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageOptions {
    /// The format of the attention, expert and feed-forward weights.
    pub weights: Storage,
    /// The format of the token embeddings and an untied output head; `None` for
    /// [`Storage::for_embeddings`] of `weights`.
    pub embeddings: Option<Storage>,
}

impl StorageOptions {
    /// The weights in `weights`, the embeddings as [`Storage::for_embeddings`] says.
    pub fn new(weights: Storage) -> Self {
        Self {
            weights,
            embeddings: None,
        }
    }

    /// The format of the embeddings and the output head.
    pub fn embedding_storage(&self) -> Storage {
        self.embeddings
            .unwrap_or_else(|| self.weights.for_embeddings())
    }

    /// The format of the parameter at `path` (our module path) with `rank` dimensions.
    pub fn storage_of(&self, path: &str, rank: usize) -> Storage {
        match Held::of(path, rank) {
            Held::Small => Storage::F32,
            Held::Embedding => self.embedding_storage(),
            Held::Weight => self.weights,
        }
    }

    /// These options for `device`: embeddings left to their default are held in f32 rather
    /// than bf16 where the device has no bf16 (wgpu's WGSL shaders): 8- and 4-bit weights on
    /// wgpu take f32 embeddings instead of being refused for the embeddings' format.
    pub fn on(mut self, device: &burn::tensor::Device) -> Self {
        if self.embeddings.is_none()
            && self.embedding_storage() == Storage::Bf16
            && self.weights != Storage::Bf16
            && !device.supports_dtype(DType::BF16)
        {
            self.embeddings = Some(Storage::F32);
        }
        self
    }

    /// Refuses a `device` whose backend cannot hold these formats, naming it: bf16 where the
    /// backend has no bf16 (Burn's answer), 8 and 4 bits where our products cannot read them
    /// ([`moe_kernels::quant_store`]: flex and wgpu; Burn answers no for every quantized type,
    /// so it is not asked).
    pub fn check_device(&self, device: &burn::tensor::Device) -> Result<(), String> {
        for storage in [self.weights, self.embedding_storage()] {
            if storage == Storage::Bf16 && !device.supports_dtype(DType::BF16) {
                return Err(format!(
                    "{device:?} cannot hold weights in {storage}: hold them in f32, or run on \
                     the flex backend, which holds every format"
                ));
            }
        }
        let quantized = matches!(self.weights, Storage::Q8 | Storage::Q4);
        if quantized && moe_kernels::quant_store(device).is_none() {
            return Err(format!(
                "{device:?} cannot multiply by weights in {}: 8- and 4-bit weights run on the \
                 flex backend (`--backend flex`) and on wgpu; or hold them in f32 or bf16",
                self.weights
            ));
        }
        Ok(())
    }

    /// Whether every parameter stays f32.
    pub fn is_f32(&self) -> bool {
        self.weights == Storage::F32 && self.embedding_storage() == Storage::F32
    }
}

/// What a parameter is, for the format it is held in: the one rule of the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Norm gains, biases (every 1-D parameter), routers and the shared-expert gate: f32.
    Small,
    /// The token embeddings and an untied output head.
    Embedding,
    /// Attention, expert and feed-forward matrices.
    Weight,
}

impl Held {
    /// The kind of the parameter at `path` (our module path, e.g.
    /// `stack.blocks.0.ffn.moe.router.weight`) with `rank` dimensions.
    pub fn of(path: &str, rank: usize) -> Self {
        let parts: Vec<&str> = path.split('.').collect();
        let small =
            |part: &&str| part.contains("norm") || *part == "router" || *part == "shared_gate";
        if rank < 2 || parts.iter().any(small) {
            Self::Small
        } else if matches!(parts.first(), Some(&"token_embedding") | Some(&"lm_head")) {
            Self::Embedding
        } else {
            Self::Weight
        }
    }
}

/// `model` with its parameters converted to the formats `options` gives them, each read to
/// the host and encoded as a loaded tensor is (bf16 rounding, q8/q4 by
/// the one host quantizer). Call it before attaching LoRA adapters (the adapters stay f32).
/// Below f32 the model computes in f32.
pub fn hold(model: MoeTransformer, options: &StorageOptions) -> MoeTransformer {
    if options.is_f32() {
        return model;
    }
    let mut holder = Holder {
        path: Vec::new(),
        options: *options,
    };
    computing_in_f32(model.map(&mut holder), options)
}

/// `model` computing its activations in f32 when `options` hold a weight below f32 (the
/// products read each weight in the activations' type).
pub(crate) fn computing_in_f32(model: MoeTransformer, options: &StorageOptions) -> MoeTransformer {
    if options.is_f32() {
        model
    } else {
        model.with_compute_dtype(Some(burn::tensor::FloatDType::F32))
    }
}

/// Converts each float parameter as [`StorageOptions::storage_of`] its path says.
struct Holder {
    path: Vec<String>,
    options: StorageOptions,
}

impl ModuleMapper for Holder {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let storage = self.options.storage_of(&self.path.join("."), D);
        param.map(|tensor| storage.convert(tensor))
    }
}
