//! `moe_kernels::cross_entropy` on every CPU backend built in, in f32 and f64, against a host
//! loop in f64: the loss of each row and the gradient of the logits for an upstream gradient,
//! for one class, odd, vector-sized and very long rows (several flex tasks), rows with `-inf`
//! logits, and targets at both ends of the row; and a clear panic for a target out of range.

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use moe_kernels::cross_entropy;

mod common;
use common::{assert_close, devices, host};

const DTYPES: [(FloatDType, f64); 2] = [(FloatDType::F32, 2e-6), (FloatDType::F64, 1e-13)];

/// Logits in about [-12, 12], every seventh of them `-inf` when `masked` (never a target).
fn logits(rows: usize, classes: usize, targets: &[usize], masked: bool) -> Vec<f64> {
    (0..rows * classes)
        .map(|i| {
            let (row, class) = (i / classes, i % classes);
            if masked && class != targets[row] && (i * 3 + 1).is_multiple_of(7) {
                f64::NEG_INFINITY
            } else {
                ((i * 37 + 11) % 97) as f64 / 4.0 - 12.0
            }
        })
        .collect()
}

/// The loss of each row and the gradient of the logits for the upstream `g`, by loops in
/// f64: `loss = ln Σ e^x - x[t]`, `grad = g (e^{x - ln Σ e^x} - [j = t])`.
fn reference(x: &[f64], targets: &[usize], g: &[f64], classes: usize) -> (Vec<f64>, Vec<f64>) {
    let mut loss = Vec::new();
    let mut grad = vec![0.0; x.len()];
    for (row, &target) in targets.iter().enumerate() {
        let values = &x[row * classes..(row + 1) * classes];
        let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        loss.push(lse - values[target]);
        for (class, value) in values.iter().enumerate() {
            let indicator = if class == target { 1.0 } else { 0.0 };
            grad[row * classes + class] = g[row] * ((value - lse).exp() - indicator);
        }
    }
    (loss, grad)
}

fn run(
    device: &Device,
    dtype: FloatDType,
    x: &[f64],
    targets: &[usize],
    g: &[f64],
    classes: usize,
) -> (Vec<f64>, Vec<f64>) {
    let rows = targets.len();
    let input = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [rows, classes]), device)
        .cast(dtype)
        .require_grad();
    let targets: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [rows]), device);
    let g = Tensor::<1>::from_data(TensorData::new(g.to_vec(), [rows]), device).cast(dtype);
    let loss = cross_entropy(input.clone(), targets);
    let grads = (loss.clone() * g).sum().backward();
    let grad = host(input.grad(&grads).expect("the logits have a gradient"));
    (host(loss), grad)
}

#[test]
fn losses_and_gradients_match_the_loop() {
    // 1 class, odd, one vector plus a tail, a vocabulary, longer than flex's task (2^15).
    for (rows, classes) in [(3, 1), (5, 7), (6, 17), (9, 4500), (2, 40_000)] {
        // The first and the last class among the targets.
        let targets: Vec<usize> = (0..rows)
            .map(|row| match row % 3 {
                0 => 0,
                1 => classes - 1,
                _ => (row * 5) % classes,
            })
            .collect();
        let g: Vec<f64> = (0..rows).map(|row| 0.25 + row as f64 / 8.0).collect();
        for masked in [false, true] {
            let x = logits(rows, classes, &targets, masked);
            let (loss_ref, grad_ref) = reference(&x, &targets, &g, classes);
            for (backend, device) in devices() {
                for (dtype, tolerance) in DTYPES {
                    let what = format!("{backend} {dtype:?} {rows}x{classes} masked={masked}");
                    let (loss, grad) = run(&device, dtype, &x, &targets, &g, classes);
                    assert_close(&format!("{what} loss"), &loss, &loss_ref, tolerance);
                    assert_close(&format!("{what} grad"), &grad, &grad_ref, tolerance);
                }
            }
        }
    }
}

#[test]
fn a_rows_loss_is_its_mean_when_averaged() {
    // The mean over rows, differentiated, gives each row 1/rows of its gradient: the same
    // loop with g = 1/rows.
    let (rows, classes) = (4, 10);
    let targets = [3, 0, 9, 5];
    let x = logits(rows, classes, &targets, false);
    let g = vec![1.0 / rows as f64; rows];
    let (loss_ref, grad_ref) = reference(&x, &targets, &g, classes);
    let mean_ref = loss_ref.iter().sum::<f64>() / rows as f64;
    for (backend, device) in devices() {
        let input = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, classes]), &device)
            .require_grad();
        let t = Tensor::<1, Int>::from_data(
            TensorData::new(targets.map(|t| t as i64).to_vec(), [rows]),
            &device,
        );
        let mean = cross_entropy(input.clone(), t).mean();
        let grads = mean.clone().backward();
        assert_close(&format!("{backend} mean"), &host(mean), &[mean_ref], 2e-6);
        let grad = host(input.grad(&grads).unwrap());
        assert_close(&format!("{backend} grad"), &grad, &grad_ref, 2e-6);
    }
}

#[cfg(feature = "flex")]
#[test]
#[should_panic(expected = "target class 10 is out of range for 10 classes")]
fn a_target_out_of_range_is_named() {
    let device = Device::flex();
    let x = Tensor::<2>::zeros([2, 10], &device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 10], [2]), &device);
    let _ = cross_entropy(x, targets);
}
