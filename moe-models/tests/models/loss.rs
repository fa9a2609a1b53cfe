//! `masked_cross_entropy` against a loop over positions: the mean of `ln Σ e^x - x[t]` over
//! the counted positions, and its gradient `(softmax - one_hot) / count` at those positions
//! and zero elsewhere; on the CPU backends built in.

use burn::tensor::{Bool, Device, Tensor, TensorData};
use moe_models::masked_cross_entropy;

use crate::common::{tokens, values};

#[allow(deprecated)] // `Device::ndarray`: deprecated in Burn 0.22, still a backend we serve
fn devices() -> Vec<Device> {
    vec![
        Device::ndarray().autodiff(),
        #[cfg(feature = "flex")]
        Device::flex().autodiff(),
    ]
}

/// `(loss, grad)` by loops in f64.
fn reference(x: &[f64], targets: &[usize], mask: &[bool], vocab: usize) -> (f64, Vec<f64>) {
    let count = mask.iter().filter(|&&m| m).count().max(1) as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0; x.len()];
    for (position, (&target, &counted)) in targets.iter().zip(mask).enumerate() {
        if !counted {
            continue;
        }
        let row = &x[position * vocab..(position + 1) * vocab];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        loss += (lse - row[target]) / count;
        for (class, value) in row.iter().enumerate() {
            let indicator = if class == target { 1.0 } else { 0.0 };
            grad[position * vocab + class] = ((value - lse).exp() - indicator) / count;
        }
    }
    (loss, grad)
}

fn check(device: &Device, mask: &[bool]) {
    let (batch, length, vocab) = (2, 3, 11);
    let x: Vec<f64> = (0..batch * length * vocab)
        .map(|i| ((i * 29 + 5) % 41) as f64 / 8.0 - 2.5)
        .collect();
    let targets = [4, 0, 10, 7, 7, 2];
    let (loss_ref, grad_ref) = reference(&x, &targets, mask, vocab);
    let logits = Tensor::<3>::from_data(
        TensorData::new(
            x.iter().map(|&v| v as f32).collect(),
            [batch, length, vocab],
        ),
        device,
    )
    .require_grad();
    let mask_tensor =
        Tensor::<2, Bool>::from_data(TensorData::new(mask.to_vec(), [batch, length]), device);
    let loss = masked_cross_entropy(logits.clone(), tokens(&targets, batch, device), mask_tensor);
    let grads = loss.clone().backward();
    let got = values(loss)[0];
    assert!(
        (got - loss_ref).abs() < 1e-5,
        "{device:?} {mask:?}: loss {got}, expected {loss_ref}"
    );
    let grad = values(logits.grad(&grads).expect("the logits have a gradient"));
    for (i, (g, e)) in grad.iter().zip(&grad_ref).enumerate() {
        assert!(
            (g - e).abs() < 1e-6,
            "{device:?} {mask:?}: grad[{i}] {g}, expected {e}"
        );
    }
}

#[test]
fn the_masked_mean_matches_the_loop() {
    for device in devices() {
        check(&device, &[true, true, false, true, false, true]);
        check(&device, &[true; 6]);
    }
}

#[test]
fn no_counted_position_gives_zero_and_no_gradient() {
    for device in devices() {
        check(&device, &[false; 6]);
    }
}
