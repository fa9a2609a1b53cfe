//! `burn-moe generate`: text (or digit images) from a checkpoint, streamed as it is produced.

use burn::module::Module;
use moe_models::digits::{NUMERALS, TEXT_VOCAB};
use moe_models::{ExpertParallel, GenerationConfig, MoeTransformer, SamplingConfig};

use crate::cli::GenerateArgs;
use crate::commands::hf;
use crate::commands::loading::{held, load_finite, no_model, refuse_held_digits};
use crate::commands::stream::stream;
use crate::config::TaskKind;
use crate::data::tasks::digits::{caption_digit, draw_numeral};
use crate::data::tasks::text::text_model;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Result, TrainError};
use crate::runtime::backend::{self, Precision};
use crate::store::checkpoint;

/// Streams generated text to standard output as it is produced; returns the generated text.
pub fn generate(args: &GenerateArgs) -> Result<String> {
    args.validate()?;
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: (args.top_p < 1.0).then_some(args.top_p),
        seed: args.seed,
    };
    let checkpoint = match (&args.hf, &args.checkpoint) {
        (Some(dir), _) => {
            let settings = hf::GenerationSettings {
                max_tokens: args.max_tokens,
                sampling,
                offload_experts: args.offload_experts,
                weights: args.weights.into(),
            };
            return hf::generate(dir, &args.prompt, settings, args.backend);
        }
        (None, Some(checkpoint)) => checkpoint,
        (None, None) => return Err(no_model()),
    };
    let verify = crate::cli::verify_flag(args.no_verify);
    let opened = checkpoint::open(checkpoint, verify)?;
    let (folder, config) = (opened.folder, opened.config);
    let device = backend::select_and_report(args.backend, Precision::F32)?.device;
    match config.task {
        TaskKind::Text => {
            let tokenizer = Tokenizer::load(&folder.join(checkpoint::TOKENIZER_FILE))?;
            let model = text_model(&config, tokenizer.vocab_size(), &device, false)?;
            // LoRA adapters merged: decoding then runs the plain weights.
            let model = load_finite(&folder, model)?.materialize();
            let model = held(model, args.weights.into(), &device)?;
            let model = offloaded(model, args.offload_experts)?;
            let specials = tokenizer.specials();
            let unknown = tokenizer.unknown_characters(&args.prompt);
            if !unknown.is_empty() {
                let listed: String = unknown.iter().collect();
                eprintln!(
                    "warning: the prompt's characters {listed:?} are not in the model's vocabulary; the model reads each as <unk>"
                );
            }
            let prompt = tokenizer.encode_prompt(&args.prompt);
            if prompt.is_empty() {
                return Err(TrainError::Argument(
                    "the prompt is empty and the tokenizer adds no start token; give `--prompt`"
                        .into(),
                ));
            }
            let generation = GenerationConfig {
                max_new_tokens: args.max_tokens,
                sampling,
                stop_tokens: vec![specials.eos],
                banned_tokens: tokenizer.banned_in_generation(),
            };
            stream(&model, &args.prompt, &prompt, &generation, |ids| {
                tokenizer.decode(ids)
            })
        }
        TaskKind::Caption | TaskKind::TextToImage => {
            refuse_held_digits(args.weights)?;
            let digit = NUMERALS
                .iter()
                .position(|n| args.prompt.contains(n))
                .or_else(|| args.prompt.trim().parse::<usize>().ok().filter(|d| *d < 10))
                .ok_or_else(|| TrainError::Config(format!("the digits model needs a numeral (零 一 ... 九) or a digit as prompt, got {:?}", args.prompt)))?;
            let model = config
                .multimodal_model_config(TEXT_VOCAB.len())
                .init(&device)?;
            let model = load_finite(&folder, model)?;
            let levels = config.data.image_levels;
            let text = if config.task == TaskKind::TextToImage {
                draw_numeral(&model, digit, levels, sampling)
            } else {
                caption_digit(&model, digit, levels, sampling, args.seed)
            };
            println!("{text}");
            Ok(text)
        }
    }
}

/// `model` with its experts in CPU memory when `offload` (`--offload-experts`), else as it is.
pub(crate) fn offloaded(model: MoeTransformer, offload: bool) -> Result<MoeTransformer> {
    if !offload {
        return Ok(model);
    }
    let device = backend::offload_device();
    eprintln!("experts in CPU memory ({device:?}); the rest of the model on its device");
    Ok(model.with_expert_placement(&[device])?)
}
