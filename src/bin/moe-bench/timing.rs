//! Timing: medians over repeated runs after warm-up, synchronised with the device.

use std::time::Instant;

use burn::tensor::Device;

/// Median seconds of `repeats` runs of `work` after `warmup` unmeasured runs. Each run ends
/// with a device synchronisation, so queued GPU work is counted.
pub fn median_seconds(
    device: &Device,
    warmup: usize,
    repeats: usize,
    mut work: impl FnMut(),
) -> f64 {
    for _ in 0..warmup {
        work();
        device.sync().expect("device sync");
    }
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            work();
            device.sync().expect("device sync");
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
