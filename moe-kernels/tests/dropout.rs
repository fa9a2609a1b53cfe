//! `moe_kernels::dropout` on every CPU backend built in, in f32 and f64: every output is the
//! input scaled by exactly `1 / (1 - p)` or zero, the kept fraction is `1 - p` within five
//! standard deviations overall and in every slice of the positions, the gradient is the mask,
//! and `device.seed` makes the mask reproducible.
//!
//! Burn's CPU backends keep one random generator per process, and the test harness runs the
//! tests of this file in parallel threads: the tests that seed it and draw from it take a lock,
//! or one test's draws would land between another's seed and its mask.

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use moe_kernels::dropout;

mod common;
use common::devices;

/// Holds the process's random stream for one test at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// More elements than one of flex's parallel chunks (2^15), in a shape with several rows.
const ROWS: usize = 64;
const COLS: usize = 3000;

/// Nonzero inputs, so that `y / x` recovers the mask.
fn inputs() -> Vec<f64> {
    (0..ROWS * COLS)
        .map(|i| 1.0 + (i % 7) as f64 / 4.0)
        .collect()
}

fn tensor(values: &[f64], dtype: FloatDType, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(values.to_vec(), [ROWS, COLS]), device).cast(dtype)
}

fn host(t: Tensor<2>) -> Vec<f64> {
    t.try_into_vec_as::<f64>().unwrap()
}

/// Asserts that `kept` of `total` draws is within five standard deviations of `1 - prob`.
fn assert_fraction(what: &str, kept: usize, total: usize, prob: f64) {
    let expected = total as f64 * (1.0 - prob);
    let deviation = (total as f64 * prob * (1.0 - prob)).sqrt();
    assert!(
        (kept as f64 - expected).abs() < 5.0 * deviation,
        "{what}: kept {kept} of {total}, expected {expected:.0} +- {deviation:.0}"
    );
}

#[test]
fn keeps_one_minus_p_scaled_and_the_gradient_is_the_mask() {
    let _serial = serial();
    let x_values = inputs();
    let upstream: Vec<f64> = (0..ROWS * COLS).map(|i| (i % 5) as f64 - 2.0).collect();
    for (backend, device) in devices() {
        for (dtype, tolerance) in [(FloatDType::F32, 1e-6), (FloatDType::F64, 1e-14)] {
            for prob in [0.1, 0.5] {
                let what = format!("{backend} {dtype:?} p={prob}");
                device.seed(11);
                let x = tensor(&x_values, dtype, &device).require_grad();
                let y = dropout(x.clone(), prob);
                let grads = (y.clone() * tensor(&upstream, dtype, &device))
                    .sum()
                    .backward();
                let y = host(y);
                let gradient = host(x.grad(&grads).expect("x has a gradient"));
                let scale = 1.0 / (1.0 - prob);
                let mut kept = vec![false; y.len()];
                for i in 0..y.len() {
                    let mask = y[i] / x_values[i];
                    kept[i] = mask != 0.0;
                    let expected = if kept[i] { scale } else { 0.0 };
                    assert!(
                        (mask - expected).abs() <= tolerance * scale,
                        "{what}: y[{i}] / x[{i}] = {mask}, expected 0 or {scale}"
                    );
                    assert!(
                        (gradient[i] - upstream[i] * expected).abs() <= tolerance * scale * 2.0,
                        "{what}: gradient[{i}] = {}, expected {}",
                        gradient[i],
                        upstream[i] * expected
                    );
                }
                let count = |select: &dyn Fn(usize) -> bool| {
                    let picked: Vec<usize> = (0..kept.len()).filter(|&i| select(i)).collect();
                    (picked.iter().filter(|&&i| kept[i]).count(), picked.len())
                };
                let slices: [(&str, &dyn Fn(usize) -> bool); 5] = [
                    ("all", &|_| true),
                    ("even positions", &|i| i % 2 == 0),
                    ("odd positions", &|i| i % 2 == 1),
                    ("first column", &|i| i % COLS == 0),
                    ("last rows", &|i| i >= (ROWS - 4) * COLS),
                ];
                for (slice, select) in slices {
                    let (kept, total) = count(select);
                    assert_fraction(&format!("{what} {slice}"), kept, total, prob);
                }
                // Positions apart by one, by a row and by powers of two up to twice flex's
                // parallel chunk are independent: both kept as often as (1 - p)^2 predicts.
                for distance in [1, COLS, 1 << 12, 1 << 15, 1 << 16] {
                    let both = (distance..kept.len())
                        .filter(|&i| kept[i] && kept[i - distance])
                        .count();
                    let pairs = kept.len() - distance;
                    let keep_both = (1.0 - prob) * (1.0 - prob);
                    let what = format!("{what} pairs {distance} apart");
                    assert_fraction(&what, both, pairs, 1.0 - keep_both);
                }
            }
        }
    }
}

#[test]
fn the_device_seed_fixes_the_mask() {
    let _serial = serial();
    let x_values = inputs();
    for (backend, device) in devices() {
        let mask = |seed: u64| {
            device.seed(seed);
            host(dropout(tensor(&x_values, FloatDType::F32, &device), 0.5))
        };
        let first = mask(3);
        assert_eq!(first, mask(3), "{backend}: same seed, same mask");
        let other = mask(4);
        let differing = first.iter().zip(&other).filter(|(a, b)| a != b).count();
        // Two independent masks with p = 1/2 differ in half the places.
        assert_fraction(
            &format!("{backend}: masks of seeds 3 and 4 differ"),
            differing,
            first.len(),
            0.5,
        );
        // Two draws in a row differ too: the key advances with Burn's random stream.
        device.seed(3);
        let once = host(dropout(tensor(&x_values, FloatDType::F32, &device), 0.5));
        let twice = host(dropout(tensor(&x_values, FloatDType::F32, &device), 0.5));
        assert_ne!(once, twice, "{backend}: consecutive masks");
    }
}

#[test]
fn zero_probability_is_the_identity() {
    for (backend, device) in devices() {
        let x = tensor(&inputs(), FloatDType::F32, &device);
        assert_eq!(host(dropout(x.clone(), 0.0)), host(x), "{backend}");
    }
}

#[test]
#[should_panic(expected = "dropout: the probability must be in [0, 1), got 1")]
fn probability_one_is_refused() {
    let (_, device) = devices().remove(0);
    let _ = dropout(tensor(&inputs(), FloatDType::F32, &device), 1.0);
}
