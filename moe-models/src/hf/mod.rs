//! Hugging Face MoE language models in burn-moe's own modules.
//!
//! A model folder as the hub ships it (`config.json`, `model.safetensors` or sharded
//! `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`) loads into a
//! [`MoeTransformer`] on any device: Mixtral, Qwen2-MoE and OLMoE ([`HfArchitecture`]). The
//! config maps onto [`crate::DecoderConfig`]'s options ([`from_hf_config`]); the weights are
//! read with Burn's `burn-store` from memory-mapped files, one parameter at a time
//! ([`weights`](self)), so loading never holds a second copy of the model. The model's logits
//! match transformers' within 1e-4 on the fixtures in `tests/fixtures/hf`. [`load_with`] holds
//! the weights in bf16 or 8 or 4 bits instead ([`crate::storage`]), converting each tensor as
//! it is read.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use moe_models::hf;
//!
//! let loaded = hf::load(std::path::Path::new("OLMoE-1B-7B-0924"), &Device::flex()).unwrap();
//! println!("{} with {} parameters", loaded.architecture.class_name(),
//!     loaded.model.config().parameter_count().total);
//! ```

mod config;
pub mod peft;
mod weights;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use thiserror::Error;

pub use crate::storage::{Storage, StorageOptions};
pub use config::{fitting_architecture, from_hf_config, to_hf_config, HfArchitecture};

use crate::{ModelError, MoeTransformer};

/// Why a Hugging Face model folder could not be read or written.
#[derive(Debug, Error)]
pub enum HfError {
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The folder lacks a file the model needs.
    #[error("{path} has no {what}")]
    Missing {
        /// The folder.
        path: PathBuf,
        /// The file(s) looked for.
        what: String,
    },
    /// `config.json` is malformed.
    #[error("config.json: {0}")]
    Config(String),
    /// The model uses something burn-moe does not implement.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The weights are missing, damaged or do not fit the config.
    #[error("weights: {0}")]
    Weights(String),
    /// The mapped config was refused.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl HfError {
    pub(crate) fn io(path: &Path, error: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            reason: error.to_string(),
        }
    }
}

/// A Hugging Face model loaded into our modules.
#[derive(Debug)]
pub struct HfModel {
    /// The model, in evaluation form (no autodiff) on the device it was loaded on.
    pub model: MoeTransformer,
    /// Its architecture.
    pub architecture: HfArchitecture,
    /// Its `config.json`, as read.
    pub config_json: serde_json::Value,
}

/// Reads `dir/config.json` into the architecture and our model config.
pub fn read_config(
    dir: &Path,
) -> Result<
    (
        HfArchitecture,
        crate::MoeTransformerConfig,
        serde_json::Value,
    ),
    HfError,
> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Err(HfError::Missing {
            path: dir.to_path_buf(),
            what: "config.json".into(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| HfError::io(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| HfError::Config(e.to_string()))?;
    let (arch, config) = from_hf_config(&json)?;
    Ok((arch, config, json))
}

/// Loads the model of the folder `dir` on `device`, in f32.
pub fn load(dir: &Path, device: &Device) -> Result<HfModel, HfError> {
    load_with(dir, device, &StorageOptions::default())
}

/// Loads the model of the folder `dir` on `device`, its weights held as `options` says
/// ([`Storage`]: f32, bf16, 8 or 4 bits).
///
/// The model is built without values ([`moe_core::init::deferred`]) and each parameter is
/// read from the memory-mapped files, converted and placed on `device` one at a time, so
/// the peak holds the model in its storage plus one parameter in f32 (one layer's stacked
/// expert projection for an MoE model), never a second copy of the model. Below f32 the
/// model computes its activations in f32 ([`MoeTransformer::with_compute_dtype`]).
pub fn load_with(
    dir: &Path,
    device: &Device,
    options: &StorageOptions,
) -> Result<HfModel, HfError> {
    let (architecture, config, config_json) = read_config(dir)?;
    Ok(HfModel {
        model: build_with(&config, architecture, dir, device, options)?,
        architecture,
        config_json,
    })
}

/// The model of `config` (the `arch` folder `dir`'s, as [`read_config`] reads it, with run
/// settings such as the context length changed) on `device`, with the folder's weights held
/// as `options` says: [`load_with`] for a config the caller holds, with the same peak (no f32
/// copy of the model).
pub fn build_with(
    config: &crate::MoeTransformerConfig,
    arch: HfArchitecture,
    dir: &Path,
    device: &Device,
    options: &StorageOptions,
) -> Result<MoeTransformer, HfError> {
    options.check_device(device).map_err(HfError::Unsupported)?;
    let mut model = moe_core::init::deferred(|| config.init(device))?;
    weights::load_weights(&mut model, arch, dir, options)?;
    Ok(crate::storage::computing_in_f32(model, options))
}

/// Loads the weights of the `arch` folder `dir` into `model`, which must have been built from
/// that folder's config ([`read_config`]), in f32.
pub fn load_into(
    model: &mut MoeTransformer,
    arch: HfArchitecture,
    dir: &Path,
) -> Result<(), HfError> {
    weights::load_weights(model, arch, dir, &StorageOptions::default())
}

/// Our parameters under `arch`'s tensor names and layout (`[out, in]` linears, one tensor per
/// expert), in f32.
pub fn hf_tensors(
    model: &MoeTransformer,
    arch: HfArchitecture,
) -> Result<std::collections::BTreeMap<String, burn::tensor::TensorData>, HfError> {
    to_hf_config(model.config(), arch)?;
    weights::hf_tensors(model, arch)
}

/// The precision a `config.json` names for its weights: `torch_dtype`, or transformers 5's
/// `dtype`.
pub fn config_dtype(config: &serde_json::Value) -> Option<&str> {
    ["torch_dtype", "dtype"]
        .iter()
        .find_map(|key| config.get(*key).and_then(|value| value.as_str()))
}

/// The precision a Hugging Face folder's weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// 32-bit floats.
    F32,
    /// bfloat16 (how most MoE checkpoints ship).
    Bf16,
    /// IEEE half precision.
    F16,
}

impl WeightFormat {
    /// The format a `config.json` names ([`config_dtype`]); f32 when it names none.
    pub fn of_config(config: &serde_json::Value) -> Self {
        config_dtype(config).map_or(Self::F32, Self::named)
    }

    /// The format `name` is in a `config.json` (`"float32"`, `"bfloat16"`, `"float16"`); f32
    /// for any other.
    pub fn named(name: &str) -> Self {
        match name {
            "bfloat16" => Self::Bf16,
            "float16" => Self::F16,
            _ => Self::F32,
        }
    }

    /// The name `config.json` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// `data` (f32) in this format, with its safetensors type.
    fn encode(self, data: &burn::tensor::TensorData) -> (safetensors::Dtype, Vec<u8>) {
        match self {
            Self::F32 => (safetensors::Dtype::F32, data.as_bytes().to_vec()),
            Self::Bf16 => {
                let data = data.clone().convert::<burn::tensor::bf16>();
                (safetensors::Dtype::BF16, data.as_bytes().to_vec())
            }
            Self::F16 => {
                let data = data.clone().convert::<burn::tensor::f16>();
                (safetensors::Dtype::F16, data.as_bytes().to_vec())
            }
        }
    }
}

/// Writes `model` into `dir` as a Hugging Face `arch` folder: `config.json` and
/// `model.safetensors`, which transformers' `AutoModelForCausalLM.from_pretrained` loads.
/// Fields of `base` (the `config.json` the model was loaded from, if any: token ids, names)
/// are kept unless ours replace them, and the weights are written in the precision `base`
/// names ([`WeightFormat::of_config`]: a bf16 folder exports as bf16), f32 without one; see
/// [`save_as`] to choose. The tokenizer is the caller's to write.
pub fn save(
    model: &MoeTransformer,
    arch: HfArchitecture,
    dir: &Path,
    base: Option<&serde_json::Value>,
) -> Result<(), HfError> {
    let format = base.map_or(WeightFormat::F32, WeightFormat::of_config);
    save_as(model, arch, dir, base, format)
}

/// A tensor as `save_as` writes it: its safetensors type, bytes and shape.
type Encoded = (safetensors::Dtype, Vec<u8>, Vec<usize>);

/// [`save`] with the weights written in `format`.
///
/// The tensors are gathered on the host before the file is written: exporting holds the
/// model and one more copy of its weights.
pub fn save_as(
    model: &MoeTransformer,
    arch: HfArchitecture,
    dir: &Path,
    base: Option<&serde_json::Value>,
    format: WeightFormat,
) -> Result<(), HfError> {
    let ours = to_hf_config(model.config(), arch)?;
    let mut config = match base.and_then(|b| b.as_object()) {
        Some(fields) => fields.clone(),
        None => serde_json::Map::new(),
    };
    for (key, value) in ours.as_object().expect("a JSON object") {
        config.insert(key.clone(), value.clone());
    }
    // transformers 5 reads the rotary base from `rope_parameters` when it is present.
    if let Some(parameters) = config
        .get_mut("rope_parameters")
        .and_then(|p| p.as_object_mut())
    {
        parameters.insert(
            "rope_theta".into(),
            model.config().decoder.rope_theta.into(),
        );
    }
    config.remove("dtype");
    config.insert("torch_dtype".into(), format.name().into());
    let tensors: Vec<(String, Encoded)> = weights::hf_tensors(model, arch)?
        .into_iter()
        .map(|(name, data)| {
            let (dtype, bytes) = format.encode(&data);
            (name, (dtype, bytes, data.shape().to_vec()))
        })
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| HfError::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(config))
        .expect("a config serialises");
    std::fs::write(&config_path, text).map_err(|e| HfError::io(&config_path, e))?;
    write_safetensors(&tensors, &dir.join("model.safetensors"))
}

/// Writes encoded `tensors` to the safetensors file `path`, marked as PyTorch's (`format: pt`,
/// which transformers and peft expect).
pub(crate) fn write_safetensors(tensors: &[(String, Encoded)], path: &Path) -> Result<(), HfError> {
    let views = tensors
        .iter()
        .map(|(name, (dtype, bytes, shape))| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| HfError::Weights(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| HfError::io(path, e))
}
