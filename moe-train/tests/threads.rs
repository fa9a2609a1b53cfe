//! `run_on_compute_threads` moves the work onto a thread of a rayon pool with one thread per
//! core and a main thread's stack, and hands back its result or its panic.

use moe_train::runtime::threads::{run_on_compute_threads, STACK_BYTES};

#[test]
fn work_runs_on_a_pool_thread_with_one_thread_per_core() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let outside = rayon::current_thread_index();
    let (index, threads, name) = run_on_compute_threads(|| {
        (
            rayon::current_thread_index(),
            rayon::current_num_threads(),
            std::thread::current().name().map(String::from),
        )
    });
    assert_eq!(outside, None, "the test thread is not a pool thread");
    assert!(index.is_some(), "the work ran outside any rayon pool");
    let expected = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(cores);
    assert_eq!(threads, expected, "threads in the pool");
    let name = name.unwrap_or_default();
    assert!(name.starts_with("compute-"), "thread name {name:?}");
}

/// Uses about `depth * 64 KiB` of stack.
#[inline(never)]
fn deep(depth: usize) -> u64 {
    let frame = std::hint::black_box([depth as u8; 64 << 10]);
    let here = frame.iter().map(|&b| b as u64).sum::<u64>();
    if depth == 0 {
        here
    } else {
        here + deep(depth - 1)
    }
}

#[test]
fn work_gets_a_main_threads_stack() {
    // 6 MiB of frames: overflows the 2 MiB that Rust gives a spawned thread (and a test's
    // thread) by default, which would abort this test binary.
    let depth = (6 << 20) / (64 << 10);
    assert!(depth * (64 << 10) < STACK_BYTES);
    let sum = run_on_compute_threads(|| deep(depth));
    let expected: u64 = (0..=depth as u64).map(|d| d * (64 << 10)).sum();
    assert_eq!(sum, expected);
}

#[test]
fn a_panic_in_the_work_reaches_the_caller() {
    let caught = std::panic::catch_unwind(|| {
        run_on_compute_threads(|| -> u32 { panic!("the work failed") })
    });
    let payload = caught.expect_err("the panic was swallowed");
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .unwrap_or_default();
    assert_eq!(message, "the work failed");
}
