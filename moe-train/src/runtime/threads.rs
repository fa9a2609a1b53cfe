//! Runs a program's tensor work on one of the compute threads instead of beside them.
//!
//! On the CPU, flex's GEMM and `moe-kernels`' flex kernels split each large operation over
//! rayon's threads. Called from a thread outside the pool (a program's main thread), every such
//! operation is injected into the pool: a sleeping worker is woken through a futex, the caller
//! blocks until the operation is done and is woken in turn, and between operations the idle
//! workers spin beside the caller's single-threaded work. A training step of the `tiny` preset
//! runs hundreds of these; `perf` on a 2-core VM put 13 % of its samples in the kernel's
//! `futex_wake`. Run from a pool thread, the same operations are rayon `join`s: the calling
//! thread does its share, the other threads steal the rest, and nobody sleeps while work keeps
//! coming. [`run_on_compute_threads`] does that for a whole program; BENCHMARKS.md has the
//! figures.
//!
//! Pair it with [`reuse_heap_memory`](crate::runtime::allocator::reuse_heap_memory), which keeps
//! every thread on one allocator arena: the buffers the worker frees are the ones the next
//! operation reuses.

/// Stack of each compute thread: the size of a Linux main thread's default stack, which the
/// work on this thread is written for (Rust's default for spawned threads is 2 MiB).
pub const STACK_BYTES: usize = 8 << 20;

/// Runs `work` on a thread of a new rayon pool of one thread per core (`RAYON_NUM_THREADS`
/// overrides it), so that the parallel operations it calls split over that pool from inside
/// it, and returns what `work` returns. The calling thread waits, asleep. A panic in `work` is
/// resumed on the calling thread. Runs `work` on the calling thread when the pool cannot be
/// built (threads cannot be spawned).
pub fn run_on_compute_threads<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    // rayon's default size: `RAYON_NUM_THREADS`, or one thread per core.
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(STACK_BYTES)
        .thread_name(|i| format!("compute-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
    }
}
