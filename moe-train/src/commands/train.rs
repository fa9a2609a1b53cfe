//! `burn-moe train`: the command around [`crate::training::train`]: flags to config, Ctrl-C to a
//! saved checkpoint, and the run's summary printed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::cli::TrainArgs;
use crate::error::Result;
use crate::training::{self, RunOptions};

/// `burn-moe train`: resolves the flags into a config, trains (or resumes), and prints what it
/// did: the step reached, the speed, the checkpoint, the validation loss, plots and samples.
pub fn run(args: TrainArgs) -> Result<()> {
    let config = args.resolve()?;
    for warning in args.warnings(&config) {
        eprintln!("warning: {warning}");
    }
    let out = args.out_dir();
    let interrupt = ctrl_c_interrupts();
    let verify = crate::cli::verify_flag(args.no_verify);
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
            remote_token: crate::cli::token_or_env(&args.token),
            verify,
            compare_replicas: false,
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
            "validation loss at step {step}: {} (perplexity {})",
            training::loss_digits(*loss),
            training::perplexity(*loss)
        );
    }
    if let Some(report) = &summary.data_parallel {
        println!("{}", report.describe());
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

/// A flag that the first Ctrl-C sets (the trainer then saves a checkpoint and stops); a second
/// Ctrl-C exits at once.
pub(crate) fn ctrl_c_interrupts() -> Arc<AtomicBool> {
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
