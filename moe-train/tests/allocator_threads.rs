//! After `reuse_heap_memory`, a large buffer freed by another thread is reused by the main
//! thread's next one (the new block overlaps the freed one): all threads allocate from the main
//! arena. (By default a new thread gets an arena
//! of its own, and its buffers are never handed to the main thread.) Its own test binary
//! without the test harness, since the setting must come before any other thread allocates.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    assert!(
        moe_train::runtime::allocator::reuse_heap_memory(),
        "glibc accepted the settings"
    );
    let bytes = 40 << 20;
    let freed_by_worker = std::thread::spawn(move || {
        let buffer = std::hint::black_box(vec![1u8; bytes]);
        buffer.as_ptr() as usize
    })
    .join()
    .expect("the worker ran");
    let buffer = std::hint::black_box(vec![1u8; bytes]);
    let reused = buffer.as_ptr() as usize;
    assert!(
        reused.abs_diff(freed_by_worker) < bytes,
        "the main thread's block at {reused:#x} does not overlap the one the worker freed at {freed_by_worker:#x}"
    );
    println!("test a_buffer_freed_by_another_thread_is_reused ... ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {}
