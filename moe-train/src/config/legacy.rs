//! The flat `model` layout that config files, runs and checkpoints used before `model` became
//! moe-models' own [`DecoderConfig`], rewritten into today's layout so that they keep loading.
//!
//! The flat layout held the MoE layer's fields beside the decoder's (`model.experts`,
//! `model.gate = "naive"`, `model.capacity_factor`, ...) and what is now the `variant` section
//! (`model.dense`, `model.hf`, `model.lora`). Each flat key has one place in today's layout
//! ([`new_place`]); a key it does not know is left where it is, for the unknown-key check to
//! name.

use serde_json::{Map, Value};

use super::*;

/// Flat keys that today's `model` section does not have: one of them marks the flat layout.
const FLAT_ONLY: [&str; 15] = [
    "experts",
    "top_k",
    "expert_hidden",
    "shared_experts",
    "gate",
    "expert",
    "capacity_factor",
    "eval_capacity_factor",
    "dropless",
    "aux_loss_weight",
    "z_loss_weight",
    "routed_scale",
    "dense",
    "hf",
    "lora",
];

/// Where a flat `model` key lives today: its section (`model` or `variant`) and its path in
/// it. `d_model` is both the decoder's and its MoE layer's width.
fn new_place(key: &str) -> Vec<(&'static str, Vec<&str>)> {
    let moe = |path: &[&'static str]| ("model", [&["moe"], path].concat());
    match key {
        "d_model" => vec![("model", vec!["d_model"]), moe(&["d_model"])],
        "experts" => vec![moe(&["num_experts"])],
        "top_k" => vec![moe(&["top_k"])],
        "expert_hidden" => vec![moe(&["expert", "d_hidden"])],
        "expert" => vec![moe(&["expert", "kind"])],
        "shared_experts" => vec![moe(&["shared_experts"])],
        "gate" => vec![moe(&["gate"])],
        "routed_scale" => vec![moe(&["routed_scale"])],
        "capacity_factor" => vec![moe(&["capacity", "train_factor"])],
        "eval_capacity_factor" => vec![moe(&["capacity", "eval_factor"])],
        "dropless" => vec![moe(&["capacity", "dropless"])],
        "aux_loss_weight" => vec![moe(&["losses", "balance_weight"])],
        "z_loss_weight" => vec![moe(&["losses", "z_loss_weight"])],
        "dense" | "hf" | "lora" => vec![("variant", vec![key])],
        other => vec![("model", vec![other])],
    }
}

/// Rewrites `config` (a whole config's JSON, or a config file's subset of it) from the flat
/// `model` layout into today's, in place; a config in today's layout is left as it is.
/// Returns each flat key that moved and where to, for a note to the user.
pub(super) fn upgrade(config: &mut Value) -> Result<Vec<(String, String)>> {
    let Some(Value::Object(model)) = config.get("model") else {
        return Ok(Vec::new());
    };
    if !model.keys().any(|key| FLAT_ONLY.contains(&key.as_str())) {
        return Ok(Vec::new());
    }
    let model = model.clone();
    let mut sections: Map<String, Value> = Map::new();
    let mut moved = Vec::new();
    for (key, value) in model {
        let value = match key.as_str() {
            "gate" => gate_config(&value)?,
            "expert" => expert_kind(&value)?,
            _ => value,
        };
        for (section, path) in new_place(&key) {
            let new_key = format!("{section}.{}", path.join("."));
            if new_key != format!("model.{key}") {
                moved.push((format!("model.{key}"), new_key));
            }
            let slot = sections
                .entry(section)
                .or_insert_with(|| Value::Object(Map::new()));
            insert_at(slot, &path, value.clone());
        }
    }
    let whole = config.as_object_mut().expect("it has a `model` key");
    whole.remove("model");
    for (section, value) in sections {
        match whole.get_mut(&section) {
            Some(existing) => super::file::merge(existing, value),
            None => {
                whole.insert(section, value);
            }
        }
    }
    Ok(moved)
}

/// Puts `value` at `path` under `slot`, making the objects on the way (and merging it into
/// what a key of today's layout put there before it).
fn insert_at(slot: &mut Value, path: &[&str], value: Value) {
    let (last, parents) = path.split_last().expect("a path has a key");
    let mut object = slot;
    for key in parents {
        object = object
            .as_object_mut()
            .expect("only objects are made on the way")
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if let Some(map) = object.as_object_mut() {
        match map.get_mut(*last) {
            Some(existing) => super::file::merge(existing, value),
            None => {
                map.insert(last.to_string(), value);
            }
        }
    }
}

/// The flat layout's gate name (`"softmax-top-k"`, ...) as today's [`GateConfig`].
fn gate_config(name: &Value) -> Result<Value> {
    // The flat layout named gates as `--gate` does.
    let gate = name
        .as_str()
        .and_then(|name| <GateName as clap::ValueEnum>::from_str(name, false).ok())
        .ok_or_else(|| {
            TrainError::Config(format!(
                "`model.gate` is {name}; give one of \"naive\", \"softmax-top-k\", \"noisy\", \"gshard\", \"switch\" (or today's `model.moe.gate`)"
            ))
        })?;
    Ok(serde_json::to_value(gate.config()).expect("a gate config serialises"))
}

/// The flat layout's expert form (`"ffn"`, `"relu"`, `"swiglu"`) as today's [`ExpertKind`].
fn expert_kind(name: &Value) -> Result<Value> {
    let kind = match name.as_str() {
        Some("ffn") => ExpertKind::Ffn(Activation::Gelu),
        Some("relu") => ExpertKind::Ffn(Activation::Relu),
        Some("swiglu") => ExpertKind::SwiGlu,
        _ => {
            return Err(TrainError::Config(format!(
                "`model.expert` is {name}; give one of \"ffn\", \"relu\", \"swiglu\" (or today's `model.moe.expert.kind`)"
            )))
        }
    };
    Ok(serde_json::to_value(kind).expect("an expert kind serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flat key lands where the flat layout's mapping (`TrainConfig::moe_config` and
    /// `decoder_config` of 0a8249e, written out here by hand) put it.
    #[test]
    fn a_flat_model_section_moves_key_by_key() {
        let mut config = serde_json::json!({
            "model": {
                "d_model": 16, "num_layers": 2, "experts": 4, "top_k": 2, "expert_hidden": 8,
                "gate": "switch", "expert": "relu", "capacity_factor": 1.5, "dropless": true,
                "aux_loss_weight": 0.5, "z_loss_weight": 0.25, "routed_scale": 2.0, "dense": true
            },
            "optim": { "lr": 0.1 }
        });
        let moved = upgrade(&mut config).unwrap();
        let model = &config["model"];
        assert_eq!(model["d_model"], 16);
        assert_eq!(model["num_layers"], 2);
        let moe = &model["moe"];
        assert_eq!(moe["d_model"], 16);
        assert_eq!(moe["num_experts"], 4);
        assert_eq!(moe["top_k"], 2);
        assert_eq!(moe["expert"]["d_hidden"], 8);
        assert_eq!(moe["expert"]["kind"], serde_json::json!({"Ffn": "Relu"}));
        assert!(moe["gate"].get("Switch").is_some());
        assert_eq!(moe["capacity"]["train_factor"], 1.5);
        assert_eq!(moe["capacity"]["dropless"], true);
        assert_eq!(moe["losses"]["balance_weight"], 0.5);
        assert_eq!(moe["losses"]["z_loss_weight"], 0.25);
        assert_eq!(moe["routed_scale"], 2.0);
        assert_eq!(config["variant"]["dense"], true);
        assert_eq!(config["optim"]["lr"], 0.1);
        assert!(moved.contains(&("model.experts".into(), "model.moe.num_experts".into())));
        assert!(moved.contains(&("model.dense".into(), "variant.dense".into())));
    }

    #[test]
    fn todays_layout_and_unknown_names_are_left_or_named() {
        let mut config = serde_json::json!({ "model": { "d_model": 16, "moe": { "top_k": 2 } } });
        let before = config.clone();
        assert!(upgrade(&mut config).unwrap().is_empty());
        assert_eq!(config, before);
        let mut config = serde_json::json!({ "model": { "gate": "top-2" } });
        let message = upgrade(&mut config).unwrap_err().to_string();
        assert!(message.contains("model.gate") && message.contains("softmax-top-k"));
    }
}
