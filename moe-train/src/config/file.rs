//! Config files: TOML or JSON, any subset of the fields, merged over a preset.

use super::*;

impl TrainConfig {
    /// The preset with `file` (TOML or JSON, any subset of the fields) merged over it.
    pub fn from_preset_and_file(preset: Preset, file: Option<&Path>) -> Result<Self> {
        let mut value = serde_json::to_value(preset.config()).expect("a config serialises");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(io(path))?;
            merge(&mut value, read_overrides(path, &text)?);
        }
        let config: TrainConfig = serde_json::from_value(value).map_err(|e| {
            TrainError::Config(match file {
                Some(path) => format!("{}: {e}", path.display()),
                None => e.to_string(),
            })
        })?;
        Ok(config)
    }
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

/// Deep-merges `overrides` into `base` (objects field by field, anything else replaced).
fn merge(base: &mut serde_json::Value, overrides: serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides)) => {
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
