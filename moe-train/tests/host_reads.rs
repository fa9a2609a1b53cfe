//! A training step on wgpu reads nothing back to the host unless it is logged, evaluated or
//! saved.
//!
//! Every read from a wgpu device to the host maps a buffer for reading, and wgpu-core logs each
//! `Buffer::map_async` call (at trace level, through the `log` crate): the counter this test
//! installs (`moe_kernels::launches`) counts the ones that map for reading, so it sees the
//! reads Burn and CubeCL make as well as ours. It trains a tiny MoE model (dropless and capacity-limited layers) for 9 steps, logging
//! every 3rd, and checks the reads between the steps: none on the steps that do not log (after
//! the warm-up before the first logged step, where kernels are compiled and tuned), some on
//! those that do.
//!
//! Its own process (`harness = false`): a logger is set once per process.

#![cfg_attr(not(feature = "wgpu"), allow(dead_code, unused_imports))]

use std::sync::{Arc, Mutex};

#[cfg(feature = "wgpu")]
use moe_kernels::launches::{host_reads, install_host_read_counter};
use moe_train::runtime::backend::{select, BackendChoice, Precision};
use moe_train::training::{train, RunOptions, StepHook};

#[path = "train/common.rs"]
mod common;

const STEPS: usize = 9;
const LOG_EVERY: usize = 3;

#[cfg(not(feature = "wgpu"))]
fn main() {
    println!("host reads on wgpu: SKIPPED: built without the wgpu feature");
}

#[cfg(feature = "wgpu")]
fn main() {
    let require_wgpu = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    if let Err(error) = select(BackendChoice::Wgpu, Precision::F32) {
        println!("host reads on wgpu: SKIPPED: {error}");
        if require_wgpu {
            println!("BURN_MOE_REQUIRE_WGPU=1: a missing wgpu device is a failure");
            std::process::exit(1);
        }
        return;
    }
    install_host_read_counter().expect("the only logger of this process");

    let mut failures = 0;
    for dropless in [true, false] {
        let reads = reads_per_step(dropless);
        let layout = if dropless {
            "dropless"
        } else {
            "capacity 1.25"
        };
        println!("{layout}: host reads after each step: {reads:?}");
        for (step, &count) in reads.iter().enumerate().map(|(i, c)| (i + 1, c)) {
            let logged = step % LOG_EVERY == 0 || step == STEPS;
            // Until the first logged step, fusion may run (and autotune, which reads its
            // timings back) whenever its queue fills: those steps are the warm-up.
            let warm_up = step < LOG_EVERY;
            let ok = if logged {
                count > 0
            } else {
                warm_up || count == 0
            };
            if !ok {
                println!(
                    "FAILED: {layout}, step {step} ({}) made {count} host reads",
                    if logged { "logged" } else { "not logged" }
                );
                failures += 1;
            }
        }
    }
    if failures > 0 {
        std::process::exit(1);
    }
    println!("host reads on wgpu: ok");
}

/// Trains the tiny model on wgpu and returns the host reads each step made.
#[cfg(feature = "wgpu")]
fn reads_per_step(dropless: bool) -> Vec<usize> {
    let dir = common::temp_dir(if dropless {
        "reads-dropless"
    } else {
        "reads-capacity"
    });
    let corpus = dir.join("corpus.txt");
    common::write_generated_corpus(&corpus);
    let mut config = common::tiny_config(corpus, STEPS);
    config.run.backend = BackendChoice::Wgpu;
    config.run.log_every = LOG_EVERY;
    config.model.moe.capacity.dropless = dropless;

    let boundaries = Arc::new(Mutex::new(Vec::new()));
    let record = boundaries.clone();
    let start = host_reads();
    let options = RunOptions {
        on_step: Some(StepHook(Arc::new(move |_step| {
            record.lock().unwrap().push(host_reads());
        }))),
        ..RunOptions::new(dir.join("run"))
    };
    train(config, options).expect("the run trains");
    let boundaries = boundaries.lock().unwrap().clone();
    std::iter::once(start)
        .chain(boundaries.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .collect()
}
