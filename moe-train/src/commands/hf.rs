//! `--hf DIR`: a Hugging Face MoE folder (`config.json`, safetensors, `tokenizer.json`) in
//! `burn-moe generate` and `burn-moe eval`. The model loads through [`moe_models::hf`]; the
//! folder's own tokenizer is read with the `tokenizers` crate (pure Rust, no C build).

use std::path::Path;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use moe_models::hf::{self, HfModel, Storage, StorageOptions};
use moe_models::{GenerationConfig, SamplingConfig};
use serde_json::Value;

use crate::data::tokenizer::{config_token_ids, read_tokenizer_json};
use crate::error::{Result, TrainError};
use crate::runtime::backend::{self, BackendChoice, Precision};

/// A Hugging Face tokenizer with the special tokens its model's config names.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// Tokens that end a generation (`eos_token_id`, one id or a list).
    pub eos: Vec<usize>,
}

impl HfTokenizer {
    /// Reads `dir/tokenizer.json`; the end-of-sequence ids come from `config` (the folder's
    /// `config.json`).
    pub fn load(dir: &Path, config: &Value) -> Result<Self> {
        Ok(Self {
            inner: read_tokenizer_json(dir)?,
            eos: config_token_ids(config, "eos_token_id"),
        })
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds itself (a beginning
    /// of sequence, for those that have one), as transformers' `tokenizer(text)` gives them.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| id as usize).collect())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[usize]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        self.inner.decode(&ids, true).unwrap_or_default()
    }
}

/// Loads the model of `dir` on the device `backend` selects, its weights held in `storage`,
/// saying what it loaded.
fn open(
    dir: &Path,
    backend: BackendChoice,
    storage: Storage,
) -> Result<(HfModel, HfTokenizer, Device)> {
    let device = backend::select_and_report(backend, Precision::F32)?.device;
    let started = std::time::Instant::now();
    let loaded = hf::load_with(dir, &device, &StorageOptions::new(storage).on(&device))?;
    let tokenizer = HfTokenizer::load(dir, &loaded.config_json)?;
    let count = loaded.model.config().parameter_count();
    eprintln!(
        "loaded {} from {} in {:.1} s: {} parameters ({} weights), {} active per token",
        loaded.architecture.class_name(),
        dir.display(),
        started.elapsed().as_secs_f64(),
        in_words(count.total),
        storage,
        in_words(count.active),
    );
    Ok((loaded, tokenizer, device))
}

/// `1.23 B` or `45.6 M`.
fn in_words(count: usize) -> String {
    if count >= 1_000_000_000 {
        format!("{:.2} B", count as f64 / 1e9)
    } else {
        format!("{:.2} M", count as f64 / 1e6)
    }
}

/// `burn-moe generate --hf DIR`: streams the continuation of `prompt`; returns the prompt and
/// the continuation.
pub fn generate(
    dir: &Path,
    prompt: &str,
    generation: GenerationSettings,
    backend: BackendChoice,
) -> Result<String> {
    let (loaded, tokenizer, _) = open(dir, backend, generation.weights)?;
    let ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        return Err(TrainError::Argument(
            "the prompt is empty and the tokenizer adds no start token; give `--prompt`".into(),
        ));
    }
    let config = GenerationConfig {
        max_new_tokens: generation.max_tokens,
        sampling: generation.sampling,
        stop_tokens: tokenizer.eos.clone(),
        banned_tokens: Vec::new(),
    };
    let model = crate::commands::generate::offloaded(loaded.model, generation.offload_experts)?;
    crate::commands::stream::stream(&model, prompt, &ids, &config, |ids| tokenizer.decode(ids))
}

/// How `generate --hf` samples.
#[derive(Debug, Clone)]
pub struct GenerationSettings {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Temperature, top-k, top-p and seed.
    pub sampling: SamplingConfig,
    /// Keep the experts in CPU memory (`--offload-experts`).
    pub offload_experts: bool,
    /// How the weights are held (`--weights`).
    pub weights: Storage,
}

/// What `burn-moe eval --hf DIR --text FILE` measured.
#[derive(Debug, Clone)]
pub struct TextEvaluation {
    /// Tokens predicted (each window's first token is only read).
    pub tokens: usize,
    /// Mean cross-entropy of those predictions, in nats.
    pub loss: f64,
}

/// Mean next-token cross-entropy of the model of `dir` on the text of `file`, cut into
/// windows of `window` tokens (at most the model's context) that do not overlap.
pub fn evaluate_text(
    dir: &Path,
    file: &Path,
    window: Option<usize>,
    backend: BackendChoice,
    storage: Storage,
) -> Result<TextEvaluation> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| TrainError::Argument(format!("{}: {e}", file.display())))?;
    let (loaded, tokenizer, device) = open(dir, backend, storage)?;
    let context = loaded.model.config().decoder.context_length;
    let window = window.unwrap_or(context.min(1024));
    if window < 2 || window > context {
        return Err(TrainError::Argument(format!(
            "`--window` must be in [2, {context}] (the model's context), got {window}"
        )));
    }
    let ids = tokenizer.encode(&text)?;
    if ids.len() < 2 {
        return Err(TrainError::Argument(format!(
            "{} gives {} token(s); perplexity needs at least 2",
            file.display(),
            ids.len()
        )));
    }
    let windows: Vec<&[usize]> = ids.chunks(window).filter(|w| w.len() >= 2).collect();
    let (mut total, mut count) = (0.0, 0usize);
    for (index, chunk) in windows.iter().enumerate() {
        let length = chunk.len() - 1;
        let (loss, predicted) = window_loss(&loaded, chunk, &device);
        total += loss * length as f64;
        count += predicted;
        eprint!(
            "\r{} / {} windows, {count} tokens, loss {:.4}   ",
            index + 1,
            windows.len(),
            total / count as f64
        );
    }
    eprintln!();
    Ok(TextEvaluation {
        tokens: count,
        loss: total / count as f64,
    })
}

/// The mean cross-entropy of predicting `chunk[1..]` from `chunk[..-1]`, and its count.
fn window_loss(loaded: &HfModel, chunk: &[usize], device: &Device) -> (f64, usize) {
    let length = chunk.len() - 1;
    let ids = |slice: &[usize]| {
        let data: Vec<i64> = slice.iter().map(|&t| t as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(data, [1, slice.len()]), device)
    };
    let mask =
        Tensor::<2, Bool>::from_data(TensorData::new(vec![true; length], [1, length]), device);
    let out = loaded
        .model
        .loss(ids(&chunk[..length]), ids(&chunk[1..]), mask);
    let loss = out
        .cross_entropy
        .into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .map_or(f64::NAN, |v| v[0]);
    (loss, length)
}
