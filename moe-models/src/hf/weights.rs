//! Hugging Face tensor names to our parameters, read through Burn's `burn-store`.
//!
//! Each of our parameters is given as a deferred `burn-store` tensor under its own module
//! path: its bytes are produced only when [`ModuleSnapshot::apply`] reaches that parameter,
//! from the memory-mapped safetensors files (`SafetensorsStore`, one per shard). So at most one
//! parameter is ever held twice (as the file's bytes turned into f32, and in the model), never
//! the whole model. The transforms:
//!
//! - `nn.Linear` weights are `[out, in]`, Burn's `[in, out]`: transposed;
//! - per-expert weights (`experts.{j}.gate_proj`, Mixtral's `w1`/`w3`/`w2`) are stacked
//!   into our `[E, d, h]` / `[E, h, d]` experts, transposed on the way;
//! - the router `[E, d]` becomes `[d, E]`, Qwen2-MoE's `shared_expert_gate` `[1, d]` our
//!   `[d, 1]`;
//! - each tensor is then held as [`StorageOptions`] say for its path: bf16 and f16
//!   files are widened to f32 one tensor at a time, then narrowed or quantized again where the
//!   model holds them in fewer bits.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::quantization::QuantStore;
use burn::tensor::{Shape, TensorData};
use burn_store::burn_pack::Tensor as PackTensor;
use burn_store::{bridge, ModuleSnapshot, ModuleStore, SafetensorsStore};

use super::{HfArchitecture, HfError};
use crate::storage::StorageOptions;
use crate::MoeTransformer;

/// Where one of our parameters comes from.
struct Source {
    /// Our module path, e.g. `stack.blocks.0.attention.query.weight`.
    path: String,
    /// The file's tensors, one for a plain parameter, one per expert for stacked experts.
    names: Vec<String>,
    /// Transpose each 2-D source (`nn.Linear`'s `[out, in]` to `[in, out]`).
    transpose: bool,
    /// Stack the sources along a new first dimension (experts; also a one-expert FFN).
    stack: bool,
}

impl Source {
    /// A norm's gain or a bias, as the file has it.
    fn plain(path: String, name: String) -> Self {
        Self {
            path,
            names: vec![name],
            transpose: false,
            stack: false,
        }
    }

    /// An `nn.Linear` weight, transposed.
    fn linear(path: String, name: String) -> Self {
        Self {
            transpose: true,
            ..Self::plain(path, name)
        }
    }

    /// Per-expert weights stacked into one `[E, d_in, d_out]` parameter.
    fn stacked(path: String, names: Vec<String>) -> Self {
        Self {
            path,
            names,
            transpose: true,
            stack: true,
        }
    }
}

/// The tensors of a model folder, lazily, by name: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists.
pub(crate) fn open_tensors(dir: &Path) -> Result<HashMap<String, PackTensor>, HfError> {
    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        let mut store = SafetensorsStore::from_file(&file);
        let all = store
            .get_all_tensors()
            .map_err(|e| HfError::Weights(format!("{}: {e}", file.display())))?;
        tensors.extend(all.iter().map(|(name, t)| (name.clone(), t.clone())));
    }
    Ok(tensors)
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| HfError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| HfError::Weights(format!("{}: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                HfError::Weights(format!("{}: no `weight_map` object", index.display()))
            })?;
        let files: std::collections::BTreeSet<&str> =
            map.values().filter_map(|v| v.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(HfError::Missing {
            path: dir.to_path_buf(),
            what: "model.safetensors or model.safetensors.index.json".into(),
        })
    }
}

/// Loads the tensors of `dir` into `model` (built from the folder's `config.json`), each held
/// as `options` says.
pub(crate) fn load_weights(
    model: &mut MoeTransformer,
    arch: HfArchitecture,
    dir: &Path,
    options: &StorageOptions,
) -> Result<(), HfError> {
    let tensors = Arc::new(open_tensors(dir)?);
    let store = crate::storage::store_on(&model.token_embedding.weight.lazy_device());
    let sources = sources(model, arch);
    let mut snapshots = Vec::with_capacity(sources.len());
    let mut missing = Vec::new();
    for source in sources {
        match deferred(&source, options, store, &tensors) {
            Ok(snapshot) => snapshots.push(snapshot),
            Err(names) => missing.extend(names),
        }
    }
    if !missing.is_empty() {
        return Err(HfError::Weights(format!(
            "{} lacks {} tensor(s) the {} config asks for, e.g. {}",
            dir.display(),
            missing.len(),
            arch.class_name(),
            missing
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let result = model.apply(snapshots, None, None, false);
    if !result.errors.is_empty() || !result.missing.is_empty() {
        let errors: Vec<String> = result
            .errors
            .iter()
            .take(3)
            .map(|e| e.to_string())
            .collect();
        let missing: Vec<&str> = result
            .missing
            .iter()
            .take(3)
            .map(|(p, _)| p.as_str())
            .collect();
        return Err(HfError::Weights(format!(
            "the tensors do not fit the model: {} error(s) ({}), {} parameter(s) left unset ({})",
            result.errors.len(),
            errors.join("; "),
            result.missing.len(),
            missing.join(", ")
        )));
    }
    Ok(())
}

/// A deferred tensor for `source` held as `options` say (quantized values stored as `store`
/// says), or the names the file lacks.
fn deferred(
    source: &Source,
    options: &StorageOptions,
    store: QuantStore,
    tensors: &Arc<HashMap<String, PackTensor>>,
) -> Result<PackTensor, Vec<String>> {
    let absent: Vec<String> = source
        .names
        .iter()
        .filter(|name| !tensors.contains_key(*name))
        .cloned()
        .collect();
    if !absent.is_empty() {
        return Err(absent);
    }
    let first = &tensors[&source.names[0]];
    let mut dims = first.shape.to_vec();
    if source.transpose && dims.len() == 2 {
        dims.swap(0, 1);
    }
    if source.stack {
        dims.insert(0, source.names.len());
    }
    let names = source.names.clone();
    let (transpose, tensors) = (source.transpose, tensors.clone());
    let storage = options.storage_of(&source.path, dims.len());
    let dtype = storage.dtype(&dims, store);
    Ok(bridge::deferred(
        source.path.clone(),
        dtype,
        Shape::from(dims.clone()),
        None,
        move || {
            let mut values = Vec::new();
            for name in &names {
                let data = bridge::to_data(&tensors[name])?;
                let shape = data.shape().to_vec();
                let data = data.convert::<f32>().try_into_vec::<f32>().map_err(|e| {
                    burn_store::burn_pack::Error::ValidationError(format!("{name}: {e:?}"))
                })?;
                match (transpose, shape.as_slice()) {
                    (true, &[rows, cols]) => values.extend(transposed(&data, rows, cols)),
                    _ => values.extend(data),
                }
            }
            Ok(storage.encode(TensorData::new(values, dims.clone()), store))
        },
    ))
}

/// `[rows, cols]` row-major to `[cols, rows]`.
fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Where each parameter of `model` comes from in `arch`'s files: one entry per tensor name
/// pattern of the three architectures, a table long by design.
fn sources(model: &MoeTransformer, arch: HfArchitecture) -> Vec<Source> {
    let names = HfNames(arch);
    let mut out = vec![Source::plain(
        "token_embedding.weight".into(),
        "model.embed_tokens.weight".into(),
    )];
    let config = &model.config().decoder;
    for (i, block) in model.stack.blocks.iter().enumerate() {
        let ours = format!("stack.blocks.{i}");
        let theirs = format!("model.layers.{i}");
        out.push(Source::plain(
            format!("{ours}.attention_norm.rms.gamma"),
            format!("{theirs}.input_layernorm.weight"),
        ));
        out.push(Source::plain(
            format!("{ours}.ffn_norm.rms.gamma"),
            format!("{theirs}.post_attention_layernorm.weight"),
        ));
        for (our, their, bias) in [
            ("query", "q_proj", config.qkv_bias),
            ("key", "k_proj", config.qkv_bias),
            ("value", "v_proj", config.qkv_bias),
            ("output", "o_proj", config.output_bias),
        ] {
            let (our, their) = (
                format!("{ours}.attention.{our}"),
                format!("{theirs}.self_attn.{their}"),
            );
            out.push(Source::linear(
                format!("{our}.weight"),
                format!("{their}.weight"),
            ));
            if bias {
                out.push(Source::plain(
                    format!("{our}.bias"),
                    format!("{their}.bias"),
                ));
            }
        }
        if config.qk_norm {
            for (our, their) in [("query_norm", "q_norm"), ("key_norm", "k_norm")] {
                out.push(Source::plain(
                    format!("{ours}.attention.{our}.rms.gamma"),
                    format!("{theirs}.self_attn.{their}.weight"),
                ));
            }
        }
        if let Some(moe) = &block.ffn.moe {
            let experts = moe.config().num_experts;
            let mlp = format!("{theirs}.{}", names.moe_block());
            out.push(Source::linear(
                format!("{ours}.ffn.moe.router.weight"),
                format!("{mlp}.gate.weight"),
            ));
            for (our, role) in [("w_gate", 0), ("w_in", 1), ("w_out", 2)] {
                let per_expert = (0..experts)
                    .map(|j| format!("{mlp}.experts.{j}.{}.weight", names.projection(role)))
                    .collect();
                out.push(Source::stacked(
                    format!("{ours}.ffn.moe.experts.{our}"),
                    per_expert,
                ));
            }
            if moe.shared_experts.is_some() {
                for (our, role) in [("w_gate", 0), ("w_in", 1), ("w_out", 2)] {
                    out.push(Source::stacked(
                        format!("{ours}.ffn.moe.shared_experts.{our}"),
                        vec![format!("{mlp}.shared_expert.{}.weight", MLP[role])],
                    ));
                }
            }
            if moe.shared_gate.is_some() {
                out.push(Source::linear(
                    format!("{ours}.ffn.moe.shared_gate"),
                    format!("{mlp}.shared_expert_gate.weight"),
                ));
            }
        } else {
            for (our, role) in [("w_gate", 0), ("w_in", 1), ("w_out", 2)] {
                out.push(Source::stacked(
                    format!("{ours}.ffn.dense.{our}"),
                    vec![format!("{theirs}.mlp.{}.weight", MLP[role])],
                ));
            }
        }
    }
    out.push(Source::plain(
        "stack.final_norm.rms.gamma".into(),
        "model.norm.weight".into(),
    ));
    if model.lm_head.is_some() {
        out.push(Source::linear(
            "lm_head.weight".into(),
            "lm_head.weight".into(),
        ));
    }
    out
}

/// The SwiGLU projections of a LLaMA-style MLP: gate, up, down.
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// An architecture's names for its MoE block and its experts' projections.
struct HfNames(HfArchitecture);

impl HfNames {
    fn moe_block(&self) -> &'static str {
        match self.0 {
            HfArchitecture::Mixtral => "block_sparse_moe",
            HfArchitecture::Qwen2Moe | HfArchitecture::Olmoe => "mlp",
        }
    }

    /// Role 0: the gate (silu side), 1: up, 2: down.
    fn projection(&self, role: usize) -> &'static str {
        match self.0 {
            HfArchitecture::Mixtral => ["w1", "w3", "w2"][role],
            HfArchitecture::Qwen2Moe | HfArchitecture::Olmoe => MLP[role],
        }
    }
}

/// Our parameters under Hugging Face names, for export: `(name, tensor data)` in the file's
/// layout (`[out, in]` linears, one tensor per expert).
pub(crate) fn hf_tensors(
    model: &MoeTransformer,
    arch: HfArchitecture,
) -> Result<BTreeMap<String, TensorData>, HfError> {
    let ours: HashMap<String, PackTensor> = model
        .collect(None, None, false)
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let mut out = BTreeMap::new();
    for source in sources(model, arch) {
        let tensor = ours.get(&source.path).ok_or_else(|| {
            HfError::Weights(format!("the model has no parameter `{}`", source.path))
        })?;
        let data = bridge::to_data(tensor)
            .map_err(|e| HfError::Weights(format!("{}: {e}", source.path)))?;
        let dims = data.shape().to_vec();
        let values = data
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| HfError::Weights(format!("{}: {e:?}", source.path)))?;
        let pieces = source.names.len();
        let piece_len = values.len() / pieces;
        let piece_dims: Vec<usize> = if source.stack {
            dims[1..].to_vec()
        } else {
            dims.clone()
        };
        for (j, name) in source.names.iter().enumerate() {
            let piece = &values[j * piece_len..(j + 1) * piece_len];
            let data = match (source.transpose, piece_dims.as_slice()) {
                (true, &[rows, cols]) => {
                    TensorData::new(transposed(piece, rows, cols), [cols, rows])
                }
                _ => TensorData::new(piece.to_vec(), piece_dims.clone()),
            };
            out.insert(name.clone(), data);
        }
    }
    Ok(out)
}
