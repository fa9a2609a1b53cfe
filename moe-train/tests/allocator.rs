//! `reuse_heap_memory` makes glibc serve a large buffer from the heap instead of `mmap`, read
//! from glibc's own statistics (`mallinfo2().hblkhd`: bytes in mmapped blocks). Its own test
//! binary, since the setting is process-wide.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use moe_train::runtime::allocator::reuse_heap_memory;

/// glibc's `struct mallinfo2` (<malloc.h>); only `hblkhd` is read.
#[repr(C)]
#[allow(dead_code)]
#[derive(Default)]
struct MallInfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

extern "C" {
    fn mallinfo2() -> MallInfo2;
}

/// Bytes glibc holds in mmapped blocks while a buffer of `bytes` is alive.
fn mmapped_while_holding(bytes: usize) -> usize {
    let buffer = std::hint::black_box(vec![1u8; bytes]);
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let mmapped = unsafe { mallinfo2() }.hblkhd;
    drop(buffer);
    mmapped
}

#[test]
fn large_buffers_come_from_the_heap_after_reuse_heap_memory() {
    // Above glibc's largest mmap threshold (32 MiB), below the size of its per-thread heaps
    // (64 MiB; this test runs in a thread of the test harness).
    let bytes = 40 << 20;
    assert!(
        mmapped_while_holding(bytes) >= bytes,
        "glibc mmaps a 40 MiB buffer by default"
    );
    assert!(reuse_heap_memory(), "glibc accepted the settings");
    assert!(
        mmapped_while_holding(bytes) < bytes,
        "the 40 MiB buffer is still mmapped after reuse_heap_memory"
    );
}
