//! `burn-moe`: train, generate, evaluate. See `burn-moe --help`.

use std::process::ExitCode;

use clap::Parser;
use moe_train::cli::{Cli, Command};
use moe_train::commands::{compare, eval, export, generate, serve, train};

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

/// Each command runs and prints its own results.
fn run(cli: Cli) -> moe_train::Result<()> {
    match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Compare(args) => compare::run(*args),
        Command::Generate(args) => generate::generate(&args).map(|_| ()),
        Command::Serve(args) => serve::serve(&args),
        Command::Export(args) => export::run(&args),
        Command::Eval(args) => eval::run(&args),
    }
}
