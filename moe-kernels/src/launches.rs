//! Watching what work does on the cube backends (wgpu): the kernels it launches, through
//! CubeCL's launch observer, and the reads it makes from the device to the host, through
//! wgpu-core's log of buffers mapped for reading.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cubecl::logging::{LaunchObservation, LaunchObserver};

/// Kernel launches by kernel name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchCount {
    /// Launches of each kernel, by the name the kernel gives itself.
    pub by_kernel: BTreeMap<String, usize>,
}

impl LaunchCount {
    /// Launches in all.
    pub fn total(&self) -> usize {
        self.by_kernel.values().sum()
    }
}

#[derive(Default)]
struct Counter(Mutex<BTreeMap<&'static str, usize>>);

impl LaunchObserver for Counter {
    fn launched(&self, kernel: &'static str) {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *counts.entry(kernel).or_default() += 1;
    }
}

/// Runs `work` and counts the kernels launched on any cube device, by any thread, until it
/// returns. Burn's fusion backend launches lazily: end `work` with a device sync so that what
/// it queued is counted. One observation at a time per process (a second one started meanwhile
/// replaces this one).
pub fn count_launches<R>(work: impl FnOnce() -> R) -> (R, LaunchCount) {
    let counter = Arc::new(Counter::default());
    let observation = LaunchObservation::new(counter.clone());
    let result = work();
    drop(observation);
    let counts = counter
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .map(|(&name, &count)| (name.to_string(), count))
        .collect();
    (result, LaunchCount { by_kernel: counts })
}

/// Buffers mapped for reading since [`install_host_read_counter`].
static HOST_READS: AtomicUsize = AtomicUsize::new(0);

/// Counts wgpu-core's `Buffer::map_async` log records that map for reading: every read from a
/// wgpu device to the host maps a buffer so, whoever asks for it (Burn, CubeCL, us).
struct HostReadCounter;

impl log::Log for HostReadCounter {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target().starts_with("wgpu_core")
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        if message.starts_with("Buffer::map_async") && message.contains("Read") {
            HOST_READS.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn flush(&self) {}
}

/// Makes this process count its reads from wgpu devices to the host ([`host_reads`]), by
/// installing a `log` logger that sees wgpu-core's trace records (and nothing else). A process
/// has one logger: this fails, saying so, if another is installed.
pub fn install_host_read_counter() -> Result<(), String> {
    log::set_logger(&HostReadCounter)
        .map_err(|_| "another logger is installed in this process".to_string())?;
    log::set_max_level(log::LevelFilter::Trace);
    Ok(())
}

/// Reads from wgpu devices to the host since [`install_host_read_counter`] (0 without it).
pub fn host_reads() -> usize {
    HOST_READS.load(Ordering::SeqCst)
}
