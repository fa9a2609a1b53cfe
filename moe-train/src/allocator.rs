//! Keeps freed tensor buffers in the process heap so the next op reuses them.
//!
//! CPU backends allocate a fresh buffer for nearly every op's output. glibc serves requests
//! above its mmap threshold (at most 32 MiB) with `mmap` and returns them with `munmap` on free,
//! so a tensor of `[4096, 2048]` f32 costs page faults and zeroing of fresh pages every time it
//! is allocated (`clear_page` and `exc_page_fault` are 5 % of a profile of the MoE layer on flex).
//! [`reuse_heap_memory`] turns off glibc's mmap for allocations and its trimming of the heap, so
//! freed buffers are reused instead. The cost: the process keeps its peak heap until it exits.
//! BENCHMARKS.md has the measurements.

/// Makes glibc serve allocations from the heap and keep freed memory for reuse
/// (`mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, 2^31 - 1)`). Returns whether the
/// allocator accepted both settings; does nothing and returns `false` on platforms without
/// glibc. Call it once at the start of a program, before large allocations. Threads other than
/// the main one still get blocks above 64 MiB (the size of glibc's per-thread heaps) mapped.
pub fn reuse_heap_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe { mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
