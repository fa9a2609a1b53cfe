//! Timing: medians over repeated runs after warm-up, synchronised with the device.

use std::time::Instant;

use burn::tensor::Device;

/// Median seconds of `repeats` runs of `work` after `warmup` unmeasured runs. Each run ends
/// with a device synchronisation, so queued GPU work is counted.
pub fn median_seconds(device: &Device, warmup: usize, repeats: usize, work: impl FnMut()) -> f64 {
    let mut works: [Box<dyn FnMut() + '_>; 1] = [Box::new(work)];
    interleaved_median_seconds(device, warmup, repeats, &mut works)[0]
}

/// Median seconds of each of `works`, measured in rounds: every round runs each work once, in
/// turn, so that a slow spell of the machine falls on all of them alike and their ratios hold.
/// `warmup` unmeasured rounds come first; each run ends with a device synchronisation.
pub fn interleaved_median_seconds(
    device: &Device,
    warmup: usize,
    repeats: usize,
    works: &mut [Box<dyn FnMut() + '_>],
) -> Vec<f64> {
    let mut times = vec![Vec::new(); works.len()];
    for round in 0..warmup + repeats.max(1) {
        for (work, times) in works.iter_mut().zip(&mut times) {
            let start = Instant::now();
            work();
            device.sync().expect("device sync");
            if round >= warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
    }
    times.into_iter().map(median).collect()
}

/// The middle of `values` (the upper of the two middle ones for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
