//! `moe-bench gpu-check`: what a machine with a GPU can tell us, from this one binary (such a
//! machine may have no Rust, no network and no Python packages of ours).
//!
//! 1. The adapter: name, kind, driver, compiler (WGSL or SPIR-V), features and limits; an
//!    adapter that is a CPU (llvmpipe) is refused unless `--allow-cpu` (the same code path,
//!    for checking the check on a machine without a GPU).
//! 2. Every moe-kernels operation at GPU sizes against flex on the same inputs, forward and
//!    backward, in f32 and (where the adapter has it) f16 (`moe_kernels::parity`).
//! 3. The whole-model parity cases against flex (`burn_moe::parity`).
//! 4. Determinism: the tiny preset's MoE layer, forward and backward, twice: equal bit for bit.
//! 5. Timings: W5 (capacity and dropless), W7 (the grouped matmul against the backend's), and
//!    the tiny and small training steps with their launches and host reads.
//! 6. The tiny preset trained 40 steps in f32 and in f16: the losses compared.
//!
//! It writes one JSON file and prints a table; the exit status is 1 if a check failed.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use burn_moe::core::RoutingMode;
use burn_moe::kernels::parity::{compare, Sizes};
use burn_moe::train::config::Preset;
use burn_moe::train::runtime::backend::{select, BackendChoice, Precision, SelectedDevice};
use serde_json::{json, Value};

use crate::{grouped, scaling, step};

/// `moe-bench gpu-check`'s options.
#[derive(Debug, clap::Args)]
pub struct GpuCheckArgs {
    /// Run on a CPU adapter too (llvmpipe): to check the check where there is no GPU.
    #[arg(long)]
    pub allow_cpu: bool,
    /// Where to write the JSON.
    #[arg(long, default_value = "gpu-check.json")]
    pub out: PathBuf,
    /// One timed repetition instead of three.
    #[arg(long)]
    pub quick: bool,
}

/// The outcome of the checks that pass or fail, for the summary.
#[derive(Default)]
struct Tally {
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }
}

/// Runs the check; returns the exit status.
pub fn run(args: &GpuCheckArgs) -> i32 {
    let started = Instant::now();
    let selected = match select(BackendChoice::Wgpu, Precision::F32) {
        Ok(selected) => selected,
        Err(error) => {
            eprintln!("gpu-check: no wgpu adapter: {error}");
            return 1;
        }
    };
    let limits = selected
        .limits
        .clone()
        .expect("a wgpu device reports its limits");
    let adapter = adapter_report(&selected);
    println!("gpu-check on {}", selected.adapter);
    println!(
        "{}",
        serde_json::to_string_pretty(&adapter).expect("serialises")
    );
    if limits.is_cpu && !args.allow_cpu {
        eprintln!(
            "gpu-check: this adapter is a CPU ({}): gpu-check measures GPUs. Pass --allow-cpu to run it anyway.",
            selected.adapter
        );
        return 2;
    }
    #[cfg(feature = "wgpu")]
    if burn_moe::kernels::launches::install_host_read_counter().is_err() {
        eprintln!("gpu-check: host reads will not be counted (a logger was already set)");
    }
    let device = selected.device.clone();
    let flex = Device::flex();
    let (warmup, repeats) = if args.quick { (1, 1) } else { (1, 3) };
    let mut tally = Tally::default();
    let mut report = json!({ "adapter": adapter });
    let half = device.supports_dtype(FloatDType::F16);

    report["kernels"] = check_kernels(&flex, &device, half, &mut tally);

    report["model_parity"] = check_models(&flex, &device, &mut tally);

    section("determinism");
    let equal = same_twice(&device);
    println!(
        "the tiny preset's layer, forward and backward, run twice: {}",
        if equal {
            "equal bit for bit"
        } else {
            "DIFFERENT"
        }
    );
    tally.check(equal, "determinism");
    report["deterministic"] = json!(equal);

    let w7 = timings(&device, half, warmup, repeats, &mut report);

    section("training the tiny preset 40 steps, f32 and f16");
    let training = train_both(&selected, half, &mut tally);
    report["training"] = training;

    let seconds = started.elapsed().as_secs_f64();
    report["seconds"] = json!(seconds);
    report["failures"] = json!(tally.failures);
    section("summary");
    println!("adapter: {}", selected.adapter);
    println!("checks failed: {}", tally.failures.len());
    for failure in &tally.failures {
        println!("  {failure}");
    }
    println!(
        "W7 grouped matmul / backend matmul (geometric mean): {:.2}; batched matmul over the capacity layout: {:.2}",
        grouped::mean_ratio(&w7),
        grouped::mean_batched_ratio(&w7)
    );
    println!("took {seconds:.0} s");
    match std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&report).expect("serialises"),
    ) {
        Ok(()) => println!("wrote {}", args.out.display()),
        Err(error) => {
            eprintln!("gpu-check: {}: {error}", args.out.display());
            return 1;
        }
    }
    i32::from(!tally.failures.is_empty())
}

/// The kernels against flex's at GPU sizes, in f32 and (where the adapter has it) f16.
fn check_kernels(flex: &Device, device: &Device, half: bool, tally: &mut Tally) -> Value {
    section("kernels against flex at GPU sizes");
    let mut kernels = Vec::new();
    for dtype in [FloatDType::F32, FloatDType::F16] {
        if dtype == FloatDType::F16 && !half {
            println!("f16: not run (the adapter has no shader f16)");
            continue;
        }
        for outcome in compare(flex, device, &Sizes::gpu(), dtype) {
            let verdict = if outcome.passed() { "ok" } else { "FAILED" };
            println!(
                "{:<34} {:<4} difference {:.2e} (tolerance {:.0e}) {verdict}",
                outcome.name, outcome.dtype, outcome.difference, outcome.tolerance
            );
            tally.check(
                outcome.passed(),
                format!("kernel {} {}", outcome.name, outcome.dtype),
            );
            kernels.push(json!({
                "name": outcome.name, "dtype": outcome.dtype,
                "difference": finite_or_null(outcome.difference), "passed": outcome.passed(),
            }));
        }
    }
    json!(kernels)
}

/// The whole-model parity cases against flex.
fn check_models(flex: &Device, device: &Device, tally: &mut Tally) -> Value {
    section("whole-model parity against flex");
    let mut models = Vec::new();
    for (name, result) in burn_moe::parity::run(flex, device) {
        match &result {
            Ok(()) => println!("{name} ... ok"),
            Err(message) => println!("{name} ... FAILED: {message}"),
        }
        tally.check(result.is_ok(), format!("parity: {name}"));
        models.push(json!({ "case": name, "error": result.err() }));
    }
    json!(models)
}

/// W5, W7 and W2 on the adapter, written into `report`; W7's rows for the summary.
fn timings(
    device: &Device,
    half: bool,
    warmup: usize,
    repeats: usize,
    report: &mut Value,
) -> Vec<grouped::GroupedRow> {
    section("timings");
    let w5 = scaling::measure(device, 1024, warmup, repeats);
    for row in &w5 {
        println!(
            "W5 {:<14} E={:<3} {:>6} tokens {:>9.1} ms",
            row.capacity,
            row.experts,
            row.tokens,
            row.seconds * 1e3
        );
    }
    report["w5"] = json!({ "rows": w5, "ratios": scaling::ratios(&w5, 1024) });
    let mut w7 = grouped::measure(
        device,
        &grouped::gpu_shapes(),
        FloatDType::F32,
        warmup,
        repeats,
    );
    if half {
        w7.extend(grouped::measure(
            device,
            &grouped::gpu_shapes(),
            FloatDType::F16,
            warmup,
            repeats,
        ));
    }
    grouped::print(&w7);
    report["w7"] = json!({
        "rows": w7,
        "grouped_matmul_ratio": grouped::mean_ratio(&w7),
        "batched_capacity_ratio": grouped::mean_batched_ratio(&w7),
    });
    let mut steps = Vec::new();
    for preset in [Preset::Tiny, Preset::Small] {
        let name = format!("{preset:?}").to_lowercase();
        let row = step::step_row(device, preset, &name, warmup, repeats, true);
        println!(
            "W2 {:<6} {:>9.1} ms a step, {:>9.0} tokens/s, {} launches, {} host reads",
            row.preset,
            row.seconds * 1e3,
            row.tokens_per_second,
            row.launches_per_step.unwrap_or(0),
            row.host_reads_per_step.unwrap_or(0)
        );
        steps.push(row);
    }
    report["w2"] = json!(steps);
    w7
}

fn section(title: &str) {
    println!("\n== {title}");
}

/// JSON has no infinity: a mismatch of integers or shapes is written as null.
fn finite_or_null(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

/// The adapter, as JSON.
fn adapter_report(selected: &SelectedDevice) -> Value {
    let limits = selected
        .limits
        .as_ref()
        .expect("a wgpu device reports its limits");
    json!({
        "adapter": selected.adapter,
        "is_cpu": limits.is_cpu,
        "driver": limits.driver,
        "compiler": limits.compiler,
        "shader_f16": limits.shader_f16,
        "computes_f16": selected.device.supports_dtype(FloatDType::F16),
        "computes_bf16": selected.device.supports_dtype(FloatDType::BF16),
        "workgroup_memory_bytes": limits.workgroup_memory,
        "invocations_per_workgroup": limits.invocations_per_workgroup,
        "storage_binding_bytes": limits.storage_binding,
        "buffer_bytes": limits.buffer,
    })
}

/// The tiny preset's MoE layer (64 experts of width 32, top-16, dropless) forward and backward
/// twice on the same input: whether the output and the gradients are equal bit for bit.
fn same_twice(device: &Device) -> bool {
    let run = || {
        let device = device.clone().autodiff();
        device.seed(11);
        let config = Preset::Tiny.config().text_model_config(step::VOCAB);
        let moe = config
            .decoder
            .moe
            .init(&device)
            .expect("the preset is valid");
        let x = Tensor::<2>::random(
            [4096, config.decoder.d_model],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .require_grad();
        let out = moe.forward_with_mode(x.clone(), RoutingMode::Train);
        let grads = (out.output.clone().powi_scalar(2).mean() + out.aux_loss).backward();
        let mut bits: Vec<u32> = Vec::new();
        for tensor in [out.output, x.grad(&grads).expect("a gradient")] {
            bits.extend(tensor.into_data().iter::<f32>().map(f32::to_bits));
        }
        bits.extend(
            moe.experts
                .w_in
                .val()
                .grad(&grads)
                .expect("a gradient")
                .into_data()
                .iter::<f32>()
                .map(f32::to_bits),
        );
        bits
    };
    run() == run()
}

/// Trains the tiny preset 40 steps in f32 and (where the adapter has it) f16 on a generated
/// corpus; the f16 run's last training loss should be within 5 % of the f32 one's.
fn train_both(selected: &SelectedDevice, half: bool, tally: &mut Tally) -> Value {
    let dir = std::env::temp_dir().join(format!("moe-gpu-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(error) = std::fs::create_dir_all(&dir) {
        tally.check(false, format!("training: {}: {error}", dir.display()));
        return Value::Null;
    }
    let corpus = dir.join("corpus.txt");
    write_corpus(&corpus);
    let mut runs = Vec::new();
    let mut last = Vec::new();
    for precision in [Precision::F32, Precision::F16] {
        if precision == Precision::F16 && !half {
            println!("f16: not run (the adapter has no shader f16)");
            continue;
        }
        let started = Instant::now();
        match train_tiny(&dir, &corpus, precision) {
            Ok(losses) => {
                let seconds = started.elapsed().as_secs_f64();
                let final_loss = losses.last().copied().unwrap_or(f64::NAN);
                println!(
                    "{}: 40 steps in {seconds:.1} s, loss {:.4} -> {final_loss:.4} ({} on {})",
                    precision.name(),
                    losses.first().copied().unwrap_or(f64::NAN),
                    BackendChoice::Wgpu.name(),
                    selected.adapter
                );
                tally.check(
                    final_loss.is_finite(),
                    format!("training {}: the loss is not finite", precision.name()),
                );
                last.push(final_loss);
                runs.push(
                    json!({ "precision": precision.name(), "seconds": seconds, "losses": losses }),
                );
            }
            Err(error) => {
                println!("{}: FAILED: {error}", precision.name());
                tally.check(false, format!("training {}: {error}", precision.name()));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let gap = match last[..] {
        [f32_loss, f16_loss] => {
            let gap = (f16_loss - f32_loss).abs() / f32_loss.abs();
            println!("f16 against f32, last training loss: {:.2} %", 100.0 * gap);
            tally.check(
                gap <= 0.05,
                format!("training: f16 ends {:.1} % from f32", 100.0 * gap),
            );
            Some(gap)
        }
        _ => None,
    };
    json!({ "runs": runs, "f16_gap": gap })
}

/// The training losses of 40 steps of the tiny preset on `corpus` in `precision`.
fn train_tiny(
    dir: &std::path::Path,
    corpus: &std::path::Path,
    precision: Precision,
) -> Result<Vec<f64>, String> {
    use burn_moe::train::store::metrics::{read, Row};
    use burn_moe::train::training::{train, RunOptions};
    let mut config = Preset::Tiny.config();
    config.data.text = Some(corpus.to_path_buf());
    config.run.steps = 40;
    config.run.log_every = 1;
    config.run.eval_every = 40;
    config.run.eval_batches = 2;
    config.run.checkpoint_every = 40;
    config.run.samples = 0;
    config.run.backend = BackendChoice::Wgpu;
    config.run.precision = precision;
    config.optim.warmup_steps = 10;
    let out = dir.join(precision.name());
    let mut options = RunOptions::new(out.clone());
    options.show_progress = false;
    train(config, options).map_err(|error| error.to_string())?;
    let rows = read(&out.join("metrics.jsonl")).map_err(|error| error.to_string())?;
    Ok(rows
        .iter()
        .filter_map(|row| match row {
            Row::Train(row) => Some(row.cross_entropy),
            _ => None,
        })
        .collect())
}

/// 400 generated "poems" of four lines of five characters from a ten-character alphabet, each
/// character one to three places after the one before (a pattern a model learns quickly).
fn write_corpus(path: &std::path::Path) {
    let alphabet: Vec<char> = "春山月水风花雨云夜江".chars().collect();
    let mut state = 11u64;
    let mut place = 0;
    let mut text = String::new();
    for _ in 0..400 {
        for line in 0..4 {
            for _ in 0..5 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                place = (place + 1 + (state >> 62) as usize % 3) % alphabet.len();
                text.push(alphabet[place]);
            }
            text.push(if line % 2 == 0 { '，' } else { '。' });
            text.push('\n');
        }
        text.push('\n');
    }
    let _ = std::fs::write(path, text);
}
