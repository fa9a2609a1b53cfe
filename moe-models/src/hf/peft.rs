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
//! Only adapters on the attention projections are written: transformers 5 holds the routers
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

/// One adapted `nn.Linear`: its module path in transformers and our factors.
struct Adapted {
    module: String,
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
    for Adapted { module, adapter } in &adapted {
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
        for (linear, name) in [
            (&attention.query, "q_proj"),
            (&attention.key, "k_proj"),
            (&attention.value, "v_proj"),
            (&attention.output, "o_proj"),
        ] {
            if let Some(adapter) = linear.weight.reparameterization::<LoraAdapter>() {
                out.push(Adapted {
                    module: format!("model.layers.{i}.self_attn.{name}"),
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
    let encoded: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, data)| {
            let bytes = data
                .iter::<f32>()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>();
            (name.clone(), bytes, data.shape().to_vec())
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(name, bytes, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| HfError::Weights(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| HfError::io(path, e))
}
