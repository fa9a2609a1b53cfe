//! `adapter_config.json`: the part of PEFT's LoRA config that says how the tensors apply.
//!
//! PEFT scales a module's update by `alpha / r` (`alpha / sqrt(r)` with `use_rslora`), where
//! `r` and `alpha` are the config's `r` and `lora_alpha` unless a key of `rank_pattern` or
//! `alpha_pattern` matches the module's name: the first key, in the file's order, for which
//! the regular expression `(.*\.)?(KEY)$` matches the name from its start
//! (`peft.utils.other.get_pattern_key`). PEFT itself adds such keys (`.*\.gate_up_proj` with
//! twice the rank where per-expert projections are fused), so the keys are read as regular
//! expressions and in order.

use std::path::Path;

use moe_core::lora::{LoraConfig, LoraTarget};
use regex::Regex;
use serde::Deserialize;

use super::HfError;

/// The LoRA adapters of a PEFT folder, as a run takes them (`train --init-lora`).
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapters {
    /// The rank the run's adapters need: the largest of the folder's ranks (an adapter of a
    /// lower rank is held with zero columns, which change nothing and stay zero in training).
    pub rank: usize,
    /// `lora_alpha` for that rank: `s r` where `s` is the folder's default scale.
    pub alpha: f64,
    /// The kinds of weights the folder adapts.
    pub targets: Vec<LoraTarget>,
}

impl PeftAdapters {
    /// The LoRA config of a run that takes these adapters.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig::new(self.rank)
            .with_alpha(Some(self.alpha))
            .with_targets(self.targets.clone())
    }
}

/// The config fields that decide the update.
#[derive(Debug, Clone)]
pub(super) struct PeftConfig {
    /// `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `use_rslora`: scale by `alpha / sqrt(r)`.
    pub rslora: bool,
    /// `rank_pattern`, in the file's order.
    pub rank_pattern: Vec<(Regex, usize)>,
    /// `alpha_pattern`, in the file's order.
    pub alpha_pattern: Vec<(Regex, f64)>,
    /// `target_parameters`.
    pub target_parameters: Vec<String>,
}

impl PeftConfig {
    /// Reads `dir`'s `adapter_config.json`, refusing what is not plain LoRA.
    pub fn read(dir: &Path) -> Result<Self, HfError> {
        let path = dir.join(super::ADAPTER_CONFIG);
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
        if config["use_dora"].as_bool() == Some(true) {
            return Err(bad("use_dora is set; plain LoRA loads here".into()));
        }
        if !matches!(config["bias"].as_str(), None | Some("none")) {
            return Err(bad(format!(
                "bias is {}: adapters that train the base's biases do not load here",
                config["bias"]
            )));
        }
        let rank = config["r"].as_u64().filter(|&r| r > 0);
        let alpha = config["lora_alpha"]
            .as_f64()
            .filter(|a| a.is_finite() && *a > 0.0);
        let (Some(rank), Some(alpha)) = (rank, alpha) else {
            return Err(bad(format!(
                "r {} and lora_alpha {}: a positive rank and alpha are needed",
                config["r"], config["lora_alpha"]
            )));
        };
        let ordered: OrderedPatterns = serde_json::from_str(&text)
            .map_err(|e| bad(format!("rank_pattern or alpha_pattern: {e}")))?;
        let rank_pattern = patterns(ordered.rank_pattern, |v| {
            v.as_u64().filter(|&r| r > 0).map(|r| r as usize)
        })
        .map_err(|e| bad(format!("rank_pattern: {e}")))?;
        let alpha_pattern = patterns(ordered.alpha_pattern, |v| {
            v.as_f64().filter(|a| a.is_finite())
        })
        .map_err(|e| bad(format!("alpha_pattern: {e}")))?;
        let target_parameters = config["target_parameters"]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            rank: rank as usize,
            alpha,
            rslora: config["use_rslora"].as_bool() == Some(true),
            rank_pattern,
            alpha_pattern,
            target_parameters,
        })
    }

    /// The rank and `alpha` PEFT gives the module or parameter named `key`.
    pub fn rank_and_alpha(&self, key: &str) -> (usize, f64) {
        (
            matching(&self.rank_pattern, key).unwrap_or(self.rank),
            matching(&self.alpha_pattern, key).unwrap_or(self.alpha),
        )
    }

    /// The scale of an update of rank `rank` and `alpha`.
    pub fn scale(&self, rank: usize, alpha: f64) -> f64 {
        if self.rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }

    /// The name PEFT matches patterns against for the module whose factors are
    /// `<module>.lora_A.weight`: the module path for an `nn.Linear`, `<module>.<parameter>` for
    /// a parameter (the expert parameters as [`super::sites`] places them).
    pub fn key_of(&self, module: &str) -> String {
        if let Some(experts) = module.strip_suffix(".base_layer") {
            format!("{experts}.gate_up_proj")
        } else if module.ends_with(".experts") {
            let down = self.targets_parameter(super::sites::DOWN);
            format!(
                "{module}.{}",
                if down { "down_proj" } else { "gate_up_proj" }
            )
        } else if module.ends_with(".mlp.gate") {
            format!("{module}.weight")
        } else {
            module.to_string()
        }
    }

    /// Whether `target_parameters` names a parameter whose name ends in `parameter`.
    pub fn targets_parameter(&self, parameter: &str) -> bool {
        let last = parameter.rsplit('.').next().unwrap_or(parameter);
        self.target_parameters.iter().any(|t| t.ends_with(last))
    }
}

/// The pattern objects as the file orders them (`serde_json`'s own map sorts its keys).
#[derive(Deserialize, Default)]
struct OrderedPatterns {
    #[serde(default)]
    rank_pattern: Ordered,
    #[serde(default)]
    alpha_pattern: Ordered,
}

/// A JSON object's entries in the file's order (`null` reads as none).
#[derive(Default)]
struct Ordered(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of module-name patterns")
            }
            fn visit_unit<E>(self) -> Result<Ordered, E> {
                Ok(Ordered::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Ordered, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Ordered(entries))
            }
        }
        deserializer.deserialize_any(Entries)
    }
}

/// The `(pattern, value)` pairs of a pattern object, each value read by `value`, each key
/// compiled as PEFT matches it.
fn patterns<T>(
    ordered: Ordered,
    value: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Vec<(Regex, T)>, String> {
    ordered
        .0
        .into_iter()
        .map(|(key, v)| {
            let pattern = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                format!("the key {key:?} is not a regular expression burn-moe reads: {e}")
            })?;
            value(&v)
                .map(|v| (pattern, v))
                .ok_or_else(|| format!("{key:?} has the value {v}"))
        })
        .collect()
}

/// The value of the first pattern that matches `name`.
fn matching<T: Copy>(patterns: &[(Regex, T)], name: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(pattern, _)| pattern.is_match(name))
        .map(|(_, v)| *v)
}

/// The kind of weight the PEFT tensor `name` adapts, by transformers' module names.
pub(super) fn target_of(name: &str) -> Option<LoraTarget> {
    let module = name
        .strip_suffix(".lora_A.weight")
        .or_else(|| name.strip_suffix(".lora_B.weight"))?;
    let module = module.replace(".base_layer", "");
    if module.contains(".self_attn.") {
        Some(LoraTarget::Attention)
    } else if module.ends_with(".mlp.gate") || module.ends_with(".shared_expert_gate") {
        Some(LoraTarget::Router)
    } else if module.ends_with(".mlp.experts")
        || [".gate_proj", ".up_proj", ".down_proj"]
            .iter()
            .any(|p| module.ends_with(p))
    {
        Some(LoraTarget::Experts)
    } else {
        None
    }
}

/// What a run needs to take the adapters of the PEFT folder `dir` (`train --init-lora`): the
/// rank, `lora_alpha` and targets of the adapters to attach before [`super::load_adapters`]
/// fills them.
///
/// # Errors
///
/// When `adapter_config.json` or `adapter_model.safetensors` cannot be read, the adapters are
/// not plain LoRA, or a tensor adapts a weight burn-moe cannot place.
pub fn read_adapter_config(dir: &Path) -> Result<PeftAdapters, HfError> {
    let config = PeftConfig::read(dir)?;
    let path = dir.join(super::ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&path).map_err(|e| HfError::io(&path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| HfError::Weights(format!("{}: {e}", path.display())))?;
    let mut targets = Vec::new();
    let mut rank = 0;
    for name in file.names() {
        if let Some(module) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        {
            rank = rank.max(config.rank_and_alpha(&config.key_of(module)).0);
        }
        let Some(target) = target_of(name) else {
            return Err(HfError::Unsupported(format!(
                "{} holds {name}: not a LoRA factor of an attention projection, router or \
                 expert that burn-moe can place",
                path.display()
            )));
        };
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    if targets.is_empty() || rank == 0 {
        return Err(HfError::Weights(format!(
            "{} holds no adapters",
            path.display()
        )));
    }
    targets.sort_by_key(|t| LoraTarget::ALL.iter().position(|a| a == t));
    let scale = config.scale(config.rank, config.alpha);
    Ok(PeftAdapters {
        rank,
        alpha: scale * rank as f64,
        targets,
    })
}
