//! `config.json` of a Hugging Face MoE decoder to a [`MoeTransformerConfig`], and back.
//!
//! The formulas each architecture computes are read from its modeling file in `transformers`
//! (`modeling_mixtral.py`, `modeling_qwen2_moe.py`, `modeling_olmoe.py`); all three are
//! pre-norm RMSNorm decoders with half-split rotary positions, a softmax-then-top-k router
//! and SwiGLU experts without biases. What differs is mapped onto our options:
//!
//! | | Mixtral | Qwen2-MoE | OLMoE |
//! |---|---|---|---|
//! | top-k weights renormalised | always | `norm_topk_prob` | `norm_topk_prob` |
//! | q/k/v biases | no | `qkv_bias` (default yes) | `attention_bias` |
//! | output projection bias | no | no | `attention_bias` |
//! | shared expert | no | one, own width, sigmoid gate | no |
//! | q/k RMSNorm, clipping | no | no | yes, `clip_qkv` |
//! | dense layers | none | `decoder_sparse_step`, `mlp_only_layers` | none |

use serde_json::{json, Map, Value};

use moe_core::gate::SoftmaxTopKGate;
use moe_core::{CapacityConfig, ExpertConfig, ExpertKind, GateConfig, LossConfig, MoeConfig};

use super::HfError;
use crate::{DecoderConfig, MoeTransformerConfig, NormKind, PositionKind, RotaryPairing};

/// The Hugging Face MoE architectures burn-moe reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArchitecture {
    /// `MixtralForCausalLM` (Jiang et al. 2024).
    Mixtral,
    /// `Qwen2MoeForCausalLM` (Qwen1.5-MoE, Qwen2-57B-A14B).
    Qwen2Moe,
    /// `OlmoeForCausalLM` (Muennighoff et al. 2024).
    Olmoe,
}

impl HfArchitecture {
    /// Every supported architecture.
    pub const ALL: [HfArchitecture; 3] = [Self::Mixtral, Self::Qwen2Moe, Self::Olmoe];

    /// The `model_type` of its `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
            Self::Olmoe => "olmoe",
        }
    }

    /// The transformers class, as `config.json` lists it under `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Mixtral => "MixtralForCausalLM",
            Self::Qwen2Moe => "Qwen2MoeForCausalLM",
            Self::Olmoe => "OlmoeForCausalLM",
        }
    }

    /// The architecture of a `model_type`.
    pub fn from_model_type(model_type: &str) -> Result<Self, HfError> {
        Self::ALL
            .into_iter()
            .find(|arch| arch.model_type() == model_type)
            .ok_or_else(|| {
                HfError::Unsupported(format!(
                    "model_type \"{model_type}\"; burn-moe reads {}",
                    Self::ALL
                        .map(|a| format!("\"{}\"", a.model_type()))
                        .join(", ")
                ))
            })
    }
}

/// Reads fields of `config.json`, naming the one that is missing or of the wrong type.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|value| !value.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize, HfError> {
        let value = self
            .get(key)
            .ok_or_else(|| HfError::Config(format!("`{key}` is missing")))?;
        value
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| HfError::Config(format!("`{key}` is {value}, not a whole number")))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, HfError> {
        match self.get(key) {
            Some(_) => self.usize(key),
            None => Ok(default),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, HfError> {
        match self.get(key) {
            Some(value) => value
                .as_f64()
                .ok_or_else(|| HfError::Config(format!("`{key}` is {value}, not a number"))),
            None => Ok(default),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, HfError> {
        match self.get(key) {
            Some(value) => value
                .as_bool()
                .ok_or_else(|| HfError::Config(format!("`{key}` is {value}, not true or false"))),
            None => Ok(default),
        }
    }

    fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str, HfError> {
        match self.get(key) {
            Some(value) => value
                .as_str()
                .ok_or_else(|| HfError::Config(format!("`{key}` is {value}, not a string"))),
            None => Ok(default),
        }
    }
}

/// The architecture and our model config for a parsed `config.json`. One statement per
/// field of the file, in one place so that each mapping can be read beside the others.
pub fn from_hf_config(json: &Value) -> Result<(HfArchitecture, MoeTransformerConfig), HfError> {
    let map = json
        .as_object()
        .ok_or_else(|| HfError::Config("is not a JSON object".into()))?;
    let f = Fields(map);
    let arch = HfArchitecture::from_model_type(f.str_or("model_type", "")?)?;
    refuse_unsupported(&f, arch)?;

    let d_model = f.usize("hidden_size")?;
    let num_heads = f.usize("num_attention_heads")?;
    if let Some(head_dim) = f.get("head_dim") {
        if head_dim.as_u64() != Some((d_model / num_heads.max(1)) as u64) {
            return Err(HfError::Unsupported(format!(
                "`head_dim` {head_dim} differs from hidden_size / num_attention_heads = {}",
                d_model / num_heads.max(1)
            )));
        }
    }
    let (num_experts, expert_hidden) = match arch {
        HfArchitecture::Mixtral => (f.usize("num_local_experts")?, f.usize("intermediate_size")?),
        HfArchitecture::Qwen2Moe => (f.usize("num_experts")?, f.usize("moe_intermediate_size")?),
        HfArchitecture::Olmoe => (f.usize("num_experts")?, f.usize("intermediate_size")?),
    };
    let renormalize = match arch {
        HfArchitecture::Mixtral => true,
        HfArchitecture::Qwen2Moe | HfArchitecture::Olmoe => f.bool_or("norm_topk_prob", false)?,
    };
    let mut moe = MoeConfig::new(
        d_model,
        num_experts,
        ExpertConfig::new(expert_hidden).with_kind(ExpertKind::SwiGlu),
    )
    .with_top_k(f.usize("num_experts_per_tok")?)
    .with_gate(GateConfig::SoftmaxTopK(
        SoftmaxTopKGate::new().with_renormalize(renormalize),
    ))
    .with_capacity(CapacityConfig::dropless())
    .with_losses(
        LossConfig::new()
            .with_balance_weight(f.f64_or("router_aux_loss_coef", 0.01)?)
            .with_z_loss_weight(0.0),
    );
    if arch == HfArchitecture::Qwen2Moe {
        moe = moe
            .with_shared_experts(1)
            .with_shared_d_hidden(Some(f.usize("shared_expert_intermediate_size")?))
            .with_shared_gate(true);
    }

    let (qkv_bias, output_bias) = match arch {
        HfArchitecture::Mixtral => (false, false),
        HfArchitecture::Qwen2Moe => (f.bool_or("qkv_bias", true)?, false),
        HfArchitecture::Olmoe => {
            let bias = f.bool_or("attention_bias", false)?;
            (bias, bias)
        }
    };
    let d_ff = match arch {
        HfArchitecture::Qwen2Moe => f.usize("intermediate_size")?,
        _ => expert_hidden,
    };
    let mut decoder = DecoderConfig::new(
        f.usize_or("max_position_embeddings", 4096)?,
        d_model,
        f.usize("num_hidden_layers")?,
        num_heads,
        d_ff,
        moe,
    )
    .with_norm(NormKind::RmsNorm)
    .with_norm_epsilon(f.f64_or("rms_norm_eps", 1e-6)?)
    .with_positions(PositionKind::Rotary)
    .with_rope_theta(rope_theta(&f)?)
    .with_rotary_pairing(RotaryPairing::HalfSplit)
    .with_num_kv_heads(Some(f.usize_or("num_key_value_heads", num_heads)?))
    .with_qkv_bias(qkv_bias)
    .with_output_bias(output_bias);
    match arch {
        HfArchitecture::Qwen2Moe => {
            decoder = decoder
                .with_moe_every(f.usize_or("decoder_sparse_step", 1)?)
                .with_dense_layers(usize_list(&f, "mlp_only_layers")?);
        }
        HfArchitecture::Olmoe => {
            let clip = match f.get("clip_qkv") {
                Some(_) => Some(f.f64_or("clip_qkv", 0.0)?),
                None => None,
            };
            decoder = decoder.with_qk_norm(true).with_qkv_clip(clip);
        }
        HfArchitecture::Mixtral => {}
    }
    let config = MoeTransformerConfig::new(f.usize("vocab_size")?, decoder)
        .with_tie_embeddings(f.bool_or("tie_word_embeddings", false)?);
    config.validate()?;
    Ok((arch, config))
}

/// The rotary base: `rope_theta`, or `rope_parameters.rope_theta` (transformers 5).
fn rope_theta(f: &Fields<'_>) -> Result<f64, HfError> {
    if let Some(parameters) = f.get("rope_parameters").and_then(Value::as_object) {
        return Fields(parameters).f64_or("rope_theta", 10000.0);
    }
    f.f64_or("rope_theta", 10000.0)
}

fn usize_list(f: &Fields<'_>, key: &str) -> Result<Vec<usize>, HfError> {
    let Some(value) = f.get(key) else {
        return Ok(Vec::new());
    };
    value
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| HfError::Config(format!("`{key}` is {value}, not a list of layer numbers")))
}

/// Settings that change the computation in ways our model does not reproduce.
fn refuse_unsupported(f: &Fields<'_>, arch: HfArchitecture) -> Result<(), HfError> {
    let act = f.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(HfError::Unsupported(format!(
            "`hidden_act` \"{act}\"; the experts are SwiGLU (silu)"
        )));
    }
    let scaling = f
        .get("rope_scaling")
        .or_else(|| f.get("rope_parameters"))
        .and_then(Value::as_object)
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str);
    if let Some(kind) = scaling.filter(|kind| *kind != "default") {
        return Err(HfError::Unsupported(format!(
            "rope scaling \"{kind}\"; only plain rotary positions are implemented"
        )));
    }
    let sliding = match arch {
        HfArchitecture::Qwen2Moe => f.bool_or("use_sliding_window", false)?,
        _ => f
            .get("sliding_window")
            .is_some_and(|w| w.as_u64() != Some(0)),
    };
    if sliding {
        return Err(HfError::Unsupported(
            "sliding-window attention; every position attends to the whole context here".into(),
        ));
    }
    Ok(())
}

/// The `config.json` of `config` in `arch`'s form, when its options fit that architecture;
/// the error names the first option that does not. One statement per field of the file,
/// the inverse of [`from_hf_config`] line by line.
pub fn to_hf_config(config: &MoeTransformerConfig, arch: HfArchitecture) -> Result<Value, HfError> {
    let d = &config.decoder;
    let moe = &d.moe;
    let misfit = |what: &str| {
        Err(HfError::Unsupported(format!(
            "{what}, which {} does not have",
            arch.class_name()
        )))
    };
    let renormalize = match &moe.gate {
        GateConfig::SoftmaxTopK(gate) => gate.renormalize,
        other => return misfit(&format!("the {} gate", other.name())),
    };
    if moe.expert.kind != ExpertKind::SwiGlu {
        return misfit("experts that are not SwiGLU");
    }
    if d.norm != NormKind::RmsNorm || d.positions != PositionKind::Rotary {
        return misfit("LayerNorm or learned positions");
    }
    if d.rotary_pairing != RotaryPairing::HalfSplit {
        return misfit("adjacent rotary pairs");
    }
    if !moe.capacity.dropless || moe.routed_scale != 1.0 || moe.balance_bias.is_some() {
        return misfit("a capacity limit, a routed scale or a balancing bias");
    }
    let all_moe = d.num_moe_layers() == d.num_layers;
    let mut map = json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "vocab_size": config.vocab_size,
        "hidden_size": d.d_model,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.kv_heads(),
        "max_position_embeddings": d.context_length,
        "rms_norm_eps": d.norm_epsilon,
        "rope_theta": d.rope_theta,
        "hidden_act": "silu",
        "num_experts_per_tok": moe.top_k,
        "tie_word_embeddings": config.tie_embeddings,
        "router_aux_loss_coef": moe.losses.balance_weight,
        "torch_dtype": "float32",
    });
    let fields = map.as_object_mut().expect("a JSON object");
    let mut set = |key: &str, value: Value| {
        fields.insert(key.to_string(), value);
    };
    let shared = moe.shared_experts > 0;
    match arch {
        HfArchitecture::Mixtral => {
            if !renormalize || shared || !all_moe || d.qkv_bias || d.output_bias || d.qk_norm {
                return misfit(
                    "plain top-k weights, shared experts, dense layers, biases or q/k norms",
                );
            }
            set("num_local_experts", json!(moe.num_experts));
            set("intermediate_size", json!(moe.expert.d_hidden));
        }
        HfArchitecture::Qwen2Moe => {
            if moe.shared_experts != 1 || !moe.shared_gate || d.output_bias || d.qk_norm {
                return misfit("no gated shared expert, an output bias or q/k norms");
            }
            set("num_experts", json!(moe.num_experts));
            set("moe_intermediate_size", json!(moe.expert.d_hidden));
            set("shared_expert_intermediate_size", json!(moe.shared_width()));
            set("intermediate_size", json!(d.d_ff));
            set("norm_topk_prob", json!(renormalize));
            set("qkv_bias", json!(d.qkv_bias));
            set("decoder_sparse_step", json!(d.moe_every));
            set("mlp_only_layers", json!(d.dense_layers));
            set("use_sliding_window", json!(false));
        }
        HfArchitecture::Olmoe => {
            if shared || !all_moe || !d.qk_norm || d.qkv_bias != d.output_bias {
                return misfit(
                    "shared experts, dense layers, no q/k norms or biases on some projections only",
                );
            }
            set("num_experts", json!(moe.num_experts));
            set("intermediate_size", json!(moe.expert.d_hidden));
            set("norm_topk_prob", json!(renormalize));
            set("attention_bias", json!(d.qkv_bias));
            set("clip_qkv", json!(d.qkv_clip));
        }
    }
    Ok(map)
}

/// The architecture our `config` fits first, in the order Mixtral, Qwen2-MoE, OLMoE.
pub fn fitting_architecture(config: &MoeTransformerConfig) -> Option<HfArchitecture> {
    HfArchitecture::ALL
        .into_iter()
        .find(|&arch| to_hf_config(config, arch).is_ok())
}
