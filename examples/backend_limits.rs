//! The smallest programs behind the figures in BENCHMARKS.md where Burn itself, not our MoE
//! code, sets the limit.
//!
//! 1. Element-wise transcendental functions (`erf`, `exp`, `tanh`) against `relu` and against a
//!    matmul of the same output size: on flex they cost far more per element than a GEMM does
//!    per output, and the exact GELU of an expert is made of them.
//! 2. The batched matmul that runs all experts at once (`[E, C, d] x [E, d, h]`) against one
//!    flat matmul over the same rows (`[E*C, d] x [d, h]`) and against one matmul per expert:
//!    what the expert batch costs the GEMM; and moe-kernels' grouped matmul on the same rows
//!    in equal groups (what the ragged layout costs when the load is even).
//! 3. GELU: Burn's `activation::gelu`, the exact GELU composed from Burn's ops and moe-core's
//!    (one fused operation from moe-kernels): their gradients against the exact derivative, and
//!    their cost forward + backward.
//! 4. Where the MoE layer's time goes (W1's top-2 dropless layer, E = 8 unless `--experts`
//!    says otherwise, forward + backward): the whole layer, its experts alone on a buffer
//!    grouped as the layer's router grouped it, their GELU alone, and the dense FFN with the same FLOPs.
//! 5. What the experts' weights alone cost to move through memory at E = 4 and E = 64, with no
//!    arithmetic: one forward + backward pass reads each expert's two weight matrices twice
//!    (forward product, input gradient) and writes their gradients once. Plain Rust on all
//!    cores, no Burn: a property of the machine, and a lower bound on what 16x the parameters
//!    add to P2 unless the GEMMs hide it.
//! 6. Dispatch and combine of W1's E = 8 top-2 layer (4096 tokens to 8 x 1059 slots and back),
//!    forward + backward: Burn's `select` and `select_assign` (the composed form moe-core used
//!    before) against `moe_kernels::{gather_rows, combine_rows}`.
//! 7. The machine's arithmetic peak against the backend's GEMM, in alternating rounds: a loop of
//!    independent AVX-512 fused multiply-adds that never touches memory (one thread, then every
//!    core at once), and the dense FFN's first product `[4096, 512] x [512, 1024]`. What a GEMM
//!    could reach at that moment, on a machine whose speed moves within minutes. x86-64 with
//!    AVX-512 only.
//!
//! ```sh
//! cargo run --release --example backend_limits -- --backend flex
//! cargo run --release --example backend_limits -- --part 4 --experts 64
//! cargo run --release --example backend_limits -- --part 5 --part 6
//! cargo run --release --example backend_limits -- --part 7 --repeats 9
//! ```

use burn::tensor::ops::IndexingUpdateOp;
use burn::tensor::{activation, Device, Distribution, Int, Tensor};
use burn_moe::core::{ExpertConfig, RoutingMode};
use burn_moe::kernels::{combine_rows, gather_rows, grouped_matmul};
use burn_moe::train::runtime::backend::{select_and_report, BackendChoice, Precision};
use clap::Parser;

// The benchmark's timing (medians after warm-up, each run ending with a device sync) and its
// W1 layer, so that part 4 measures exactly the layer BENCHMARKS.md tabulates.
#[allow(dead_code)] // only the layer's config and sizes are used here, not W1's runners
#[path = "../src/bin/moe-bench/layer.rs"]
mod layer;
#[path = "../src/bin/moe-bench/timing.rs"]
mod timing;

use layer::{D_HIDDEN, D_MODEL, TOKENS};

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// Where to run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Flex)]
    backend: BackendChoice,
    /// Timed runs per figure (the median is printed).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Run only this part (1 to 7; repeat the flag for several); all parts by default.
    #[arg(long)]
    part: Vec<usize>,
    /// Experts of part 4's layer.
    #[arg(long, default_value_t = EXPERTS)]
    experts: usize,
}

/// Rows of the expert activation: W1's tokens routed to 2 experts each.
const ROWS: usize = 2 * TOKENS;
/// Experts in the batched product.
const EXPERTS: usize = 8;

/// An element-wise function of a matrix.
type ElementWise = fn(Tensor<2>) -> Tensor<2>;

/// Median milliseconds of `work` after one warm-up run.
fn median_ms(device: &Device, repeats: usize, work: impl FnMut()) -> f64 {
    timing::median_seconds(device, 1, repeats, work) * 1e3
}

/// Inputs drawn from `N(0, 1)`.
const NORMAL: Distribution = Distribution::Normal(0.0, 1.0);

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    // As moe-bench and the trainer do, so that the figures compare.
    burn_moe::train::runtime::allocator::reuse_heap_memory();
    burn_moe::train::runtime::threads::run_on_compute_threads(|| run(&args))
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let device = select_and_report(args.backend, Precision::F32)?.device;
    device.seed(0);
    let parts = if args.part.is_empty() {
        vec![1, 2, 3, 4, 5, 6, 7]
    } else {
        args.part.clone()
    };
    for part in parts {
        match part {
            1 => element_wise(&device, args),
            2 => expert_batch(&device, args),
            3 => gelu_forms(&device, args)?,
            4 => layer_breakdown(&device, args)?,
            5 => weight_traffic(args),
            6 => dispatch_and_combine(&device, args),
            7 => arithmetic_peak(&device, args),
            _ => return Err(format!("--part {part}: the parts are 1 to 7").into()),
        }
    }
    Ok(())
}

/// Part 1: element-wise functions against relu and against a matmul of the same output size.
fn element_wise(device: &Device, args: &Args) {
    let normal = NORMAL;
    println!("\n1. element-wise functions on [{ROWS}, {D_HIDDEN}] (the expert activation)");
    let hidden = Tensor::<2>::random([ROWS, D_HIDDEN], normal, device);
    let elements = (ROWS * D_HIDDEN) as f64;
    let unary: [(&str, ElementWise); 4] = [
        ("relu", activation::relu),
        ("exp", Tensor::exp),
        ("tanh", Tensor::tanh),
        ("erf", Tensor::erf),
    ];
    let mut relu_ms = 0.0;
    for (name, op) in unary {
        let ms = median_ms(device, args.repeats, || {
            let _ = op(hidden.clone());
        });
        if name == "relu" {
            relu_ms = ms;
        }
        println!(
            "   {name:<5} {ms:8.1} ms  {:6.2} ns/element  {:5.1}x relu",
            ms * 1e6 / elements,
            ms / relu_ms
        );
    }
    let input = Tensor::<2>::random([ROWS, D_MODEL], normal, device);
    let weight = Tensor::<2>::random([D_MODEL, D_HIDDEN], normal, device);
    let ms = median_ms(device, args.repeats, || {
        let _ = input.clone().matmul(weight.clone());
    });
    println!(
        "   matmul [{ROWS}, {D_MODEL}] x [{D_MODEL}, {D_HIDDEN}] {ms:8.1} ms  {:6.1} GFLOP/s  ({:.2} ns per output)",
        2.0 * elements * D_MODEL as f64 / ms / 1e6,
        ms * 1e6 / elements
    );
}

/// Part 2: the batched matmul of all experts against flat, per-expert and grouped matmuls.
fn expert_batch(device: &Device, args: &Args) {
    let normal = NORMAL;
    let elements = (ROWS * D_HIDDEN) as f64;
    let input = Tensor::<2>::random([ROWS, D_MODEL], normal, device);
    let weight = Tensor::<2>::random([D_MODEL, D_HIDDEN], normal, device);
    let ms = median_ms(device, args.repeats, || {
        let _ = input.clone().matmul(weight.clone());
    });
    println!("\n2. all experts at once: batched against flat and per-expert matmuls, same rows");
    let rows = ROWS / EXPERTS;
    let batched_in = Tensor::<3>::random([EXPERTS, rows, D_MODEL], normal, device);
    let batched_w = Tensor::<3>::random([EXPERTS, D_MODEL, D_HIDDEN], normal, device);
    let flops = 2.0 * elements * D_MODEL as f64;
    let batched_ms = median_ms(device, args.repeats, || {
        let _ = batched_in.clone().matmul(batched_w.clone());
    });
    println!(
        "   [{EXPERTS}, {rows}, {D_MODEL}] x [{EXPERTS}, {D_MODEL}, {D_HIDDEN}] {batched_ms:8.1} ms  {:6.1} GFLOP/s",
        flops / batched_ms / 1e6
    );
    println!(
        "   [{ROWS}, {D_MODEL}] x [{D_MODEL}, {D_HIDDEN}]          {ms:8.1} ms  {:6.1} GFLOP/s  (batched / flat = {:.2})",
        flops / ms / 1e6,
        batched_ms / ms
    );
    let per_expert_ms = median_ms(device, args.repeats, || {
        for expert in 0..EXPERTS {
            let input = batched_in
                .clone()
                .slice(expert..expert + 1)
                .squeeze_dim::<2>(0);
            let weight = batched_w
                .clone()
                .slice(expert..expert + 1)
                .squeeze_dim::<2>(0);
            let _ = input.matmul(weight);
        }
    });
    println!(
        "   {EXPERTS} x [{rows}, {D_MODEL}] x [{D_MODEL}, {D_HIDDEN}]      {per_expert_ms:8.1} ms  {:6.1} GFLOP/s  (batched / per expert = {:.2})",
        flops / per_expert_ms / 1e6,
        batched_ms / per_expert_ms
    );
    let flat_in = batched_in.clone().reshape([ROWS, D_MODEL]);
    let grouped_ms = median_ms(device, args.repeats, || {
        let _ = grouped_matmul(
            flat_in.clone(),
            batched_w.clone(),
            even_offsets(EXPERTS, rows, device),
        );
    });
    println!(
        "   grouped, every row in a group        {grouped_ms:8.1} ms  {:6.1} GFLOP/s  (batched / grouped = {:.2})",
        flops / grouped_ms / 1e6,
        batched_ms / grouped_ms
    );
    // The same rows spread over many experts: each GEMM gets fewer rows and its own weights.
    for experts in [16, 64] {
        let rows = ROWS / experts;
        let input = Tensor::<2>::random([experts * rows, D_MODEL], normal, device);
        let weights = Tensor::<3>::random([experts, D_MODEL, D_HIDDEN], normal, device);
        let ms = median_ms(device, args.repeats, || {
            let _ = grouped_matmul(
                input.clone(),
                weights.clone(),
                even_offsets(experts, rows, device),
            );
        });
        println!(
            "   grouped, {experts} experts x {rows} rows         {ms:8.1} ms  {:6.1} GFLOP/s  ({:.2} x the 8-expert time)",
            flops / ms / 1e6,
            ms / grouped_ms
        );
    }
}

/// `[0, rows, 2 rows, ..., experts rows]`: `experts` groups of `rows` rows each.
fn even_offsets(experts: usize, rows: usize, device: &Device) -> Tensor<1, Int> {
    Tensor::<1, Int>::arange(0..experts as i64 + 1, device).mul_scalar(rows as i64)
}

/// Part 3: Burn's GELU, the composed exact GELU and moe-core's fused one.
fn gelu_forms(
    device: &Device,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let normal = NORMAL;
    println!("\n3. GELU: gradients against the exact derivative, and costs");
    // d/dx [x Phi(x)] = Phi(x) + x phi(x), from Python's math.erf and math.exp.
    let points = [-3.0, -2.0, -1.0, 1.0, 2.0];
    let exact = [
        -0.011_945_647_f64,
        -0.085_231_801,
        -0.083_315_471,
        1.083_315_471,
        1.085_231_801,
    ];
    let autodiff = device.clone().autodiff();
    let x = Tensor::<1>::from_floats(points, &autodiff)
        .reshape([1, points.len()])
        .require_grad();
    let forms: [(&str, ElementWise); 4] = [
        ("activation::gelu", activation::gelu),
        ("exact GELU from Burn's ops", composed_gelu),
        ("moe_core::gelu (one fused op)", burn_moe::core::gelu),
        ("activation::relu", activation::relu),
    ];
    for (name, op) in &forms[..3] {
        let grads = op(x.clone()).sum().backward();
        let gradient = x.grad(&grads).ok_or("no gradient")?.into_data();
        let worst = gradient
            .iter::<f64>()
            .zip(exact)
            .map(|(got, want)| (got - want).abs() / want.abs())
            .fold(0.0, f64::max);
        println!(
            "   {name:<31} largest relative error of the gradient at x = {points:?}: {worst:.1e}"
        );
    }
    let activation_in = Tensor::<2>::random([ROWS, D_HIDDEN], normal, &autodiff);
    for (name, op) in forms {
        let ms = median_ms(&autodiff, args.repeats, || {
            let x = activation_in.clone().require_grad();
            let _ = op(x).sum().backward();
        });
        println!("   {name:<31} forward + backward {ms:8.1} ms");
    }

    Ok(())
}

/// Part 4: where the time of one W1 layer goes.
fn layer_breakdown(
    device: &Device,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let normal = NORMAL;
    let autodiff = device.clone().autodiff();
    let experts = args.experts;
    println!(
        "\n4. the MoE layer of W1 (4096 tokens, E = {experts}, top-2, dropless), forward + backward"
    );
    let moe = layer::moe_config(experts, 2, true).init(&autodiff)?;
    let tokens = Tensor::<2>::random([TOKENS, D_MODEL], normal, &autodiff);
    let mut loads = Tensor::<1, Int>::zeros([experts], &autodiff);
    let layer_ms = median_ms(&autodiff, args.repeats, || {
        let out = moe.forward_with_mode(tokens.clone().require_grad(), RoutingMode::Train);
        loads = out.stats.tokens_per_expert.clone();
        let _ = (out.output.mean() + out.aux_loss).backward();
    });
    // The buffer of the last pass: its rows grouped by expert as the router left them.
    let slots = 2 * TOKENS;
    let offsets = Tensor::cat(
        vec![Tensor::<1, Int>::zeros([1], &autodiff), loads.cumsum(0)],
        0,
    );
    let buffer = Tensor::<2>::random([slots, D_MODEL], normal, &autodiff);
    let experts_ms = median_ms(&autodiff, args.repeats, || {
        let _ = moe
            .experts
            .forward_grouped(buffer.clone().require_grad(), offsets.clone())
            .mean()
            .backward();
    });
    let hidden = Tensor::<2>::random([slots, D_HIDDEN], normal, &autodiff);
    let gelu_ms = median_ms(&autodiff, args.repeats, || {
        let _ = burn_moe::core::gelu(hidden.clone().require_grad())
            .mean()
            .backward();
    });
    let dense = ExpertConfig::new(2 * D_HIDDEN).init(1, D_MODEL, &autodiff);
    let dense_in = Tensor::<3>::random([1, TOKENS, D_MODEL], normal, &autodiff);
    let dense_ms = median_ms(&autodiff, args.repeats, || {
        let _ = dense
            .forward(dense_in.clone().require_grad())
            .mean()
            .backward();
    });
    println!("   whole layer ({slots} rows in the expert buffer)   {layer_ms:8.1} ms");
    println!(
        "   experts alone on [{slots}, {D_MODEL}]   {experts_ms:8.1} ms  ({:.0} % of the layer)",
        100.0 * experts_ms / layer_ms
    );
    println!(
        "   their GELU alone on [{slots}, {D_HIDDEN}] {gelu_ms:8.1} ms  ({:.0} % of the layer)",
        100.0 * gelu_ms / layer_ms
    );
    println!(
        "   dense FFN, same FLOPs, [{TOKENS}, {D_MODEL}] -> {}   {dense_ms:8.1} ms  ({:.0} % of the layer)",
        2 * D_HIDDEN,
        100.0 * dense_ms / layer_ms
    );
    Ok(())
}

/// Part 5: the experts' weights streamed through memory (read twice, gradient written once),
/// at E = 4 and E = 64, on all cores.
fn weight_traffic(args: &Args) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\n5. the experts' weights alone: 2 x [{D_MODEL}, {D_HIDDEN}] f32 per expert, read twice \
         and their gradient written once ({threads} threads, no arithmetic)"
    );
    let mut by_experts = Vec::new();
    for experts in [4, 64] {
        let len = experts * 2 * D_MODEL * D_HIDDEN;
        let weights = vec![1.0f32; len];
        let mut gradient = vec![0.0f32; len];
        let times: Vec<f64> = (0..args.repeats.max(1) + 1)
            .map(|_| {
                let start = std::time::Instant::now();
                let read = streamed_sum(&weights, threads) + streamed_sum(&weights, threads);
                streamed_fill(&mut gradient, read as f32, threads);
                start.elapsed().as_secs_f64() * 1e3
            })
            .skip(1)
            .collect();
        let ms = timing::median(times);
        let megabytes = (len * 4) as f64 / 1e6;
        println!(
            "   E = {experts:>2}: {megabytes:6.0} MB of weights   {ms:8.1} ms  ({:.1} GB/s over the three passes)",
            3.0 * megabytes / ms
        );
        by_experts.push(ms);
    }
    println!(
        "   E = 64 against E = 4: +{:.1} ms per forward + backward pass, unless the GEMMs overlap it",
        by_experts[1] - by_experts[0]
    );
}

/// Part 6: the layer's dispatch (gather) and combine (weighted scatter-add), composed from
/// Burn's ops against moe-kernels' operations, forward + backward.
fn dispatch_and_combine(device: &Device, args: &Args) {
    const SLOTS: usize = 8 * 1059;
    let autodiff = device.clone().autodiff();
    println!(
        "\n6. dispatch [{TOKENS}, {D_MODEL}] -> [{SLOTS}, {D_MODEL}] and combine back, forward + backward"
    );
    let tokens = Tensor::<2>::random([TOKENS, D_MODEL], NORMAL, &autodiff);
    let token_of_slot = Tensor::<1, Int>::random(
        [SLOTS],
        Distribution::Uniform(0.0, TOKENS as f64),
        &autodiff,
    );
    let weight_of_slot = Tensor::<1>::random([SLOTS], Distribution::Uniform(0.0, 1.0), &autodiff);
    let composed_ms = median_ms(&autodiff, args.repeats, || {
        let x = tokens.clone().require_grad();
        let buffer = x.select(0, token_of_slot.clone());
        let weighted = buffer * weight_of_slot.clone().require_grad().unsqueeze_dim(1);
        let combined = Tensor::<2>::zeros([TOKENS, D_MODEL], &autodiff).select_assign(
            0,
            token_of_slot.clone(),
            weighted,
            IndexingUpdateOp::Add,
        );
        let _ = combined.mean().backward();
    });
    let fused_ms = median_ms(&autodiff, args.repeats, || {
        let x = tokens.clone().require_grad();
        let buffer = gather_rows(x, token_of_slot.clone());
        let combined = combine_rows(
            buffer,
            weight_of_slot.clone().require_grad(),
            token_of_slot.clone(),
            TOKENS,
        );
        let _ = combined.mean().backward();
    });
    println!("   select + select_assign (Burn's ops)      {composed_ms:8.1} ms");
    println!(
        "   gather_rows + combine_rows (moe-kernels) {fused_ms:8.1} ms  ({:.2}x)",
        composed_ms / fused_ms
    );
}

/// Part 7: the cores' peak rate of fused multiply-adds against the GEMM, round by round.
fn arithmetic_peak(device: &Device, args: &Args) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\n7. arithmetic peak (AVX-512 FMA loop on registers) against the GEMM [{TOKENS}, {D_MODEL}] x [{D_MODEL}, {D_HIDDEN}], alternating rounds"
    );
    if !fma::available() {
        println!("   not measured: needs x86-64 with AVX-512");
        return;
    }
    let a = Tensor::<2>::random([TOKENS, D_MODEL], NORMAL, device);
    let b = Tensor::<2>::random([D_MODEL, D_HIDDEN], NORMAL, device);
    let gemm_flops = 2.0 * (TOKENS * D_MODEL * D_HIDDEN) as f64;
    let gemm = || {
        let start = std::time::Instant::now();
        let product = burn_moe::kernels::matmul(a.clone(), b.clone());
        device.sync().expect("device sync");
        drop(product);
        gemm_flops / start.elapsed().as_secs_f64() / 1e9
    };
    // One unmeasured round, then `repeats` measured ones.
    let mut rounds = Vec::new();
    for round in 0..args.repeats.max(1) + 1 {
        let one = fma::gflops(1);
        let all = fma::gflops(threads);
        let product = gemm();
        if round > 0 {
            rounds.push([one, all, product, product / all]);
        }
    }
    let median = |column: usize| timing::median(rounds.iter().map(|round| round[column]).collect());
    let range = |column: usize, decimals: usize| {
        let values = rounds.iter().map(|round| round[column]);
        let low = values.clone().fold(f64::INFINITY, f64::min);
        let high = values.fold(0.0, f64::max);
        format!("{low:.decimals$} to {high:.decimals$}")
    };
    println!(
        "   FMA peak, 1 thread          {:8.1} GFLOP/s  (rounds: {})",
        median(0),
        range(0, 0)
    );
    println!(
        "   FMA peak, {threads} threads at once {:8.1} GFLOP/s  (rounds: {})",
        median(1),
        range(1, 0)
    );
    println!(
        "   GEMM, {threads} threads             {:8.1} GFLOP/s  (rounds: {})",
        median(2),
        range(2, 0)
    );
    println!(
        "   GEMM / peak, same round     {:8.2}       (rounds: {})",
        median(3),
        range(3, 2)
    );
}

/// A loop of fused multiply-adds on registers alone: the most arithmetic a core can do.
mod fma {
    /// Iterations of the loop per thread: 24 x 16 x 2 FLOPs each, about 0.2 s at 100 GFLOP/s.
    const ITERATIONS: usize = 25_000_000;
    /// Independent accumulators, enough to cover the FMA latency on two ports.
    const ACCUMULATORS: usize = 24;

    /// Whether this CPU runs the loop.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// GFLOP/s of `threads` threads each running the loop at the same time.
    pub fn gflops(threads: usize) -> f64 {
        let start = std::time::Instant::now();
        let sums: Vec<f32> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads).map(|_| scope.spawn(run)).collect();
            workers
                .into_iter()
                .map(|worker| worker.join().expect("FMA thread"))
                .collect()
        });
        std::hint::black_box(sums);
        let flops = (threads * ITERATIONS * ACCUMULATORS * 16 * 2) as f64;
        flops / start.elapsed().as_secs_f64() / 1e9
    }

    fn run() -> f32 {
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the CPU has AVX-512 (checked just above).
            return unsafe { loop_avx512() };
        }
        0.0
    }

    /// `acc = acc * a + b` on 24 vectors of 16 lanes, `ITERATIONS` times.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn loop_avx512() -> f32 {
        use std::arch::x86_64::*;
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-6));
        let mut accumulators = [_mm512_set1_ps(1.0); ACCUMULATORS];
        for _ in 0..ITERATIONS {
            for accumulator in accumulators.iter_mut() {
                *accumulator = _mm512_fmadd_ps(*accumulator, a, b);
            }
        }
        let mut total = _mm512_setzero_ps();
        for accumulator in accumulators {
            total = _mm512_add_ps(total, accumulator);
        }
        _mm512_reduce_add_ps(total)
    }
}

/// The sum of `values`, each thread summing one contiguous part (16 running sums each, so the
/// loop is bound by memory, not by the latency of one addition).
fn streamed_sum(values: &[f32], threads: usize) -> f64 {
    let part = values.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = values
            .chunks(part)
            .map(|chunk| {
                scope.spawn(move || {
                    let mut sums = [0.0f32; 16];
                    for block in chunk.chunks_exact(16) {
                        for (sum, &value) in sums.iter_mut().zip(block) {
                            *sum += value;
                        }
                    }
                    sums.iter().map(|&sum| sum as f64).sum::<f64>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("summing thread"))
            .sum()
    })
}

/// Writes `value` to every element of `values`, each thread one contiguous part.
fn streamed_fill(values: &mut [f32], value: f32, threads: usize) {
    let part = values.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for chunk in values.chunks_mut(part) {
            scope.spawn(move || chunk.fill(value));
        }
    });
}

/// The exact GELU written with Burn's tensor ops, `x (1 + erf(x / √2)) / 2`: what moe-core
/// used before `moe_kernels::gelu` (six autodiff nodes; flex runs `erf` through scalar libm).
fn composed_gelu(x: Tensor<2>) -> Tensor<2> {
    x.clone()
        .div_scalar(std::f64::consts::SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul(x)
        .mul_scalar(0.5)
}
