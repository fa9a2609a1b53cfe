//! Which model a run trains from its `model` shape: the MoE model, its dense twin, or a Hugging
//! Face model, whole or through LoRA adapters.

use std::path::{Path, PathBuf};

use moe_core::lora::LoraConfig;
use moe_models::MoeTransformerConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cli::HeldWeights;
use crate::error::{io, Result, TrainError};

/// The `variant` section of a [`TrainConfig`](super::TrainConfig): what the run trains besides
/// the shape in `model`. The default is the MoE model that `model` describes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Train the dense model with the same active parameters instead (`--dense`; see
    /// `MoeTransformerConfig::dense_equivalent`).
    #[serde(default)]
    pub dense: bool,
    /// Start from a Hugging Face model (`train --init-hf DIR`): its architecture and weights
    /// replace the shape in `model` (all but `model.context_length`), its tokenizer the
    /// corpus-built one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf: Option<HfInit>,
    /// Fine-tune the Hugging Face model with LoRA adapters instead of every weight
    /// (`train --lora-rank R [--lora-alpha A] [--lora-targets ...]`): its weights stay frozen
    /// and checkpoints hold the adapters alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

/// The Hugging Face model a run starts from (`train --init-hf DIR`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfInit {
    /// The folder its weights and tokenizer are read from at the start of the run.
    pub dir: PathBuf,
    /// Its `model_type` (`mixtral`, `qwen2_moe`, `olmoe`).
    pub model_type: String,
    /// Its config mapped onto ours, kept here so that the run's checkpoints open without the
    /// folder (full fine-tuning; a LoRA run reads its frozen weights from the folder).
    pub config: MoeTransformerConfig,
    /// What its `config.json` and weight files were when the run started, to notice a folder
    /// changed under a LoRA run, whose adapters fit only the weights they were trained on:
    /// `sha256-content:` and the SHA-256 of `config.json` and of every weight file's name and
    /// bytes. Configs written before that hold the SHA-256 of the weight files' names and sizes
    /// alone (no prefix), which is still checked as it was; absent in configs written before
    /// either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The precision its `config.json` names (`torch_dtype`, or transformers 5's `dtype`:
    /// `bfloat16`, ...), which `export` writes the weights in unless told otherwise. Absent
    /// when it names none, and in configs written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// How a LoRA run holds the folder's frozen weights (`train --weights`; see
    /// `moe_models::storage`): f32 unless told otherwise, and in configs written before it.
    #[serde(default, skip_serializing_if = "HeldWeights::is_f32")]
    pub weights: HeldWeights,
    /// The PEFT folder a LoRA run's adapters start from (`train --init-lora`); read when the
    /// run starts, not on resume (the checkpoints hold the adapters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_lora: Option<PathBuf>,
}

impl HfInit {
    /// Reads the folder's `config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let (arch, config, json) = moe_models::hf::read_config(dir)?;
        let torch_dtype = moe_models::hf::config_dtype(&json).map(str::to_string);
        Ok(Self {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            model_type: arch.model_type().into(),
            config,
            fingerprint: Some(format!("{CONTENT}{}", content_fingerprint(dir)?)),
            torch_dtype,
            weights: HeldWeights::F32,
            init_lora: None,
        })
    }

    /// Refuses a folder whose config or weight files are not those the run started from.
    pub fn check_unchanged(&self) -> Result<()> {
        let Some(expected) = &self.fingerprint else {
            return Ok(());
        };
        let now = match expected.strip_prefix(CONTENT) {
            Some(_) => format!("{CONTENT}{}", content_fingerprint(&self.dir)?),
            None => size_fingerprint(&self.dir)?,
        };
        if now != *expected {
            return Err(TrainError::Config(format!(
                "the Hugging Face model in {} has changed since this LoRA run started (its config.json or weight files differ); the run's adapters fit only the weights they were trained on",
                self.dir.display()
            )));
        }
        Ok(())
    }
}

/// The prefix of a fingerprint of the weight files' content.
const CONTENT: &str = "sha256-content:";

/// SHA-256 of a Hugging Face folder's `config.json` followed by the name and bytes of each of
/// its weight files (`.safetensors` and their index), in name order. Reading the weights once
/// more at the start of a LoRA run (and when it resumes or is evaluated) costs about a second
/// per GB; a weight changed in place, which keeps every size, is noticed.
fn content_fingerprint(dir: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let config = dir.join("config.json");
    hasher.update(std::fs::read(&config).map_err(io(&config))?);
    for (name, _) in weight_files(dir)? {
        hasher.update(format!("\n{name}\n"));
        crate::checksum::hash_file(&dir.join(&name), &mut hasher, |_| {})?;
    }
    Ok(crate::checksum::hex(&hasher.finalize()))
}

/// The fingerprint of configs written before [`content_fingerprint`]: SHA-256 of `config.json`
/// followed by the name and size of each weight file, in name order.
fn size_fingerprint(dir: &Path) -> Result<String> {
    let config = dir.join("config.json");
    let mut hasher = Sha256::new();
    hasher.update(std::fs::read(&config).map_err(io(&config))?);
    for (name, size) in weight_files(dir)? {
        hasher.update(format!("\n{name} {size}"));
    }
    Ok(crate::checksum::hex(&hasher.finalize()))
}

/// The names and sizes of a folder's weight files (`.safetensors` and their index), sorted.
fn weight_files(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut weights: Vec<(String, u64)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
            let size = entry.metadata().map_err(io(&entry.path()))?.len();
            weights.push((name, size));
        }
    }
    weights.sort();
    Ok(weights)
}
