//! `moe_kernels::rms_norm` on every CPU backend built in, in f32 and f64: the output and the
//! gradients of the input and the scale against loops on the host, for a few short rows, for
//! enough rows that flex splits them over several tasks (whose partial scale gradients are
//! summed), for a rank-3 and a transposed (strided) input, and against Burn's own `RmsNorm`.

use burn::module::Param;
use burn::nn::RmsNormConfig;
use burn::tensor::{Tensor, TensorData};
use moe_kernels::rms_norm;

mod common;
use common::{assert_close, devices_with_wgpu, dtypes, host, matrix, values};

const EPSILON: f64 = 1e-5;

/// `(y, grad_x, grad_γ)` for `x: [rows, n]` and the loss `sum(y * g)`, by loops, from the
/// definition: `y = γ x r`, `r = (mean(x²) + ε)^(-1/2)`, and the chain rule through `r`
/// (`∂r/∂x_k = -r³ x_k / n`).
fn reference(x: &[f64], gamma: &[f64], g: &[f64], n: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; x.len()];
    let mut grad_x = vec![0.0; x.len()];
    let mut grad_gamma = vec![0.0; n];
    for row in 0..x.len() / n {
        let x = &x[row * n..(row + 1) * n];
        let g = &g[row * n..(row + 1) * n];
        let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / n as f64 + EPSILON).sqrt();
        let weighted: f64 = (0..n).map(|j| g[j] * gamma[j] * x[j]).sum();
        for k in 0..n {
            y[row * n + k] = gamma[k] * x[k] * r;
            grad_x[row * n + k] = g[k] * gamma[k] * r - r * r * r * x[k] / n as f64 * weighted;
            grad_gamma[k] += g[k] * x[k] * r;
        }
    }
    (y, grad_x, grad_gamma)
}

/// `[rows, n]` on every backend and dtype, contiguous and transposed.
fn check([rows, n]: [usize; 2]) {
    let (x_values, g_values) = (values(rows * n, 5), values(rows * n, 3));
    let gamma_values: Vec<f64> = values(n, 7).iter().map(|v| v + 1.5).collect();
    let (y_ref, grad_x_ref, grad_gamma_ref) = reference(&x_values, &gamma_values, &g_values, n);
    for (backend, device) in devices_with_wgpu() {
        for (dtype, tolerance) in dtypes(&device) {
            for transposed in [false, true] {
                let what = format!("{backend} {dtype:?} [{rows}, {n}] transposed={transposed}");
                let x = matrix(&x_values, [rows, n], transposed, dtype, &device).require_grad();
                let gamma =
                    Tensor::<1>::from_data(TensorData::new(gamma_values.clone(), [n]), &device)
                        .cast(dtype)
                        .require_grad();
                let g = matrix(&g_values, [rows, n], false, dtype, &device);
                let y = rms_norm(x.clone(), gamma.clone(), EPSILON);
                let grads = (y.clone() * g).sum().backward();
                // f32 holds `r` to about 1e-7 relative, and the sums over rows add up more.
                let tolerance = tolerance * 10.0;
                assert_close(&format!("{what} y"), &host(y), &y_ref, tolerance);
                let grad_x = host(x.grad(&grads).expect("x has a gradient"));
                assert_close(&format!("{what} grad_x"), &grad_x, &grad_x_ref, tolerance);
                let grad_gamma = host(gamma.grad(&grads).expect("gamma has a gradient"));
                let sum_tolerance = tolerance * rows as f64;
                assert_close(
                    &format!("{what} grad_gamma"),
                    &grad_gamma,
                    &grad_gamma_ref,
                    sum_tolerance,
                );
            }
        }
    }
}

#[test]
fn short_rows_match_the_loops() {
    check([3, 5]);
    check([1, 1]);
    check([4, 37]);
    // Longer than a cube on wgpu (256 units): each unit sums several elements.
    check([3, 1000]);
}

#[test]
fn rows_split_over_several_tasks_match_the_loops() {
    // 300 rows of 256: about 77 K elements, three of flex's 32 K-element tasks.
    check([300, 256]);
}

#[test]
fn leading_dimensions_are_rows_and_burns_rms_norm_agrees() {
    let [batch, length, n] = [2, 3, 8];
    let gamma_values: Vec<f64> = values(n, 7).iter().map(|v| v + 1.5).collect();
    let x_values = values(batch * length * n, 5);
    let (y_ref, _, _) = reference(&x_values, &gamma_values, &vec![0.0; x_values.len()], n);
    for (backend, device) in devices_with_wgpu() {
        let x = Tensor::<3>::from_data(
            TensorData::new(x_values.clone(), [batch, length, n]),
            &device,
        );
        let gamma = Tensor::<1>::from_data(TensorData::new(gamma_values.clone(), [n]), &device);
        let got = host(rms_norm(x.clone(), gamma.clone(), EPSILON));
        assert_close(&format!("{backend} rank 3"), &got, &y_ref, 1e-5);
        let mut burns = RmsNormConfig::new(n).with_epsilon(EPSILON).init(&device);
        burns.gamma = Param::from_tensor(gamma);
        assert_close(
            &format!("{backend} against RmsNorm"),
            &got,
            &host(burns.forward(x)),
            1e-5,
        );
    }
}
