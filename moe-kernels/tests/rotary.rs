//! `moe_kernels::rotary` on every CPU backend built in, in f32 and f64: the output and the
//! gradient against loops on the host that turn each pair by its angle, for one row per task
//! and for enough rows that flex splits them over several tasks, a transposed (strided) input,
//! and against Burn's own `RotaryEncoding` on the angles it computes.

use burn::nn::RotaryEncodingConfig;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use moe_kernels::rotary;

mod common;
use common::{assert_close, devices_with_wgpu, dtypes, host, values};

/// The angle of pair `i` at position `p`: `p / 10000^(2i / d)`, as RoFormer sets them.
fn angle(p: usize, i: usize, d: usize) -> f64 {
    p as f64 / 10_000f64.powf(2.0 * i as f64 / d as f64)
}

/// `(cos, sin)` tables, `[positions, d / 2]` each, on the host.
fn tables(positions: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let angles: Vec<f64> = (0..positions)
        .flat_map(|p| (0..d / 2).map(move |i| angle(p, i, d)))
        .collect();
    (
        angles.iter().map(|a| a.cos()).collect(),
        angles.iter().map(|a| a.sin()).collect(),
    )
}

/// `(y, grad_x)` for `x: [rows, positions, d]` whose rows hold `heads` heads side by side and
/// the loss `sum(y * g)`, by loops: the pair `(a, b)` at position `p`, pair `i` of its head,
/// turns by `+θ` forwards; its gradient turns `g`'s pair by `-θ`.
fn reference(
    x: &[f64],
    g: &[f64],
    positions: usize,
    d: usize,
    heads: usize,
) -> (Vec<f64>, Vec<f64>) {
    let head = d / heads;
    let mut y = vec![0.0; x.len()];
    let mut grad = vec![0.0; x.len()];
    for row in 0..x.len() / d {
        let p = row % positions;
        for i in 0..d / 2 {
            let a = angle(p, i % (head / 2), head);
            let (c, s) = (a.cos(), a.sin());
            let (j, k) = (row * d + 2 * i, row * d + 2 * i + 1);
            y[j] = x[j] * c - x[k] * s;
            y[k] = x[j] * s + x[k] * c;
            grad[j] = g[j] * c + g[k] * s;
            grad[k] = -g[j] * s + g[k] * c;
        }
    }
    (y, grad)
}

/// `[batch, positions, d]` on every backend and dtype, contiguous and as a transposed view,
/// rows of `heads` heads rotated by one head's tables.
fn check([batch, positions, d]: [usize; 3], heads: usize) {
    let len = batch * positions * d;
    let (x_values, g_values) = (values(len, 5), values(len, 3));
    let (y_ref, grad_ref) = reference(&x_values, &g_values, positions, d, heads);
    let (cos, sin) = tables(positions, d / heads);
    for (backend, device) in devices_with_wgpu() {
        for (dtype, tolerance) in dtypes(&device) {
            for transposed in [false, true] {
                let what = format!(
                    "{backend} {dtype:?} [{batch}, {positions}, {d}] heads={heads} \
                     transposed={transposed}"
                );
                let x = if transposed {
                    // Stored as [positions, batch, d], viewed as [batch, positions, d].
                    let mut stored = vec![0.0; len];
                    for b in 0..batch {
                        for p in 0..positions {
                            let from = (b * positions + p) * d;
                            let to = (p * batch + b) * d;
                            stored[to..to + d].copy_from_slice(&x_values[from..from + d]);
                        }
                    }
                    Tensor::<3>::from_data(TensorData::new(stored, [positions, batch, d]), &device)
                        .cast(dtype)
                        .swap_dims(0, 1)
                } else {
                    Tensor::<3>::from_data(
                        TensorData::new(x_values.clone(), [batch, positions, d]),
                        &device,
                    )
                    .cast(dtype)
                }
                .require_grad();
                // Created in `dtype` directly: through f32, f64's tables would lose digits.
                let table = |v: &[f64]| {
                    Tensor::<2>::from_data(
                        TensorData::new(v.to_vec(), [positions, d / heads / 2]),
                        (&device, DType::from(dtype)),
                    )
                };
                let g = Tensor::<3>::from_data(
                    TensorData::new(g_values.clone(), [batch, positions, d]),
                    &device,
                )
                .cast(dtype);
                let y = rotary(x.clone(), table(&cos), table(&sin));
                let grads = (y.clone() * g).sum().backward();
                assert_close(&format!("{what} y"), &host(y), &y_ref, tolerance);
                let grad = host(x.grad(&grads).expect("x has a gradient"));
                assert_close(&format!("{what} grad_x"), &grad, &grad_ref, tolerance);
            }
        }
    }
}

#[test]
fn rotations_match_the_loops() {
    check([3, 5, 6], 1);
    check([1, 1, 2], 1);
}

#[test]
fn tables_of_one_head_rotate_every_head_of_a_row() {
    check([2, 5, 12], 3);
    check([1, 3, 8], 4);
}

#[test]
fn rows_split_over_several_tasks_match_the_loops() {
    // 280 rows of 256: about 72 K elements, several of flex's 32 K-element tasks, whose first
    // rows are not at position 0.
    check([40, 7, 256], 1);
}

#[test]
fn matches_burns_rotary_encoding() {
    let ([batch, heads, positions, d], start) = ([2, 3, 6, 8], 2);
    for (backend, device) in devices_with_wgpu() {
        let encoding = RotaryEncodingConfig::new(16, d).init(&device);
        let x = Tensor::<4>::from_data(
            TensorData::new(
                values(batch * heads * positions * d, 7),
                [batch, heads, positions, d],
            ),
            &device,
        );
        let expected = host(encoding.apply(x.clone(), start));
        let angles = Tensor::<1, Int>::arange(start as i64..(start + positions) as i64, &device)
            .float()
            .unsqueeze_dim::<2>(1)
            * encoding.theta.clone().unsqueeze_dim::<2>(0);
        let got = host(rotary(x, angles.clone().cos(), angles.sin()));
        assert_close(
            &format!("{backend} against RotaryEncoding"),
            &got,
            &expected,
            1e-6,
        );
    }
}

#[test]
fn shapes_that_do_not_fit_the_tables_are_refused() {
    let device = Device::default();
    let x = Tensor::<3>::zeros([2, 4, 6], &device);
    let result = std::panic::catch_unwind(|| {
        rotary(
            x,
            Tensor::<2>::zeros([4, 2], &device),
            Tensor::<2>::zeros([4, 2], &device),
        )
    });
    let message = *result
        .expect_err("6 features are 3 pairs, not a multiple of 2")
        .downcast::<String>()
        .unwrap();
    assert!(
        message.contains("expected [.., positions, 2 k pairs]"),
        "{message}"
    );
}
