//! Language modelling on a text corpus (the default: Chinese poetry).

use burn::tensor::{Bool, Device, Int, Tensor};
use moe_core::rng::SplitMix64;
use moe_models::storage::StorageOptions;
use moe_models::{GenerationConfig, MoeTransformer, SamplingConfig};

use super::{Evaluation, LoadMean, StepOutput, Task};
use crate::config::{TokenizerKind, TrainConfig};
use crate::data::batches::TokenStream;
use crate::data::corpus::{self, Corpus};
use crate::data::split::{split, split_at};
use crate::data::tokenizer::{CharTokenizer, Tokenizer, UNK};
use crate::error::{Result, TrainError};
use crate::runtime::backend::Precision;
use crate::store::checkpoint::DataRecord;

/// Most of the training text a character vocabulary may turn into `<unk>`: beyond it,
/// `min_freq` has left too few characters for a language model to learn anything.
pub const MAX_UNKNOWN_SHARE: f64 = 0.5;

/// The text task: corpus, split, tokenizer and token streams.
pub struct TextTask {
    config: TrainConfig,
    tokenizer: Tokenizer,
    train: TokenStream,
    validation: TokenStream,
    description: String,
    validation_documents: Vec<String>,
    record: DataRecord,
    /// Load the Hugging Face weights `config.variant.hf` names into the models it builds.
    hf_weights: bool,
}

impl TextTask {
    /// Loads the corpus `config` names, splits it and tokenizes it. The tokenizer is built
    /// from the training split unless one is given (a resumed run or a checkpoint), and so is
    /// the split unless `record` (a checkpoint's) gives it, after checking that the corpus is
    /// the one the record describes.
    pub fn new(
        config: &TrainConfig,
        tokenizer: Option<Tokenizer>,
        record: Option<&DataRecord>,
        show_progress: bool,
    ) -> Result<Self> {
        let corpus = corpus::load(&config.data, &config.cache_dir(), show_progress)?;
        Self::from_corpus(config, corpus, tokenizer, record)
    }

    /// As [`new`](Self::new), from documents already loaded.
    pub fn from_corpus(
        config: &TrainConfig,
        corpus: Corpus,
        tokenizer: Option<Tokenizer>,
        record: Option<&DataRecord>,
    ) -> Result<Self> {
        let documents = corpus.documents.len();
        let checksum = corpus.checksum();
        let source = std::path::absolute(&corpus.source).unwrap_or(corpus.source.clone());
        if let Some(record) = record {
            check_unchanged(record, &source, documents, &checksum)?;
        }
        let parts = match record {
            Some(record) => split_at(corpus.documents, &record.validation),
            None => split(corpus.documents, config.data.val_fraction, config.run.seed),
        };
        if parts.validation.is_empty() {
            return Err(TrainError::Config(format!(
                "{}: the corpus has {documents} document(s), too few to hold one out for validation; separate documents with a blank line (or one JSON line each) and give at least two, or raise `data.val_fraction`",
                corpus.source.display()
            )));
        }
        let built_here = tokenizer.is_none();
        let tokenizer = match tokenizer {
            Some(tokenizer) => tokenizer,
            None => match config.data.tokenizer {
                TokenizerKind::Char => Tokenizer::Char(CharTokenizer::build(
                    parts.train.iter().map(|d| d.text.as_str()),
                    config.data.min_freq,
                )),
                TokenizerKind::Bpe => Tokenizer::train_bpe(
                    parts.train.iter().map(|d| d.text.as_str()),
                    config.data.bpe_vocab_size,
                )?,
            },
        };
        let train = TokenStream::new(&parts.train, &tokenizer);
        let validation = TokenStream::new(&parts.validation, &tokenizer);
        if built_here && config.data.tokenizer == TokenizerKind::Char {
            check_vocabulary(&train, &tokenizer, config.data.min_freq)?;
        }
        let needed = config.model.context_length + 1;
        for (part, stream) in [("training", &train), ("validation", &validation)] {
            if stream.tokens.len() < needed {
                return Err(TrainError::CorpusTooShort {
                    path: corpus.source.clone(),
                    part,
                    tokens: stream.tokens.len(),
                    needed,
                    lines: corpus.lines,
                });
            }
        }
        let description = format!(
            "{}: {} documents ({} training, {} validation), {} + {} tokens, vocabulary {}",
            corpus.source.display(),
            documents,
            parts.train.len(),
            parts.validation.len(),
            train.tokens.len(),
            validation.tokens.len(),
            tokenizer.vocab_size()
        );
        Ok(Self {
            config: config.clone(),
            tokenizer,
            train,
            validation,
            description,
            validation_documents: parts.validation.into_iter().map(|d| d.text).collect(),
            record: DataRecord {
                source,
                documents,
                sha256: checksum,
                validation: parts.validation_indices,
            },
            hf_weights: false,
        })
    }

    /// The task building its models with the weights of the Hugging Face folder
    /// `config.variant.hf` names (a new `--init-hf` run), when `load` is true.
    pub fn with_hf_weights(mut self, load: bool) -> Self {
        self.hf_weights = load && self.config.variant.hf.is_some();
        self
    }

    /// Size of the tokenizer's vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    /// The validation documents' texts, in source order.
    pub fn validation_documents(&self) -> &[String] {
        &self.validation_documents
    }

    /// The validation stream.
    pub fn validation(&self) -> &TokenStream {
        &self.validation
    }

    /// `true` where a target counts: everywhere but on padding (when the tokenizer has it).
    fn target_mask(&self, targets: &Tensor<2, Int>) -> Tensor<2, Bool> {
        match self.tokenizer.specials().pad {
            Some(pad) => targets.clone().not_equal_elem(pad as i64),
            None => targets.clone().greater_equal_elem(0),
        }
    }
}

/// The text model of `config` with a `vocab`-token vocabulary on `device`: freshly drawn; with
/// the weights of the Hugging Face model `config.variant.hf` names when `hf_weights` is set (a new
/// `--init-hf` run); and for a LoRA run always with those weights, frozen, and fresh adapters
/// (after checking that the folder is the one the run started from). A checkpoint's weights or
/// adapters then load over it ([`crate::store::checkpoint::load_model`]).
pub fn text_model(
    config: &TrainConfig,
    vocab: usize,
    device: &Device,
    hf_weights: bool,
) -> Result<MoeTransformer> {
    let model_config = config.text_model_config(vocab);
    let lora = config.variant.lora.as_ref();
    let model = match &config.variant.hf {
        Some(hf) if hf_weights || lora.is_some() => {
            if lora.is_some() {
                hf.check_unchanged()?;
            }
            let arch = moe_models::hf::HfArchitecture::from_model_type(&hf.model_type)?;
            if hf.weights.is_f32() {
                let mut model = model_config.init(device)?;
                moe_models::hf::load_into(&mut model, arch, &hf.dir)?;
                model
            } else {
                // A LoRA run's frozen weights held below f32 (`--weights`; the config refuses
                // them without LoRA): loaded straight into their format, never as f32.
                let options = StorageOptions::new(hf.weights.into()).on(device);
                moe_models::hf::build_with(&model_config, arch, &hf.dir, device, &options)?
            }
        }
        _ => model_config.init(device)?,
    };
    match lora {
        Some(lora) => {
            // The adapters are drawn from the run's seed whatever building the base drew (an
            // f32 base draws its initial values before the file's replace them; a base held
            // below f32 is built without values): the same run, the same adapters.
            device.seed(config.run.seed);
            let model = model.with_lora(lora)?;
            // A new run continues from a PEFT folder's adapters (`--init-lora`).
            match config
                .variant
                .hf
                .as_ref()
                .and_then(|hf| hf.init_lora.as_ref())
            {
                Some(dir) if hf_weights => Ok(moe_models::hf::peft::load_adapters(model, dir)?),
                _ => Ok(model),
            }
        }
        None => Ok(model),
    }
}

impl Task for TextTask {
    type Model = MoeTransformer;

    fn build_model(&self, device: &Device) -> Result<MoeTransformer> {
        let precision = self.config.run.precision;
        let compute = (precision != Precision::F32).then(|| precision.compute_dtype());
        let model = text_model(
            &self.config,
            self.tokenizer.vocab_size(),
            device,
            self.hf_weights,
        )?;
        // A model holding its weights below f32 computes in f32 unless told otherwise.
        let compute = compute.or(model.compute_dtype());
        Ok(model.with_compute_dtype(compute))
    }

    fn step(
        &self,
        model: &MoeTransformer,
        rng: &mut SplitMix64,
        batch_size: usize,
        device: &Device,
    ) -> StepOutput {
        let context = self.config.model.context_length;
        let batch = self.train.random_batch(batch_size, context, rng, device);
        let mask = self.target_mask(&batch.targets);
        let out = model.loss(batch.inputs, batch.targets, mask);
        StepOutput {
            loss: out.loss,
            cross_entropy: out.cross_entropy,
            aux_loss: out.aux_loss,
            layer_stats: out.layer_stats,
            modality: Vec::new(),
            tokens: batch_size * context,
        }
    }

    fn evaluate(&self, model: &MoeTransformer, device: &Device) -> Evaluation {
        let context = self.config.model.context_length;
        let batches = self.validation.sequential_batches(
            self.config.optim.batch_size,
            context,
            self.config.run.eval_batches,
            device,
        );
        let mut total = 0.0;
        let mut load = LoadMean::default();
        for batch in &batches {
            let mask = self.target_mask(&batch.targets);
            let out = model.loss(batch.inputs.clone(), batch.targets.clone(), mask);
            total += out.cross_entropy.into_scalar::<f64>();
            load.add(&out.layer_stats, 1.0);
        }
        let count = batches.len().max(1) as f64;
        Evaluation {
            loss: total / count,
            expert_load: load.mean(),
            accuracy: None,
        }
    }

    fn samples(
        &self,
        model: &MoeTransformer,
        count: usize,
        max_tokens: usize,
        seed: u64,
    ) -> Vec<String> {
        let specials = self.tokenizer.specials();
        (0..count)
            .map(|i| {
                let config = GenerationConfig {
                    max_new_tokens: max_tokens,
                    sampling: SamplingConfig {
                        seed: seed.wrapping_add(i as u64),
                        ..SamplingConfig::default()
                    },
                    stop_tokens: vec![specials.eos],
                    banned_tokens: self.tokenizer.banned_in_generation(),
                };
                let tokens = model
                    .generate(&[specials.bos], &config, |_| {})
                    .unwrap_or_default();
                self.tokenizer.decode(&tokens)
            })
            .collect()
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.tokenizer)
    }

    fn data_record(&self) -> Option<&DataRecord> {
        Some(&self.record)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Refuses a corpus other than the one `record` describes.
fn check_unchanged(
    record: &DataRecord,
    source: &std::path::Path,
    documents: usize,
    checksum: &str,
) -> Result<()> {
    if record.documents == documents && record.sha256 == checksum {
        return Ok(());
    }
    Err(TrainError::CorpusChanged {
        path: source.to_path_buf(),
        detail: format!(
            "now {documents} documents, sha256 {}; the run trained on {} documents, sha256 {}",
            crate::checksum::short(checksum),
            record.documents,
            crate::checksum::short(&record.sha256)
        ),
    })
}

/// Refuses a character vocabulary that turns most of the training text into `<unk>`.
fn check_vocabulary(train: &TokenStream, tokenizer: &Tokenizer, min_freq: usize) -> Result<()> {
    let total = train.tokens.len().max(1);
    let unknown = train.tokens.iter().filter(|&&id| id == UNK).count();
    let share = unknown as f64 / total as f64;
    if share > MAX_UNKNOWN_SHARE {
        return Err(TrainError::Config(format!(
            "`data.min_freq` {min_freq} leaves a vocabulary of {} tokens that turns {:.0}% of the training text into <unk> (at most {:.0}% is allowed); lower `--min-freq`",
            tokenizer.vocab_size(),
            100.0 * share,
            100.0 * MAX_UNKNOWN_SHARE
        )));
    }
    Ok(())
}
