//! `moe_kernels::adamw_update` on every CPU backend built in against the AdamW formula in f64:
//! the first step (no moments) and a later one, on a parameter large enough for several flex
//! tasks (2^15 elements each), and the moments it returns.

use burn::tensor::{Tensor, TensorData};
use moe_kernels::{adamw_update, AdamWStep};

mod common;
use common::{assert_close, devices, host};

/// `(θ, m, v)` after one step of the formula, element by element in f64.
fn reference(
    theta: &[f64],
    g: &[f64],
    m: &[f64],
    v: &[f64],
    step: AdamWStep,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b1, b2) = (step.beta_1 as f64, step.beta_2 as f64);
    let t = step.time as i32;
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..theta.len() {
        let m = b1 * m[i] + (1.0 - b1) * g[i];
        let v = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let delta =
            (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + step.epsilon as f64);
        out.0
            .push(theta[i] * (1.0 - step.lr * step.weight_decay as f64) - step.lr * delta);
        out.1.push(m);
        out.2.push(v);
    }
    out
}

fn values(len: usize, seed: usize, offset: f64) -> Vec<f64> {
    (0..len)
        .map(|i| ((i * seed + 7) % 101) as f64 / 50.0 - 1.0 + offset)
        .collect()
}

#[test]
fn first_and_later_steps_match_the_formula() {
    let shape = [3, 40_000];
    let len = shape[0] * shape[1];
    let theta = values(len, 13, 0.0);
    let g = values(len, 29, 0.01);
    // Second moments are never negative.
    let (m, v) = (
        values(len, 7, 0.0),
        values(len, 11, 1.0)
            .iter()
            .map(|x| x * x)
            .collect::<Vec<_>>(),
    );
    let zeros = vec![0.0; len];
    for (backend, device) in devices() {
        let tensor = |values: &[f64]| {
            Tensor::<2>::from_data(
                TensorData::new(values.iter().map(|&x| x as f32).collect(), shape),
                &device,
            )
        };
        let first = AdamWStep {
            lr: 0.003,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 0.1,
            time: 1,
        };
        let later = AdamWStep {
            time: 7,
            lr: 0.02,
            ..first
        };
        for (step, moments, (m_ref, v_ref)) in [
            (first, None, (&zeros, &zeros)),
            (later, Some((tensor(&m), tensor(&v))), (&m, &v)),
        ] {
            let (expected_theta, expected_m, expected_v) =
                reference(&theta, &g, m_ref, v_ref, step);
            let (new_theta, new_m, new_v) = adamw_update(tensor(&theta), tensor(&g), moments, step);
            let what = format!("{backend} step {}", step.time);
            assert_close(
                &format!("{what} θ"),
                &host(new_theta),
                &expected_theta,
                1e-5,
            );
            assert_close(&format!("{what} m"), &host(new_m), &expected_m, 1e-6);
            assert_close(&format!("{what} v"), &host(new_v), &expected_v, 1e-6);
        }
    }
}
