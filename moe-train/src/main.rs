//! `burn-moe`: train, generate, evaluate. See `burn-moe --help`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use moe_train::cli::{Cli, Command};
use moe_train::commands::{self, load_summary};
use moe_train::commands::{compare, export, hf};
use moe_train::training::{self, RunOptions};

fn main() -> ExitCode {
    // Large temporary tensors are reused from the heap instead of mmapped afresh each time.
    moe_train::runtime::allocator::reuse_heap_memory();
    // Before any thread starts: Vulkan drivers probing for a display complain without it.
    moe_train::runtime::backend::quiet_display_probes();
    let cli = Cli::parse();
    moe_train::runtime::backend::prefer_default_device(cli.command.backend_hint());
    // The CPU backends' parallel operations then split from inside their thread pool.
    match moe_train::runtime::threads::run_on_compute_threads(|| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

fn run(cli: Cli) -> moe_train::Result<()> {
    match cli.command {
        Command::Train(args) => {
            let config = args.resolve()?;
            for warning in args.warnings(&config) {
                eprintln!("warning: {warning}");
            }
            let out = args.out_dir();
            let interrupt = ctrl_c_interrupts();
            let verify = moe_train::cli::verify_flag(args.no_verify);
            let summary = training::train(
                config,
                RunOptions {
                    out: out.clone(),
                    resume: args.resume,
                    overwrite: args.overwrite,
                    show_progress: true,
                    interrupt: Some(interrupt),
                    stop_after: args.stop_after,
                    on_step: None,
                    remote_token: moe_train::cli::token_or_env(&args.token),
                    verify,
                },
            )?;
            if summary.interrupted {
                println!(
                    "stopped at step {}; checkpoint {}; continue with `burn-moe train --out {} --resume`",
                    summary.last_step,
                    summary.checkpoint.display(),
                    out.display()
                );
                return Ok(());
            }
            println!(
                "trained to step {} on {} ({:.0} tokens/s); checkpoint {}",
                summary.last_step,
                summary.device,
                summary.tokens_per_second,
                summary.checkpoint.display()
            );
            if let Some((step, loss)) = summary.val_losses.last() {
                println!(
                    "validation loss at step {step}: {loss:.4} (perplexity {})",
                    training::perplexity(*loss)
                );
            }
            for plot in &summary.plots {
                println!("plot: {}", plot.display());
            }
            println!("metrics: {}", out.join("metrics.jsonl").display());
            if !summary.samples.is_empty() {
                println!("\nsamples:");
                for (i, sample) in summary.samples.iter().enumerate() {
                    println!("--- {} ---\n{sample}", i + 1);
                }
            }
            Ok(())
        }
        Command::Compare(args) => {
            if args.resume || args.dense || args.stop_after.is_some() {
                return Err(moe_train::TrainError::Config(
                    "`compare` trains two whole new runs, the MoE config and its dense twin: `--resume`, `--dense` and `--stop-after` do not apply".into(),
                ));
            }
            let config = args.resolve()?;
            for warning in args.warnings(&config) {
                eprintln!("warning: {warning}");
            }
            let out = args.compare_dir();
            let options = RunOptions {
                overwrite: args.overwrite,
                show_progress: true,
                interrupt: Some(ctrl_c_interrupts()),
                remote_token: moe_train::cli::token_or_env(&args.token),
                ..RunOptions::new(out.clone())
            };
            let comparison = compare::compare(&config, &out, options)?;
            for (name, run) in [("MoE", &comparison.moe), ("dense", &comparison.dense)] {
                if let Some(accuracy) = run.accuracy {
                    println!(
                        "{name}: captions right {:.1} % of the validation images (chance: 10 %)",
                        100.0 * accuracy
                    );
                }
                let last = run
                    .val_losses
                    .last()
                    .map(|(_, loss)| *loss)
                    .unwrap_or(f64::NAN);
                println!(
                    "{name}: {} parameters, {} active per token; validation loss {last:.4}; {:.0} tokens/s",
                    run.parameters.0, run.parameters.1, run.tokens_per_second
                );
            }
            println!("{}", comparison.verdict());
            if let Some(plot) = &comparison.plot {
                println!("plot: {}", plot.display());
            }
            Ok(())
        }
        Command::Generate(args) => commands::generate(&args).map(|_| ()),
        Command::Serve(args) => moe_train::commands::serve::serve(&args),
        Command::Export(args) => {
            let layout = export::export(&args)?;
            let what = match layout {
                export::ExportLayout::HuggingFace(arch) => {
                    format!("a Hugging Face {} folder", arch.class_name())
                }
                export::ExportLayout::BurnMoe => {
                    "burn-moe's own names (the model fits no Hugging Face architecture)".into()
                }
            };
            println!("wrote {} as {what}", args.out.display());
            Ok(())
        }
        Command::Eval(args) if args.hf.is_some() => {
            let (dir, text) = (args.hf.as_deref(), args.text.as_deref());
            let (Some(dir), Some(text)) = (dir, text) else {
                unreachable!("clap requires --text with --hf")
            };
            let report = hf::evaluate_text(dir, text, args.window, args.backend)?;
            println!(
                "{}: {} tokens, loss {:.4}, perplexity {}",
                text.display(),
                report.tokens,
                report.loss,
                training::perplexity(report.loss)
            );
            Ok(())
        }
        Command::Eval(args) => {
            let report = commands::evaluate(&args)?;
            if let Some(warning) = &report.history_warning {
                eprintln!("warning: {warning}");
            }
            println!(
                "checkpoint at step {}: validation loss {:.4}, perplexity {}",
                report.step,
                report.evaluation.loss,
                training::perplexity(report.evaluation.loss)
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
    }
}

/// A flag that the first Ctrl-C sets (the trainer then saves a checkpoint and stops); a second
/// Ctrl-C exits at once.
fn ctrl_c_interrupts() -> Arc<AtomicBool> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let installed = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: stopping now, without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint and stopping (Ctrl-C again to stop at once)");
    });
    if let Err(error) = installed {
        eprintln!("warning: Ctrl-C will not save a checkpoint ({error})");
    }
    interrupt
}
