//! LoRA adapters as a PEFT folder (Hugging Face's `peft` library): `adapter_config.json` and
//! `adapter_model.safetensors`, which `PeftModel.from_pretrained(base, dir)` applies to the base
//! model loaded by transformers.
//!
//! PEFT's LoRA on an `nn.Linear` holds `lora_A.weight: [r, in]` and `lora_B.weight: [out, r]`
//! and adds `(lora_alpha / r) B A` to the `[out, in]` weight (Hu et al. 2021). Ours holds
//! `A: [d_in, r]` and `B: [r, d_out]` per weight and adds `s A B` to the `[d_in, d_out]`
//! weight, so PEFT's factors are ours transposed and `lora_alpha = s r`. The tensors are named
//! `base_model.model.<module>.lora_{A,B}.weight`, `<module>` the Linear's path in the
//! transformers model (`model.layers.0.self_attn.q_proj`).
//!
//! [`load_adapters`] reads such a folder back into a model with adapters attached (`train
//! --init-lora`). Only adapters on the attention projections are written or read: transformers 5 holds the routers
//! and the experts (fused into 3-D parameters) in modules whose PEFT form could not be checked
//! against peft here; a model with adapters there is refused by name.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use moe_core::lora::LoraAdapter;

use super::{HfArchitecture, HfError};
use crate::MoeTransformer;

/// The file PEFT reads an adapter's config from.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The file PEFT reads an adapter's tensors from.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// One adapted `nn.Linear`: its module path in transformers, our weight's path and our
/// factors.
struct Adapted {
    module: String,
    path: String,
    adapter: LoraAdapter,
}

/// Writes the LoRA adapters of `model` (an `arch` model) as a PEFT folder in `dir`, naming
/// `base_model` (the base's folder or hub id) as the model they apply to. Returns how many
/// weights carry adapters.
///
/// # Errors
///
/// When the model has no adapters, adapters on weights other than the attention
/// projections, adapters of different ranks or scales, or the folder cannot be written.
pub fn save_adapters(
    model: &MoeTransformer,
    arch: HfArchitecture,
    dir: &Path,
    base_model: &str,
) -> Result<usize, HfError> {
    let _ = arch; // the attention projections are named alike in the three architectures
    let adapted = attention_adapters(model);
    let total = moe_core::lora::adapter_count(model);
    if adapted.is_empty() || adapted.len() != total {
        return Err(HfError::Unsupported(format!(
            "a PEFT folder holds adapters on the attention projections alone; this model has \
             {total} adapted weight(s), {} of them attention projections (routers' and \
             experts' adapters: export the merged model instead, without `--adapters`)",
            adapted.len()
        )));
    }
    let first = &adapted[0].adapter;
    let (rank, scale) = (first.rank(), first.scale);
    if adapted
        .iter()
        .any(|a| a.adapter.rank() != rank || a.adapter.scale != scale)
    {
        return Err(HfError::Unsupported(
            "the adapters differ in rank or scale; PEFT's config gives one of each".into(),
        ));
    }
    let mut tensors = Vec::with_capacity(2 * adapted.len());
    for Adapted {
        module, adapter, ..
    } in &adapted
    {
        let name = |factor: &str| format!("base_model.model.{module}.lora_{factor}.weight");
        tensors.push((name("A"), transposed(&adapter.a)));
        tensors.push((name("B"), transposed(&adapter.b)));
    }
    std::fs::create_dir_all(dir).map_err(|e| HfError::io(dir, e))?;
    write_tensors(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": scale * rank as f64,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "init_lora_weights": true,
    });
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("a config serialises");
    std::fs::write(&path, text).map_err(|e| HfError::io(&path, e))?;
    Ok(adapted.len())
}

/// The adapters on the attention projections, with their transformers module paths.
fn attention_adapters(model: &MoeTransformer) -> Vec<Adapted> {
    let mut out = Vec::new();
    for (i, block) in model.stack.blocks.iter().enumerate() {
        let attention = &block.attention;
        for (linear, field, name) in [
            (&attention.query, "query", "q_proj"),
            (&attention.key, "key", "k_proj"),
            (&attention.value, "value", "v_proj"),
            (&attention.output, "output", "o_proj"),
        ] {
            if let Some(adapter) = linear.weight.reparameterization::<LoraAdapter>() {
                out.push(Adapted {
                    module: format!("model.layers.{i}.self_attn.{name}"),
                    path: format!("stack.blocks.{i}.attention.{field}.weight"),
                    adapter: adapter.clone(),
                });
            }
        }
    }
    out
}

/// A `[1, m, n]` factor as PEFT holds it: `[n, m]`, f32.
fn transposed(factor: &Param<Tensor<3>>) -> TensorData {
    let [_, m, n] = factor.shape().dims::<3>();
    factor
        .val()
        .reshape([m, n])
        .transpose()
        .into_data()
        .convert::<f32>()
}

/// Writes f32 `tensors` to the safetensors file `path`.
fn write_tensors(tensors: &[(String, TensorData)], path: &Path) -> Result<(), HfError> {
    let encoded: Vec<(String, super::Encoded)> = tensors
        .iter()
        .map(|(name, data)| {
            let bytes = data.iter::<f32>().flat_map(|x| x.to_le_bytes()).collect();
            let shape = data.shape().to_vec();
            (name.clone(), (safetensors::Dtype::F32, bytes, shape))
        })
        .collect();
    super::write_safetensors(&encoded, path)
}

/// `model` (with LoRA adapters attached) with the adapters of the PEFT folder `dir` loaded over
/// its attention adapters: how a run continues from adapters trained elsewhere. The folder's
/// `r` and `lora_alpha` must be the model's rank and `s r`; a projection the folder has no
/// adapter for keeps its fresh one (its `B` is zero, so it changes nothing until trained).
///
/// # Errors
///
/// When the folder cannot be read, is not a LoRA adapter, targets modules other than the
/// attention projections, or its rank, scale or shapes differ from the model's adapters.
pub fn load_adapters(model: MoeTransformer, dir: &Path) -> Result<MoeTransformer, HfError> {
    let (rank, alpha) = read_adapter_config(dir)?;
    let config_path = dir.join(ADAPTER_CONFIG);
    let bad = |what: String| HfError::Config(format!("{}: {what}", config_path.display()));
    let adapted = attention_adapters(&model);
    let Some(first) = adapted.first().map(|a| &a.adapter) else {
        return Err(HfError::Unsupported(
            "the model has no adapters on its attention projections to load a PEFT folder into"
                .into(),
        ));
    };
    let expected_alpha = first.scale * first.rank() as f64;
    if rank != first.rank() || (alpha - expected_alpha).abs() > 1e-9 * expected_alpha.abs() {
        return Err(bad(format!(
            "r {rank} and lora_alpha {alpha}, where the run's adapters have rank {} and alpha {expected_alpha}",
            first.rank()
        )));
    }
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights_path).map_err(|e| HfError::io(&weights_path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| HfError::Weights(format!("{}: {e}", weights_path.display())))?;
    let ours: Vec<String> = adapted
        .iter()
        .flat_map(|a| ["A", "B"].map(|f| format!("base_model.model.{}.lora_{f}.weight", a.module)))
        .collect();
    if let Some(other) = file
        .names()
        .into_iter()
        .find(|name| !ours.iter().any(|o| o == name))
    {
        return Err(HfError::Unsupported(format!(
            "{} holds {other}: only adapters on the attention projections load here",
            weights_path.display()
        )));
    }
    let mut loader = FactorLoader {
        path: Vec::new(),
        modules: adapted
            .iter()
            .map(|a| (a.module.clone(), a.path.clone()))
            .collect(),
        file: &file,
        error: None,
    };
    let model = burn::module::Module::map(model, &mut loader);
    match loader.error {
        Some(error) => Err(error),
        None => Ok(model),
    }
}

/// The rank `r` and `lora_alpha` of the PEFT LoRA folder `dir`, refusing a folder whose
/// adapters are not plain LoRA on the attention projections (`q_proj`, `k_proj`, `v_proj`,
/// `o_proj`).
///
/// # Errors
///
/// When `adapter_config.json` cannot be read or says otherwise.
pub fn read_adapter_config(dir: &Path) -> Result<(usize, f64), HfError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| HfError::io(&path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| HfError::Config(format!("{}: {e}", path.display())))?;
    let bad = |what: String| HfError::Config(format!("{}: {what}", path.display()));
    if config["peft_type"] != "LORA" {
        return Err(bad(format!(
            "peft_type is {}, not LORA",
            config["peft_type"]
        )));
    }
    for flag in ["use_dora", "use_rslora"] {
        if config[flag].as_bool() == Some(true) {
            return Err(bad(format!("{flag} is set; plain LoRA loads here")));
        }
    }
    let attention = ["q_proj", "k_proj", "v_proj", "o_proj"];
    let targets = config["target_modules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if targets.is_empty()
        || targets
            .iter()
            .any(|t| !attention.contains(&t.as_str().unwrap_or("")))
    {
        return Err(bad(format!(
            "target_modules {}: only adapters on the attention projections ({}) load here",
            config["target_modules"],
            attention.join(", ")
        )));
    }
    let rank = config["r"].as_u64().filter(|&r| r > 0);
    let alpha = config["lora_alpha"]
        .as_f64()
        .filter(|a| a.is_finite() && *a > 0.0);
    match (rank, alpha) {
        (Some(rank), Some(alpha)) => Ok((rank as usize, alpha)),
        _ => Err(bad(format!(
            "r {} and lora_alpha {}: a positive rank and alpha are needed",
            config["r"], config["lora_alpha"]
        ))),
    }
}

/// Replaces the adapters' factors with those of a PEFT file, transposed back.
struct FactorLoader<'a> {
    path: Vec<String>,
    /// (transformers module, our weight path) of each adapted projection.
    modules: Vec<(String, String)>,
    file: &'a safetensors::SafeTensors<'a>,
    error: Option<HfError>,
}

impl burn::module::ModuleMapper for FactorLoader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let n = self.path.len();
        if n < 3 || self.path[n - 2] != "lora" {
            return param;
        }
        let weight = self.path[..n - 2].join(".");
        let Some((module, _)) = self.modules.iter().find(|(_, ours)| *ours == weight) else {
            return param;
        };
        let factor = if self.path[n - 1] == "a" { "A" } else { "B" };
        let name = format!("base_model.model.{module}.lora_{factor}.weight");
        let Ok(view) = self.file.tensor(&name) else {
            return param; // no adapter for this projection in the folder: the fresh one stays
        };
        let dims = param.shape().dims::<D>();
        let (m, n) = (dims[D - 2], dims[D - 1]);
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != [n, m] {
            self.error = Some(HfError::Weights(format!(
                "{name} is {:?} {:?}; the run's adapter needs F32 [{n}, {m}]",
                view.dtype(),
                view.shape()
            )));
            return param;
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        param.map(|tensor| {
            let device = tensor.device();
            let loaded = Tensor::<2>::from_data(TensorData::new(values, [n, m]), &device)
                .transpose()
                .reshape(dims);
            loaded
                .cast(tensor.dtype())
                .set_require_grad(tensor.is_require_grad())
        })
    }
}
