//! `burn-moe generate` and `burn-moe eval`.

use std::io::Write;

use burn::module::Module;
use moe_models::digits::{NUMERALS, TEXT_VOCAB};
use moe_models::{GenerationConfig, MoeTransformer, SamplingConfig};

use crate::backend::{self, Precision};
use crate::checkpoint;
use crate::cli::{EvalArgs, GenerateArgs};
use crate::config::{Task as TaskKind, TrainConfig};
use crate::divergence::non_finite_parameters;
use crate::error::{Result, TrainError};
use crate::form::{self, FormShare};
use crate::hf;
use crate::tasks::digits::{caption_digit, draw_numeral, DigitsTask};
use crate::tasks::text::{text_model, TextTask};
use crate::tasks::{Evaluation, Task};
use crate::tokenizer::Tokenizer;

/// Longest sample `eval --form` draws: room for a poem of eight seven-character lines.
const FORM_MAX_TOKENS: usize = 64;

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
            let specials = tokenizer.specials();
            let unknown = tokenizer.unknown_characters(&args.prompt);
            if !unknown.is_empty() {
                let listed: String = unknown.iter().collect();
                eprintln!(
                    "warning: the prompt's characters {listed:?} are not in the model's vocabulary; the model reads each as <unk>"
                );
            }
            let mut prompt = vec![specials.bos];
            prompt.extend(tokenizer.encode(&args.prompt));
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

/// Generates from `ids` (the tokens of `prompt`), printing `prompt` and then the text as it
/// grows; returns the prompt and the continuation.
pub fn stream(
    model: &MoeTransformer,
    prompt: &str,
    ids: &[usize],
    generation: &GenerationConfig,
    decode: impl Fn(&[usize]) -> String,
) -> Result<String> {
    let mut stdout = std::io::stdout();
    let _ = write!(stdout, "{prompt}");
    let mut generated = Vec::new();
    let mut shown = String::new();
    model.generate(ids, generation, |token| {
        generated.push(token);
        // Decode everything so far and print what is new (byte-level BPE tokens may complete
        // a character only together).
        let text = decode(&generated);
        if let Some(new) = text.strip_prefix(shown.as_str()) {
            let _ = write!(stdout, "{new}");
            let _ = stdout.flush();
        }
        shown = text;
    })?;
    let _ = writeln!(stdout);
    Ok(format!("{prompt}{shown}"))
}

/// What `burn-moe eval` reports.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Step of the checkpoint.
    pub step: usize,
    /// Validation loss and expert load.
    pub evaluation: Evaluation,
    /// With `--form`: how well samples keep their prompt's line length.
    pub form: Vec<FormShare>,
    /// A warning when the loss is far above the lowest validation loss its run logged (by
    /// the run's `[run.explosion]` thresholds).
    pub history_warning: Option<String>,
}

/// Evaluates a checkpoint on its run's validation data.
pub fn evaluate(args: &EvalArgs) -> Result<EvalReport> {
    if args.batches == Some(0) {
        return Err(TrainError::Argument(
            "`--batches` must be at least 1, got 0".into(),
        ));
    }
    if args.form && args.form_samples == 0 {
        return Err(TrainError::Argument(
            "`--form-samples` must be at least 1 (samples per line length for `--form`), got 0"
                .into(),
        ));
    }
    let checkpoint = args.checkpoint.as_ref().ok_or_else(no_model)?;
    let verify = crate::cli::verify_flag(args.no_verify);
    let opened = checkpoint::open(checkpoint, verify)?;
    let (folder, state, mut config) = (opened.folder, opened.state, opened.config);
    if let Some(batches) = args.batches {
        config.run.eval_batches = batches;
    }
    if args.form && config.task != TaskKind::Text {
        return Err(TrainError::Argument(
            "`--form` measures generated poems: it needs a text run".into(),
        ));
    }
    let device = backend::select_and_report(args.backend, Precision::F32)?.device;
    let mut form = Vec::new();
    let evaluation = match config.task {
        TaskKind::Text => {
            let tokenizer = Tokenizer::load(&folder.join(checkpoint::TOKENIZER_FILE))?;
            let task = TextTask::new(&config, Some(tokenizer), opened.data.as_ref(), true)?;
            let model = load_finite(&folder, task.build_model(&device)?)?;
            if args.form {
                form = form::measure(
                    &model,
                    task.tokenizer().expect("a text task has a tokenizer"),
                    task.validation_documents(),
                    args.form_samples,
                    FORM_MAX_TOKENS,
                    config.run.seed,
                );
            }
            task.evaluate(&model, &device)
        }
        TaskKind::Caption | TaskKind::TextToImage => {
            let task = DigitsTask::new(&config, true)?;
            let model = load_finite(&folder, task.build_model(&device)?)?;
            task.evaluate(&model, &device)
        }
    };
    if !evaluation.loss.is_finite() {
        return Err(TrainError::NonFiniteModel {
            path: folder.clone(),
            detail: format!("its validation loss is {}", evaluation.loss),
            alternatives: checkpoint::alternatives_of(&folder),
        });
    }
    let history_warning = far_above_history(&folder, evaluation.loss, &config);
    Ok(EvalReport {
        step: state.step,
        evaluation,
        form,
        history_warning,
    })
}

/// A warning when `loss` (the checkpoint in `folder`'s) is far above the lowest validation
/// loss its run logged, by the run's own explosion thresholds (`[run.explosion]` `ratio` and
/// `nats`): a finite checkpoint may still hold weights from a blow-up. `None` when the run's
/// metrics are not beside the checkpoint or the loss is in line with them.
fn far_above_history(folder: &std::path::Path, loss: f64, config: &TrainConfig) -> Option<String> {
    let run = folder.parent()?.parent()?;
    let rows = crate::metrics::read(&run.join("metrics.jsonl")).ok()?;
    let (step, lowest) = rows
        .iter()
        .filter_map(|row| match row {
            crate::metrics::Row::Eval(row) if row.val_loss.is_finite() => {
                Some((row.step, row.val_loss))
            }
            _ => None,
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    let rule = config.run.explosion;
    (loss > rule.ratio * lowest && loss > lowest + rule.nats).then(|| {
        format!(
            "this checkpoint's validation loss {loss:.4} is {:.1}x the lowest its run logged ({lowest:.4} at step {step}): its weights may come from a blow-up{}",
            loss / lowest,
            checkpoint::alternatives_of(folder)
        )
    })
}

/// The error for a command given neither `--checkpoint` nor `--hf` (clap normally refuses it
/// first).
fn no_model() -> TrainError {
    TrainError::Argument("give `--checkpoint DIR` or `--hf DIR`".into())
}

/// Loads a checkpoint's model and refuses it if any weight is NaN or infinite: such a model
/// gives NaN losses and samples garbage (the pad token), and its checkpoint is not worth using.
pub fn load_finite<M: burn::module::Module>(folder: &std::path::Path, model: M) -> Result<M> {
    let model = checkpoint::load_model(folder, model)?;
    let bad = non_finite_parameters(&model);
    if bad.is_empty() {
        return Ok(model);
    }
    let values: usize = bad.iter().map(|(_, count)| count).sum();
    let names: Vec<&str> = bad.iter().take(3).map(|(path, _)| path.as_str()).collect();
    Err(TrainError::NonFiniteModel {
        path: folder.to_path_buf(),
        detail: format!(
            "{values} values in {} parameter tensors, among them {}",
            bad.len(),
            names.join(", ")
        ),
        alternatives: checkpoint::alternatives_of(folder),
    })
}

/// A few lines about each MoE layer's load: shares and max/mean.
pub fn load_summary(expert_load: &[Vec<f64>]) -> String {
    expert_load
        .iter()
        .enumerate()
        .map(|(layer, shares)| {
            let max = shares.iter().cloned().fold(0.0, f64::max);
            let percent: Vec<String> = shares
                .iter()
                .map(|s| format!("{:.0}%", 100.0 * s))
                .collect();
            format!(
                "MoE layer {layer}: load {} (max/mean {:.2})",
                percent.join(" "),
                max * shares.len() as f64
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
