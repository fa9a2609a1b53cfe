//! `burn-moe eval`: validation loss, perplexity and expert load of a checkpoint.

use crate::cli::EvalArgs;
use crate::commands::form::{self, FormShare};
use crate::commands::loading::{held, load_finite, no_model, refuse_held_digits};
use crate::config::{TaskKind, TrainConfig};
use crate::data::tasks::digits::DigitsTask;
use crate::data::tasks::text::TextTask;
use crate::data::tasks::{Evaluation, Task};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Result, TrainError};
use crate::runtime::backend::{self, Precision};
use crate::store::checkpoint;

/// Longest sample `eval --form` draws: room for a poem of eight seven-character lines.
const FORM_MAX_TOKENS: usize = 64;

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
            let model = held(model, args.weights.into(), &device)?;
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
            refuse_held_digits(args.weights)?;
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
    let rows = crate::store::metrics::read(&run.join("metrics.jsonl")).ok()?;
    let (step, lowest) = rows
        .iter()
        .filter_map(|row| match row {
            crate::store::metrics::Row::Eval(row) if row.val_loss.is_finite() => {
                Some((row.step, row.val_loss))
            }
            _ => None,
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    config.run.explosion.is_far_above(loss, lowest).then(|| {
        format!(
            "this checkpoint's validation loss {loss:.4} is {:.1}x the lowest its run logged ({lowest:.4} at step {step}): its weights may come from a blow-up{}",
            loss / lowest,
            checkpoint::alternatives_of(folder)
        )
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

/// `burn-moe eval`: a checkpoint's report, or with `--hf` a Hugging Face model's perplexity on
/// `--text`, printed.
pub fn run(args: &EvalArgs) -> Result<()> {
    if args.hf.is_some() {
        return run_hf(args);
    }
    let report = evaluate(args)?;
    if let Some(warning) = &report.history_warning {
        eprintln!("warning: {warning}");
    }
    println!(
        "checkpoint at step {}: validation loss {}, perplexity {}",
        report.step,
        crate::training::loss_digits(report.evaluation.loss),
        crate::training::perplexity(report.evaluation.loss)
    );
    if let Some(accuracy) = report.evaluation.accuracy {
        println!(
            "captions right: {:.1} % of the validation images (chance: 10 %)",
            100.0 * accuracy
        );
    }
    println!("{}", load_summary(&report.evaluation.expert_load));
    for share in &report.form {
        println!(
            "form: {}-character prompts: {:.0} % of {} generated lines keep {} characters ({} samples)",
            share.length,
            100.0 * share.share(),
            share.lines,
            share.length,
            share.samples
        );
    }
    Ok(())
}

/// `eval --hf DIR --text FILE`: tokens, loss and perplexity of the text under the model.
fn run_hf(args: &EvalArgs) -> Result<()> {
    let (dir, text) = (args.hf.as_deref(), args.text.as_deref());
    let (Some(dir), Some(text)) = (dir, text) else {
        unreachable!("clap requires --text with --hf")
    };
    let report = crate::commands::hf::evaluate_text(
        dir,
        text,
        args.window,
        args.backend,
        args.weights.into(),
    )?;
    println!(
        "{}: {} tokens, loss {}, perplexity {}",
        text.display(),
        report.tokens,
        crate::training::loss_digits(report.loss),
        crate::training::perplexity(report.loss)
    );
    Ok(())
}
