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
//! Every adapter of ours has a PEFT form: the attention projections, the shared experts, the
//! dense layers and Qwen2-MoE's `shared_expert_gate` are `nn.Linear`s (`target_modules`); the
//! router and the routed experts are parameters of transformers 5's fused MoE modules
//! (`target_parameters`, PEFT's `ParamWrapper`, whose per-expert layout `layout.rs` gives).
//! One difference: transformers fuses each expert's gate and up projections into
//! `gate_up_proj`, where PEFT learns one `A` for both, so our two rank-`r` adapters are
//! written as one of rank `2 r` (`A` side by side, `B` block-diagonal: exactly the same update;
//! `rank_pattern` and `alpha_pattern` give it rank `2 r` and scale `s`). Read back, a fused
//! adapter of rank `R` becomes two adapters of rank `R` sharing their `A`, again exactly.
//!
//! [`load_adapters`] reads a folder into a model whose adapters [`read_adapter_config`]
//! sized (`train --init-lora`): a folder's adapters of lower rank than the largest are held
//! with zero columns, and each module's scale, where `alpha_pattern` or `rank_pattern` give it
//! one of its own, is folded into its `B`.

mod config;
mod layout;
mod sites;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use burn::module::{ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};
pub use config::{read_adapter_config, PeftAdapters};

use super::{HfArchitecture, HfError};
use crate::MoeTransformer;
use config::PeftConfig;
use layout::{Factors, PeftFactors};
use sites::{sites, Form, Ours, PeftTarget, Site, DOWN, GATE_UP};

/// The file PEFT reads an adapter's config from.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The file PEFT reads an adapter's tensors from.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Writes the LoRA adapters of `model` (an `arch` model) as a PEFT folder in `dir`, naming
/// `base_model` (the base's folder or hub id) as the model they apply to. Returns how many
/// weights carry adapters.
///
/// # Errors
///
/// When the model has no adapters, adapters on weights a transformers model does not have (a
/// noisy gate's noise weight), adapters of different ranks or scales, or the folder cannot be
/// written.
pub fn save_adapters(
    model: &MoeTransformer,
    arch: HfArchitecture,
    dir: &Path,
    base_model: &str,
) -> Result<usize, HfError> {
    let _ = arch; // transformers 5 names the three architectures' modules alike
    let total = moe_core::lora::adapter_count(model);
    let every_site = sites(model, true);
    let (rank, scale) = uniform_rank_and_scale(&every_site)?;
    let experts_adapted = every_site.iter().any(|site| {
        matches!(site.target, PeftTarget::Parameter(DOWN)) && site.adapted() == Some(true)
    });
    let sites = sites(model, experts_adapted);
    let mut tensors = Vec::new();
    let (mut modules, mut parameters) = (BTreeSet::new(), BTreeSet::new());
    let mut covered = 0;
    for site in &sites {
        let factors = match (&site.form, site.adapted()) {
            (_, Some(false)) => continue,
            (Form::Plain(ours), Some(true)) => {
                covered += 1;
                factors_of(ours)
            }
            (Form::GateUp { gate, up }, Some(true)) => {
                covered += 2;
                Factors::fused(&factors_of(gate), &factors_of(up))
            }
            (_, _) => {
                return Err(HfError::Unsupported(format!(
                    "{}: the experts' gate and up projections are adapted apart; transformers \
                     fuses them, so PEFT adapts both or neither",
                    site.key
                )))
            }
        };
        match site.target {
            PeftTarget::Module(name) => modules.insert(name),
            PeftTarget::Parameter(name) => parameters.insert(name),
        };
        let peft = factors.to_peft();
        let (r, e) = (factors.rank, factors.experts);
        tensors.push((site.factor_name("A"), peft.a, vec![r * e, factors.d_in]));
        tensors.push((site.factor_name("B"), peft.b, vec![factors.d_out, r * e]));
    }
    // (No adapters at all was refused above.)
    if covered != total {
        return Err(HfError::Unsupported(format!(
            "the model has {total} adapted weight(s), {covered} of them where a transformers \
             model has a weight PEFT can adapt; export the merged model instead, without \
             `--adapters`"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| HfError::io(dir, e))?;
    write_tensors(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
    let alpha = scale * rank as f64;
    let mut config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": modules.into_iter().collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "init_lora_weights": true,
    });
    if parameters.contains(GATE_UP) {
        // The fused gate and up adapter: rank 2r at the same scale s = alpha / r.
        config["rank_pattern"] = serde_json::json!({ "gate_up_proj": 2 * rank });
        config["alpha_pattern"] = serde_json::json!({ "gate_up_proj": 2.0 * alpha });
    }
    if !parameters.is_empty() {
        config["target_parameters"] = serde_json::json!(parameters.into_iter().collect::<Vec<_>>());
    }
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("a config serialises");
    std::fs::write(&path, text).map_err(|e| HfError::io(&path, e))?;
    Ok(total)
}

/// The rank and scale every adapter at `sites` shares (PEFT's config gives one default pair).
fn uniform_rank_and_scale(sites: &[Site<'_>]) -> Result<(usize, f64), HfError> {
    let all = sites.iter().flat_map(|site| site.form.ours());
    let mut first = None;
    for adapter in all.filter_map(|ours| ours.adapter) {
        let pair = (adapter.rank(), adapter.scale);
        match first {
            None => first = Some(pair),
            Some(seen) if seen != pair => {
                return Err(HfError::Unsupported(
                    "the adapters differ in rank or scale; PEFT's config gives one of each".into(),
                ))
            }
            Some(_) => {}
        }
    }
    first.ok_or_else(|| {
        HfError::Unsupported(
            "the model has no LoRA adapters to write; export the model itself without \
             `--adapters`"
                .into(),
        )
    })
}

/// Our adapter's factors, read to the host.
fn factors_of(ours: &Ours<'_>) -> Factors {
    let adapter = ours.adapter.expect("an adapted weight");
    let [experts, d_in, rank] = adapter.a.shape().dims::<3>();
    let d_out = adapter.b.shape().dims::<3>()[2];
    let values =
        |p: &Param<Tensor<3>>| p.val().into_data().convert::<f32>().iter::<f32>().collect();
    Factors {
        experts,
        d_in,
        d_out,
        rank,
        a: values(&adapter.a),
        b: values(&adapter.b),
    }
}

/// Writes f32 `tensors` (name, values, shape) to the safetensors file `path`.
fn write_tensors(tensors: &[(String, Vec<f32>, Vec<usize>)], path: &Path) -> Result<(), HfError> {
    let encoded: Vec<(String, super::Encoded)> = tensors
        .iter()
        .map(|(name, values, shape)| {
            let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            (
                name.clone(),
                (safetensors::Dtype::F32, bytes, shape.clone()),
            )
        })
        .collect();
    super::write_safetensors(&encoded, path)
}

/// `model` (with LoRA adapters attached, as [`read_adapter_config`] sizes them) with the
/// adapters of the PEFT folder `dir` loaded into them: how a run continues from adapters
/// trained elsewhere. A weight the folder has no adapter for keeps its fresh one (its `B` is
/// zero, so it changes nothing until trained).
///
/// # Errors
///
/// When the folder cannot be read or is not plain LoRA, holds a tensor for a weight the model
/// has no adapter on (or does not have), or a tensor's shape, or rank, differs from what the
/// model's adapter can hold.
pub fn load_adapters(model: MoeTransformer, dir: &Path) -> Result<MoeTransformer, HfError> {
    let config = PeftConfig::read(dir)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&weights_path).map_err(|e| HfError::io(&weights_path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| HfError::Weights(format!("{}: {e}", weights_path.display())))?;
    let file_error = |what: String| HfError::Weights(format!("{}: {what}", weights_path.display()));
    let (gate_up, down) = (
        config.targets_parameter(GATE_UP),
        config.targets_parameter(DOWN),
    );
    let mut factors = HashMap::new();
    let mut used = HashSet::new();
    for site in sites(&model, gate_up && down) {
        // With one expert parameter targeted, both sites' tensors would sit under `experts`:
        // the config says whose they are.
        match site.target {
            PeftTarget::Parameter(GATE_UP) if !gate_up => continue,
            PeftTarget::Parameter(DOWN) if !down => continue,
            _ => {}
        }
        let names = ["A", "B"].map(|f| site.factor_name(f));
        let (Ok(a), Ok(b)) = (file.tensor(&names[0]), file.tensor(&names[1])) else {
            continue;
        };
        used.extend(names.iter().cloned());
        let read = |view: &safetensors::tensor::TensorView<'_>, name: &str| {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(file_error(format!(
                    "{name} is {:?}; adapters load from f32",
                    view.dtype()
                )));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>())
        };
        let peft = PeftFactors {
            a: read(&a, &names[0])?,
            b: read(&b, &names[1])?,
        };
        for (path, ours) in site_factors(&site, &config, &peft, [a.shape(), b.shape()])
            .map_err(|what| file_error(format!("{}: {what}", site.prefix)))?
        {
            factors.insert(path, ours);
        }
    }
    if let Some(other) = file.names().into_iter().find(|n| !used.contains(*n)) {
        return Err(HfError::Unsupported(format!(
            "{} holds {other}, which is not a LoRA factor of a weight this model has with an \
             adapter",
            weights_path.display()
        )));
    }
    let mut loader = FactorLoader {
        path: Vec::new(),
        factors,
        error: None,
    };
    let model = burn::module::Module::map(model, &mut loader);
    match loader.error {
        Some(error) => Err(error),
        None => Ok(model),
    }
}

/// The factors of our weights at `site` from PEFT's `peft` tensors (of shapes `shapes`), in
/// the rank and scale of our adapters there.
fn site_factors(
    site: &Site<'_>,
    config: &PeftConfig,
    peft: &PeftFactors,
    shapes: [&[usize]; 2],
) -> Result<Vec<(String, Factors)>, String> {
    let (rank, alpha) = config.rank_and_alpha(&site.key);
    let scale = config.scale(rank, alpha);
    let ours = site.form.ours();
    let mut adapters = Vec::new();
    for ours in &ours {
        let Some(adapter) = ours.adapter else {
            return Err(format!("the run has no adapter on {}", ours.path));
        };
        adapters.push(adapter);
    }
    let [experts, d_in, ours_rank] = adapters[0].a.shape().dims::<3>();
    let d_out: usize = adapters.iter().map(|a| a.b.shape().dims::<3>()[2]).sum();
    let expected = [vec![rank * experts, d_in], vec![d_out, rank * experts]];
    if shapes != [expected[0].as_slice(), expected[1].as_slice()] {
        return Err(format!(
            "the factors are {:?} and {:?}; rank {rank} over {experts} expert(s) of {d_in} -> \
             {d_out} needs {:?} and {:?}",
            shapes[0], shapes[1], expected[0], expected[1]
        ));
    }
    if rank > ours_rank {
        return Err(format!(
            "rank {rank} is above the run's adapters' rank {ours_rank}"
        ));
    }
    let ratio = (scale / adapters[0].scale) as f32;
    let fused = Factors::from_peft(peft, experts, d_in, d_out, rank, ratio);
    let parts = match ours.len() {
        1 => vec![fused],
        _ => {
            let (gate, up) = fused.split_outputs(adapters[0].b.shape().dims::<3>()[2]);
            vec![gate, up]
        }
    };
    Ok(ours
        .iter()
        .zip(parts)
        .map(|(ours, part)| (ours.path.clone(), part.padded(ours_rank)))
        .collect())
}

/// Replaces the adapters' factors at the given weight paths.
struct FactorLoader {
    path: Vec<String>,
    /// Our weight path -> its factors.
    factors: HashMap<String, Factors>,
    error: Option<HfError>,
}

impl ModuleMapper for FactorLoader {
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
        let Some(factors) = self.factors.get(&weight) else {
            return param;
        };
        let (values, dims) = if self.path[n - 1] == "a" {
            (&factors.a, [factors.experts, factors.d_in, factors.rank])
        } else {
            (&factors.b, [factors.experts, factors.rank, factors.d_out])
        };
        if param.shape().dims::<D>().as_slice() != dims {
            self.error = Some(HfError::Weights(format!(
                "{weight}: the adapter is {:?}, the folder's factor {dims:?}",
                param.shape().dims::<D>()
            )));
            return param;
        }
        let values = values.clone();
        param.map(|tensor| {
            let loaded =
                Tensor::<D>::from_data(TensorData::new(values, tensor.shape()), &tensor.device());
            loaded
                .cast(tensor.dtype())
                .set_require_grad(tensor.is_require_grad())
        })
    }
}
