//! Config files: TOML or JSON, any subset of the fields, merged over a preset.

use super::*;

impl TrainConfig {
    /// The preset with `file` (TOML or JSON, any subset of the fields) merged over it. A file
    /// in the flat `model` layout of earlier releases is read into today's (`legacy.rs`), with
    /// a note on stderr saying where each of its keys went.
    pub fn from_preset_and_file(preset: Preset, file: Option<&Path>) -> Result<Self> {
        let Some(path) = file else {
            return Ok(preset.config());
        };
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let mut overrides = read_overrides(path, &text)?;
        let named = |error: TrainError| match error {
            TrainError::Config(reason) => {
                TrainError::Config(format!("{}: {reason}", path.display()))
            }
            other => other,
        };
        let moved = legacy::upgrade(&mut overrides).map_err(named)?;
        if !moved.is_empty() {
            let moves: Vec<String> = moved
                .iter()
                .map(|(old, new)| format!("`{old}` -> `{new}`"))
                .collect();
            eprintln!(
                "note: {} uses the flat `model` layout of earlier releases; it is read as today's: {}",
                path.display(),
                moves.join(", ")
            );
        }
        resolve(preset, overrides).map_err(named)
    }

    /// A config saved with a run or checkpoint (`config.json`), in today's layout or the flat
    /// `model` layout of earlier releases.
    pub fn from_saved(mut saved: serde_json::Value) -> Result<Self> {
        legacy::upgrade(&mut saved)?;
        // Fields a saved config lacks (the decoder's fixed norm and positions in the flat
        // layout) are the tiny preset's, which are those the flat layout fixed.
        resolve(Preset::Tiny, saved)
    }
}

/// `overrides` (today's layout) merged over `preset`, read as a config, every key used.
fn resolve(preset: Preset, mut overrides: serde_json::Value) -> Result<TrainConfig> {
    follow_model_width(&mut overrides);
    let mut value = serde_json::to_value(preset.config()).expect("a config serialises");
    merge(&mut value, overrides);
    let config: TrainConfig =
        serde_json::from_value(value.clone()).map_err(|e| TrainError::Config(e.to_string()))?;
    let read = serde_json::to_value(&config).expect("a config serialises");
    if let Some(key) = unused_key(&value, &read, "") {
        return Err(TrainError::Config(format!(
            "`{key}` is not a config key (a misspelling, or a key of another section?)"
        )));
    }
    Ok(config)
}

/// `model.moe.d_model` follows `model.d_model` unless it is given itself: the MoE layer's
/// width is always the model's, so a file need not say it twice.
fn follow_model_width(overrides: &mut serde_json::Value) {
    let Some(model) = overrides.get_mut("model").and_then(|m| m.as_object_mut()) else {
        return;
    };
    let Some(width) = model.get("d_model").cloned() else {
        return;
    };
    let moe = model
        .entry("moe")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if let Some(moe) = moe.as_object_mut() {
        moe.entry("d_model").or_insert(width);
    }
}

/// The dotted path of the first key of `given` that reading it as a config did not use (it
/// is absent from `read`, the config written back). Burn's configs (`model`) ignore a key
/// they do not have, so a misspelt one would otherwise change nothing, silently. A `null`
/// is an absent optional value, not a key to use.
fn unused_key(given: &serde_json::Value, read: &serde_json::Value, path: &str) -> Option<String> {
    let (serde_json::Value::Object(given), serde_json::Value::Object(read)) = (given, read) else {
        return None;
    };
    given.iter().find_map(|(key, value)| {
        let child = match path {
            "" => key.clone(),
            _ => format!("{path}.{key}"),
        };
        match read.get(key) {
            _ if value.is_null() => None,
            None => Some(child),
            Some(written) => unused_key(value, written, &child),
        }
    })
}

/// A config file's fields as JSON: JSON when the file ends in `.json` or its text starts with
/// `{` (a JSON file under another name), TOML otherwise. A TOML float that is not finite
/// (`nan`, `inf`, which JSON cannot hold) is refused naming its key.
fn read_overrides(path: &Path, text: &str) -> Result<serde_json::Value> {
    let failed =
        |error: &dyn std::fmt::Display| TrainError::Config(format!("{}: {error}", path.display()));
    let json = path.extension().and_then(|e| e.to_str()) == Some("json")
        || text.trim_start().starts_with('{');
    if json {
        return serde_json::from_str(text).map_err(|e| failed(&e));
    }
    let parsed: toml::Value = toml::from_str(text).map_err(|e| failed(&e))?;
    if let Some((key, value)) = non_finite_float(&parsed, "") {
        return Err(failed(&format!("`{key}` is {value}; give a finite number")));
    }
    Ok(serde_json::to_value(parsed).expect("finite TOML converts to JSON"))
}

/// The dotted key and value of the first float in `value` that is NaN or infinite.
fn non_finite_float(value: &toml::Value, key: &str) -> Option<(String, f64)> {
    let child = |name: &str| match key {
        "" => name.to_string(),
        _ => format!("{key}.{name}"),
    };
    match value {
        toml::Value::Float(number) if !number.is_finite() => Some((key.to_string(), *number)),
        toml::Value::Table(table) => table
            .iter()
            .find_map(|(name, value)| non_finite_float(value, &child(name))),
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, value)| non_finite_float(value, &child(&index.to_string()))),
        _ => None,
    }
}

/// Deep-merges `overrides` into `base` (objects field by field, anything else replaced). An
/// enum value (one capitalised key, as serde writes `{"Noisy": {...}}`) that names another
/// variant replaces the old one whole: `model.moe.gate = { Switch = {...} }` over a softmax
/// top-k gate is a Switch gate, not both.
pub(super) fn merge(base: &mut serde_json::Value, overrides: serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides))
            if !other_variant(base, &overrides) =>
        {
            for (key, value) in overrides {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// Whether `base` and `overrides` are two different variants of one enum.
fn other_variant(
    base: &serde_json::Map<String, serde_json::Value>,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> bool {
    let variant = |map: &serde_json::Map<String, serde_json::Value>| {
        let mut keys = map.keys();
        match (keys.next(), keys.next()) {
            (Some(key), None) if key.starts_with(|c: char| c.is_ascii_uppercase()) => {
                Some(key.clone())
            }
            _ => None,
        }
    };
    matches!((variant(base), variant(overrides)), (Some(a), Some(b)) if a != b)
}
