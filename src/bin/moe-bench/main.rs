//! `moe-bench`: burn-moe against its dense baseline, its backend's own matmul and PyTorch.
//!
//! ```sh
//! cargo run --release --bin moe-bench -- --backend flex [--quick] [--json FILE]
//! ```
//!
//! Workloads (see BENCHMARKS.md): W1 the MoE layer forward + backward against the dense FFN
//! with the same active FLOPs; W2 a training step of the `tiny` and `small` presets with peak
//! memory; W3 the backend's matmul at the expert GEMM shapes; W4 the same in PyTorch eager
//! (`bench/torch_moe.py`); W5 the layer's cost as tokens and experts grow; W6 what finer
//! experts cost at equal active width; W7 the grouped expert matmul against the backend's
//! matmul at the same FLOPs (`--only w2`, `w5`, `w6` and `w7` run those alone; `w6-ops` takes W6's layers apart). Every figure is the median of repeated runs after warm-up; W1's
//! configurations are timed in interleaved rounds, so that the ratios between them (P1, P2)
//! compare runs made at the same time.

mod breakdown;
mod gpu_check;
mod granularity;
mod grouped;
mod layer;
mod scaling;
mod step;
mod timing;
mod torch;

use std::cell::RefCell;
use std::path::PathBuf;
use std::process::Command;
use std::rc::Rc;

use burn_moe::train::config::Preset;
use burn_moe::train::runtime::backend::{select, BackendChoice, Precision};
use burn_moe::train::runtime::threads::run_on_compute_threads;
use clap::Parser;
use serde_json::{json, Value};

use burn_moe::bench::{LayerForm, LayerRow, MatmulRow, Ratios, Report, TorchSide};
use layer::{D_HIDDEN, D_MODEL, TOKENS};
use step::StepRow;
use torch::{TorchLayerRow, TorchResults, TorchServer};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "moe-bench",
    about = "burn-moe against the dense baseline, the backend's matmul and PyTorch"
)]
struct Args {
    /// Backend to measure.
    #[arg(long, value_enum, default_value_t = BackendChoice::Flex)]
    backend: BackendChoice,
    /// One repetition, fewer shapes: checks that every row still runs.
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The Python that has torch (default: bench/.venv/bin/python if present).
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// Skip the PyTorch workloads.
    #[arg(long)]
    no_torch: bool,
    /// Leave glibc's allocator as it is (large buffers mmapped afresh), instead of the heap
    /// reuse that `burn-moe` turns on: to measure what heap reuse gives.
    #[arg(long)]
    no_heap_reuse: bool,
    /// Run the workloads on the main thread, outside the pool of threads the CPU backends split
    /// their operations over, instead of on one of that pool's threads as `burn-moe` does: to
    /// measure what that gives.
    #[arg(long)]
    main_thread: bool,
    /// Run only this workload: `w2` (training steps), `w5` (scaling: the layer at T, 4T and
    /// 16T tokens and 4, 16 and 64 experts), `w6` (granularity: 4 to 64 experts at equal
    /// active width), `w6-ops` (W6's layers taken apart, operation by operation) or `w7` (the grouped matmul against the backend's matmul).
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// W5's smallest token count T.
    #[arg(long, default_value_t = 1024)]
    scaling_tokens: usize,
    /// Internal: measure W2 for one preset in this process and print its memory.
    #[arg(long, hide = true)]
    w2_child: Option<Preset>,
    /// A mode other than the benchmark.
    #[command(subcommand)]
    mode: Option<Mode>,
}

/// Modes other than the benchmark.
#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// On a machine with a GPU: the adapter, every kernel and the parity cases against flex,
    /// determinism, timings (W5, W7, training steps with launches and host reads) and 40
    /// training steps in f32 and f16; one JSON file and a table (see bench/README.md).
    GpuCheck(gpu_check::GpuCheckArgs),
}

/// The workloads that run on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    /// W2: one training step of each preset.
    W2,
    /// W5: the layer's cost as tokens and experts grow.
    W5,
    /// W6: the layer's cost as experts get finer at equal active width.
    W6,
    /// W6's layer taken apart: each operation's forward and backward time.
    W6Ops,
    /// W7: the grouped matmul's three products against the backend's matmul.
    W7,
}

fn main() {
    let args = Args::parse();
    if let Some(Mode::GpuCheck(check)) = &args.mode {
        burn_moe::train::runtime::backend::quiet_display_probes();
        let status = run_on_compute_threads(|| gpu_check::run(check));
        std::process::exit(status);
    }
    let heap_reuse =
        !args.no_heap_reuse && burn_moe::train::runtime::allocator::reuse_heap_memory();
    if args.main_thread {
        bench(&args, heap_reuse);
    } else {
        run_on_compute_threads(|| bench(&args, heap_reuse));
    }
}

/// Everything but the process-wide settings, which `main` makes first.
fn bench(args: &Args, heap_reuse: bool) {
    let selected = match select(args.backend, Precision::F32) {
        Ok(selected) => selected,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    };
    let device = selected.device.clone();
    let (warmup, repeats) = if args.quick { (1, 1) } else { (2, 5) };

    if let Some(preset) = args.w2_child {
        w2_child(args, &device, preset, warmup, repeats);
        return;
    }

    if let Some(only) = args.only {
        run_only(args, only, &device, &selected.to_string(), warmup, repeats);
        return;
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "moe-bench on {selected}; {threads} threads; median of {repeats} after {warmup} warm-up (W1, W3 and PyTorch's W1: in interleaved rounds); heap reuse {}; work on {}\n",
        if heap_reuse { "on" } else { "off" },
        if args.main_thread { "the main thread" } else { "a compute thread" }
    );
    let experts: Vec<usize> = if args.quick {
        vec![4, 8, 64]
    } else {
        vec![4, 8, 16, 32, 64]
    };

    // W4's PyTorch runs alternate with ours: its script runs beside the benchmark as a server.
    let mut server = start_torch(args, threads, &experts);

    let (w1, w3, torch_w1) = w1_and_w3(&device, &experts, &mut server, warmup, repeats);

    let (w2, torch_w2) = w2(args, &mut server, warmup, repeats);

    // W4
    let torch = server.map(|server| TorchResults {
        torch: server.torch.clone(),
        threads: server.threads,
        w1: torch_w1,
        w2: torch_w2,
    });
    print_torch(&torch);

    let w5 = w5(&device, args, warmup, repeats);
    let w6 = w6(&device, warmup, repeats);
    let w7 = w7(&device, args.quick, warmup, repeats);

    let ratios = Ratios::of(&w1, &w2, &w3, torch.as_ref().ok());
    println!("\nratios (targets: P1 >= 0.90 at E=8 top-2, P2 <= 1.10, P3 >= 1.0, P4 >= 0.80, memory <= 1.5)");
    let printed = serde_json::to_value(&ratios).expect("ratios serialise");
    for (name, values) in printed.as_object().expect("ratios are an object") {
        println!("{name}: {values}");
    }
    let report = Report {
        backend: selected.to_string(),
        threads,
        heap_reuse,
        on_compute_thread: !args.main_thread,
        quick: args.quick,
        w1,
        w2,
        w3,
        w4: match torch {
            Ok(results) => TorchSide::Measured(results),
            Err(reason) => TorchSide::NotMeasured {
                not_measured: reason,
            },
        },
        w5,
        w6: json!(w6),
        w7,
        ratios,
    };
    write_json(args, json!(report));
}

/// `--w2-child PRESET`: W2 for one preset in this process, its row printed as one JSON line
/// with the process's peak memory (the parent reads it, `w2_in_child`).
fn w2_child(
    args: &Args,
    device: &burn::tensor::Device,
    preset: Preset,
    warmup: usize,
    repeats: usize,
) {
    let baseline = step::memory_status().map(|(_, rss)| rss);
    let observe = observe_wgpu(args);
    let name = preset_name(preset);
    let mut row = step::step_row(device, preset, &name, warmup, repeats, observe);
    row.peak_rss = step::memory_status().map(|(peak, _)| peak);
    row.baseline_rss = baseline;
    println!("{}", serde_json::to_string(&row).expect("serialises"));
}

/// One workload alone (`--only`), its rows written to `--json`.
fn run_only(
    args: &Args,
    only: Only,
    device: &burn::tensor::Device,
    backend: &str,
    warmup: usize,
    repeats: usize,
) {
    match only {
        Only::W5 => {
            let w5 = w5(device, args, warmup, repeats);
            write_json(args, json!({ "backend": backend, "w5": w5 }));
        }
        Only::W6 => {
            let w6 = w6(device, warmup, repeats);
            write_json(args, json!({ "backend": backend, "w6": w6 }));
        }
        Only::W6Ops => {
            let (warmup, repeats) = if args.quick { (1, 1) } else { (3, 15) };
            let rows = breakdown::measure(device, warmup, repeats);
            breakdown::print(&rows);
            write_json(args, json!({ "backend": backend, "w6_ops": rows }));
        }
        Only::W7 => {
            let w7 = w7(device, args.quick, warmup, repeats);
            write_json(args, json!({ "backend": backend, "w7": w7 }));
        }
        Only::W2 => {
            let (w2, _) = w2(args, &mut Err("--only w2".into()), warmup, repeats);
            write_json(args, json!({ "backend": backend, "w2": w2 }));
        }
    }
}

/// `bench/torch_moe.py --serve` with W1's configurations built, or why it is not running
/// (`--no-torch`, no Python with torch).
fn start_torch(args: &Args, threads: usize, experts: &[usize]) -> Result<TorchServer, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if args.no_torch {
        Err("--no-torch".to_string())
    } else {
        match args
            .torch_python
            .clone()
            .or_else(|| torch::default_python(&root))
        {
            Some(python) => {
                println!("W4: PyTorch eager (bench/torch_moe.py --serve), building its layers ...");
                TorchServer::start(&python, &root.join("bench/torch_moe.py"), threads, experts)
            }
            None => Err(
                "no Python with torch: see bench/README.md (or pass --torch-python)".to_string(),
            ),
        }
    }
}

/// W1 and W3 timed in interleaved rounds with PyTorch's W1 configurations (when its server
/// runs): our W1 rows, our W3 rows and PyTorch's W1 rows. A PyTorch failure leaves `server`
/// holding its reason.
fn w1_and_w3(
    device: &burn::tensor::Device,
    experts: &[usize],
    server: &mut Result<TorchServer, String>,
    warmup: usize,
    repeats: usize,
) -> (Vec<LayerRow>, Vec<MatmulRow>, Vec<TorchLayerRow>) {
    // W1
    let mut w1: Vec<LayerRow> = Vec::new();
    println!("W1: MoE layer, forward + backward, {TOKENS} tokens, d_model {D_MODEL}, expert hidden {D_HIDDEN}");
    println!(
        "{:<6} {:>4} {:>3} {:<14} {:>6} {:>10} {:>12} {:>9}",
        "kind", "E", "k", "capacity", "slots", "ms", "tokens/s", "GFLOP/s"
    );
    // Every configuration is built first, then timed in rounds (each round runs each once),
    // so that a slow spell of the machine cannot favour one side of a ratio.
    // PyTorch's W1 times, as its script measures them, and why they stopped if they did.
    let torch_cases = server.as_ref().map_or(0, |server| server.cases.len());
    let torch_times = RefCell::new(vec![Vec::new(); torch_cases]);
    let torch_error = RefCell::new(None);
    let mut cases = Vec::new();
    let mut runs = Vec::new();
    for top_k in [1, 2] {
        let (case, run) = layer::dense_case(device, top_k);
        cases.push(case);
        runs.push(run);
        for &e in experts {
            for dropless in [true, false] {
                let (case, run) = layer::moe_case(device, e, top_k, dropless);
                cases.push(case);
                runs.push(run);
            }
        }
    }
    // W3 joins the rounds too: the dense FFN's first projection, then the E=8 top-2 expert
    // buffers (a pass of each of those layers runs once here first, so that the capacity
    // layer has its capacity).
    let layers = runs.len();
    let mut w3_cases = Vec::new();
    let mut shapes = vec![(1, TOKENS, 2 * D_HIDDEN)];
    for (case, run) in cases.iter().zip(&mut runs) {
        if case.key.kind == LayerForm::Moe && (case.key.experts, case.key.top_k) == (8, 2) {
            run();
            shapes.push((8, case.slots(), D_HIDDEN));
        }
    }
    for (batch, rows, columns) in shapes {
        let (case, run) = layer::matmul_case(device, batch, rows, D_MODEL, columns);
        w3_cases.push(case);
        runs.push(run);
    }
    // PyTorch's configurations join the rounds; their times are the ones the script measures.
    let ours = runs.len();
    if let Ok(server) = server.as_mut() {
        let server = Rc::new(RefCell::new(server));
        for case in 0..torch_cases {
            let (server, times, error) = (server.clone(), &torch_times, &torch_error);
            runs.push(Box::new(move || match server.borrow_mut().run_w1(case) {
                Ok(seconds) => times.borrow_mut()[case].push(seconds),
                Err(reason) => *error.borrow_mut() = Some(reason),
            }));
        }
    }
    let mut seconds = timing::interleaved_median_seconds(device, warmup, repeats, &mut runs);
    seconds.truncate(ours);
    let w3_seconds = seconds.split_off(layers);
    // The 22 layers' weights (about 2 GB) are not needed by the workloads that follow.
    drop(runs);
    let mut torch_w1 = Vec::new();
    if let Some(reason) = torch_error.into_inner() {
        *server = Err(reason);
    } else if let Ok(server) = &*server {
        for (case, mut times) in server.cases.iter().zip(torch_times.into_inner()) {
            // The first `warmup` runs were the warm-up rounds.
            let measured = times.split_off(warmup.min(times.len()));
            if measured.is_empty() {
                continue;
            }
            let median = timing::median(measured);
            torch_w1.push(TorchLayerRow {
                case: *case,
                seconds: median,
                tokens_per_second: TOKENS as f64 / median,
            });
        }
    }
    for (case, seconds) in cases.iter().zip(seconds) {
        let row = case.row(seconds);
        print_layer(&row);
        w1.push(row);
    }

    // W3
    println!("\nW3: the backend's batched matmul at the expert shapes (forward, in W1's rounds)");
    let mut w3: Vec<MatmulRow> = Vec::new();
    for (case, seconds) in w3_cases.iter().zip(w3_seconds) {
        let row = case.row(seconds);
        print_matmul(&row);
        w3.push(row);
    }
    (w1, w3, torch_w1)
}

/// W4: PyTorch's rows, or why they were not measured.
fn print_torch(torch: &Result<TorchResults, String>) {
    if let Ok(results) = torch {
        println!("torch {} on {} threads", results.torch, results.threads);
        for row in &results.w1 {
            println!(
                "{:<6} {:>4} {:>3} {:<14} {:>10.1} ms {:>12.0} tokens/s",
                row.case.form,
                row.case.experts,
                row.case.top_k,
                row.case.capacity,
                row.seconds * 1e3,
                row.tokens_per_second
            );
        }
        for row in &results.w2 {
            println!(
                "{:<6} step {:>9.1} ms {:>9.0} tokens/s ({} parameters)",
                row.preset,
                row.seconds * 1e3,
                row.tokens_per_second,
                row.parameters
            );
        }
    } else if let Err(reason) = torch {
        println!("\nW4: PyTorch not measured: {reason}");
    }
}

/// W2, each preset in its own process so that its peak memory is its own, with PyTorch's step
/// right after ours when its server runs: our rows and PyTorch's.
fn w2(
    args: &Args,
    server: &mut Result<TorchServer, String>,
    warmup: usize,
    repeats: usize,
) -> (Vec<StepRow>, Vec<torch::TorchStepRow>) {
    println!("\nW2: one training step (forward, backward, AdamW)");
    let mut w2: Vec<StepRow> = Vec::new();
    let presets: Vec<Preset> = if args.quick {
        vec![Preset::Tiny]
    } else {
        vec![Preset::Tiny, Preset::Small]
    };
    let mut torch_w2 = Vec::new();
    for preset in presets {
        // PyTorch's step right after ours.
        let child = w2_in_child(args, preset);
        if let Ok(server) = server.as_mut() {
            match server.w2(&preset_name(preset), warmup, repeats) {
                Ok(row) => torch_w2.push(row),
                Err(reason) => println!(
                    "PyTorch W2 {}: not measured ({reason})",
                    preset_name(preset)
                ),
            }
        }
        match child {
            Ok(row) => {
                if let (Some(launches), Some(reads)) =
                    (row.launches_per_step, row.host_reads_per_step)
                {
                    println!(
                        "{:<6} one step: {launches} kernel launches, {reads} host reads",
                        row.preset
                    );
                }
                println!(
                    "{:<6} {:>9} params {:>9} active {:>6} tokens {:>9.1} ms {:>9.0} tokens/s  peak RSS {:>6.0} MB (estimate {:.0} MB + runtime {:.0} MB)",
                    row.preset,
                    row.parameters,
                    row.active_parameters,
                    row.tokens,
                    row.seconds * 1e3,
                    row.tokens_per_second,
                    row.peak_rss.unwrap_or(0) as f64 / 1e6,
                    row.estimated_bytes as f64 / 1e6,
                    row.baseline_rss.unwrap_or(0) as f64 / 1e6,
                );
                w2.push(row);
            }
            Err(error) => println!("{}: not measured ({error})", preset_name(preset)),
        }
    }

    (w2, torch_w2)
}

/// W7 in f32, and in f16 where the device computes in it.
fn w7(device: &burn::tensor::Device, quick: bool, warmup: usize, repeats: usize) -> Value {
    use burn::tensor::FloatDType;
    println!("\nW7: the grouped expert matmul against the backend's matmul, same rows and FLOPs, and the batched matmul over the capacity layout (interleaved rounds)");
    let shapes = grouped::shapes(quick);
    let mut rows = grouped::measure(device, &shapes, FloatDType::F32, warmup, repeats);
    if device.supports_dtype(FloatDType::F16) {
        rows.extend(grouped::measure(
            device,
            &shapes,
            FloatDType::F16,
            warmup,
            repeats,
        ));
    }
    grouped::print(&rows);
    let mean = grouped::mean_ratio(&rows);
    let batched = grouped::mean_batched_ratio(&rows);
    println!("grouped_matmul_ratio (geometric mean; target on llvmpipe: >= 0.8): {mean:.2}");
    println!("batched_capacity_ratio (the batched matmul over the capacity layout): {batched:.2}");
    json!({ "rows": rows, "grouped_matmul_ratio": mean, "batched_capacity_ratio": batched })
}

/// W6: prints and returns its rows.
fn w6(
    device: &burn::tensor::Device,
    warmup: usize,
    repeats: usize,
) -> Vec<granularity::GranularityRow> {
    println!(
        "\nW6: granularity, MoE layer forward + backward at {} tokens, d_model {}, dropless, top-k x hidden = {} (interleaved rounds)",
        granularity::TOKENS,
        granularity::D_MODEL,
        granularity::ACTIVE_HIDDEN
    );
    let rows = granularity::measure(device, warmup, repeats);
    println!(
        "{:>4} {:>6} {:>7} {:>9} {:>11}",
        "E", "top-k", "hidden", "ms", "over dense"
    );
    for row in &rows {
        println!(
            "{:>4} {:>6} {:>7} {:>9.2} {:>11.2}",
            row.experts,
            row.top_k,
            row.hidden,
            row.seconds * 1e3,
            row.over_dense
        );
    }
    rows
}

/// W5: prints and returns its rows and ratios.
fn w5(device: &burn::tensor::Device, args: &Args, warmup: usize, repeats: usize) -> Value {
    let base = args.scaling_tokens;
    println!(
        "\nW5: scaling, MoE layer forward + backward, d_model {}, expert hidden {}, top-{}, untrained router (interleaved rounds)",
        scaling::D_MODEL,
        scaling::D_HIDDEN,
        scaling::TOP_K
    );
    let rows = scaling::measure(device, base, warmup, repeats);
    println!("{:<14} {:>4} {:>7} {:>10}", "capacity", "E", "tokens", "ms");
    for row in &rows {
        println!(
            "{:<14} {:>4} {:>7} {:>10.1}",
            row.capacity,
            row.experts,
            row.tokens,
            row.seconds * 1e3
        );
    }
    let ratios = scaling::ratios(&rows, base);
    println!(
        "ratios (targets: each 4x in tokens <= 4.5x the time; 64 experts <= 1.3x the time of 4)"
    );
    for key in ["tokens_4x_time_ratio", "experts_64_over_4_time_ratio"] {
        println!("{key}: {}", ratios[key]);
    }
    json!({ "rows": rows, "ratios": ratios })
}

/// Whether to count W2's kernel launches and host reads: on wgpu, once this process counts its
/// host reads.
#[cfg(feature = "wgpu")]
fn observe_wgpu(args: &Args) -> bool {
    args.backend == BackendChoice::Wgpu
        && burn_moe::kernels::launches::install_host_read_counter()
            .map_err(|error| eprintln!("W2: host reads not counted: {error}"))
            .is_ok()
}

#[cfg(not(feature = "wgpu"))]
fn observe_wgpu(_args: &Args) -> bool {
    false
}

/// Writes `output` to `--json`, if given.
fn write_json(args: &Args, output: Value) {
    if let Some(path) = &args.json {
        if let Err(error) = std::fs::write(
            path,
            serde_json::to_string_pretty(&output).expect("serialises"),
        ) {
            eprintln!("error: {}: {error}", path.display());
            std::process::exit(1);
        }
        println!("\nwrote {}", path.display());
    }
}

fn preset_name(preset: Preset) -> String {
    serde_json::to_value(preset)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn print_layer(row: &LayerRow) {
    println!(
        "{:<6} {:>4} {:>3} {:<14} {:>6} {:>10.1} {:>12.0} {:>9.1}",
        row.key.kind,
        row.key.experts,
        row.key.top_k,
        row.key.capacity,
        row.capacity_slots,
        row.seconds * 1e3,
        row.tokens_per_second,
        row.gflops
    );
}

fn print_matmul(row: &MatmulRow) {
    println!(
        "[{} x {} x {}] x [{} x {}]: {:.2} ms, {:.1} GFLOP/s",
        row.batch,
        row.rows,
        row.inner,
        row.inner,
        row.columns,
        row.seconds * 1e3,
        row.gflops
    );
}

/// Runs W2 for `preset` in a child process of this program.
fn w2_in_child(args: &Args, preset: Preset) -> Result<StepRow, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let backend = serde_json::to_value(args.backend)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let mut command = Command::new(exe);
    command.args(["--backend", &backend, "--w2-child", &preset_name(preset)]);
    if args.quick {
        command.arg("--quick");
    }
    if args.no_heap_reuse {
        command.arg("--no-heap-reuse");
    }
    if args.main_thread {
        command.arg("--main-thread");
    }
    let output = command.output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr)
            .lines()
            .last()
            .unwrap_or("failed")
            .to_string());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or("no result")?;
    serde_json::from_str(line).map_err(|e| e.to_string())
}
