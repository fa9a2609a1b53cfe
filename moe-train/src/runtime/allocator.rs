//! Keeps freed tensor buffers in the process heap so the next op reuses them.
//!
//! CPU backends allocate a fresh buffer for nearly every op's output. glibc serves requests
//! above its mmap threshold (at most 32 MiB) with `mmap` and returns them with `munmap` on free,
//! so a tensor of `[4096, 2048]` f32 costs page faults and zeroing of fresh pages every time it
//! is allocated (`clear_page` and `exc_page_fault` are 5 % of a profile of the MoE layer on flex).
//! [`reuse_heap_memory`] turns off glibc's mmap for allocations and its trimming of the heap, so
//! freed buffers are reused instead, and keeps every thread on the main arena, so a buffer freed
//! by one thread is reused by the next operation on any other (by default each thread gets an
//! arena of its own, whose heaps are at most 64 MiB). The cost: the process keeps its peak heap
//! until it exits, and threads share one allocator lock. BENCHMARKS.md has the measurements.

/// Makes glibc serve allocations from the heap and keep freed memory for reuse
/// (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2^31 - 1)`), with every thread that
/// starts allocating afterwards on the main arena (`mallopt(M_ARENA_MAX, 1)`). Returns whether
/// the allocator accepted the settings; does nothing and returns `false` on platforms without
/// glibc. Call it once at the start of a program, before other threads start and before large
/// allocations: a thread that already has an arena of its own keeps it.
pub fn reuse_heap_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        const M_ARENA_MAX: i32 = -8;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            mallopt(M_MMAP_MAX, 0) == 1
                && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
                && mallopt(M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
