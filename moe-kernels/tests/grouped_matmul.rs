//! `moe_kernels::grouped_matmul` and `grouped_bias` on every backend built in, in f32 and f64,
//! against plain loops over groups, rows and columns on the host: the outputs and the
//! gradients of every input, for contiguous and transposed inputs, for group counts on both
//! sides of flex's switch between parallel groups and parallel GEMMs, with empty groups,
//! padding rows before and after the groups, offsets out of range or out of order, sizes that
//! are not multiples of any tile, and NaN in the rows that must not be read.

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use moe_kernels::grouped_matmul::grouped_weight_grad;
use moe_kernels::{grouped_bias, grouped_matmul};

mod common;
use common::{assert_close, assert_gradients, devices_with_wgpu, dtypes, host, values};

/// A ragged problem: `x: [S, K]` split into groups by `offsets`, `w: [E, K, N]`, a bias
/// `[E, N]` and an upstream gradient `g: [S, N]`.
struct Problem {
    rows: usize,
    experts: usize,
    inner: usize,
    columns: usize,
    /// `x[s][k]`, row-major.
    x: Vec<f64>,
    /// `w[e][k][n]`, row-major.
    w: Vec<f64>,
    /// `bias[e][n]`, row-major.
    bias: Vec<f64>,
    /// `g[s][n]`, row-major: the loss is `sum(y * g)`.
    g: Vec<f64>,
    offsets: Vec<i64>,
}

impl Problem {
    fn new(rows: usize, inner: usize, columns: usize, offsets: Vec<i64>) -> Self {
        let experts = offsets.len() - 1;
        Self {
            rows,
            experts,
            inner,
            columns,
            x: values(rows * inner, 5),
            w: values(experts * inner * columns, 11),
            bias: values(experts * columns, 7),
            g: values(rows * columns, 3),
            offsets,
        }
    }

    /// The group of each row, or `None` for a row no group covers: group `e` starts at
    /// `offsets[e]` but not before the previous group ends, and ends at `offsets[e + 1]` but
    /// not before it starts, all within `0..rows`.
    fn group_of_rows(&self) -> Vec<Option<usize>> {
        let mut group = vec![None; self.rows];
        let mut end = 0i64;
        for e in 0..self.experts {
            let start = self.offsets[e].max(end).min(self.rows as i64);
            end = self.offsets[e + 1].max(start).min(self.rows as i64);
            for row in start..end {
                group[row as usize] = Some(e);
            }
        }
        group
    }

    /// `(y, grad_x, grad_w)` of the product by loops.
    fn product_reference(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (k_len, n_len) = (self.inner, self.columns);
        let mut y = vec![0.0; self.rows * n_len];
        let mut grad_x = vec![0.0; self.rows * k_len];
        let mut grad_w = vec![0.0; self.experts * k_len * n_len];
        for (s, group) in self.group_of_rows().into_iter().enumerate() {
            let Some(e) = group else { continue };
            for n in 0..n_len {
                let g = self.g[s * n_len + n];
                for k in 0..k_len {
                    let x = self.x[s * k_len + k];
                    let w = self.w[(e * k_len + k) * n_len + n];
                    y[s * n_len + n] += x * w;
                    grad_x[s * k_len + k] += g * w;
                    grad_w[(e * k_len + k) * n_len + n] += x * g;
                }
            }
        }
        (y, grad_x, grad_w)
    }

    /// `(y, grad_bias)` of the bias addition to `y0 = g` (its `x` gradient is `g` itself).
    fn bias_reference(&self) -> (Vec<f64>, Vec<f64>) {
        let n_len = self.columns;
        let mut y = self.g.clone();
        let mut grad_bias = vec![0.0; self.experts * n_len];
        for (s, group) in self.group_of_rows().into_iter().enumerate() {
            let Some(e) = group else { continue };
            for n in 0..n_len {
                y[s * n_len + n] += self.bias[e * n_len + n];
                grad_bias[e * n_len + n] += self.g[s * n_len + n];
            }
        }
        (y, grad_bias)
    }

    /// Sets every element of `x` in rows no group covers to NaN.
    fn poison_uncovered_rows(&mut self) {
        for (s, group) in self.group_of_rows().into_iter().enumerate() {
            if group.is_none() {
                self.x[s * self.inner..(s + 1) * self.inner].fill(f64::NAN);
            }
        }
    }

    fn offsets(&self, device: &Device) -> Tensor<1, Int> {
        Tensor::from_data(
            TensorData::new(self.offsets.clone(), [self.experts + 1]),
            device,
        )
    }
}

fn tensor<const D: usize>(
    values: &[f64],
    shape: [usize; D],
    dtype: FloatDType,
    device: &Device,
) -> Tensor<D> {
    Tensor::<D>::from_data(TensorData::new(values.to_vec(), shape), device).cast(dtype)
}

/// The same values stored with the last two dimensions swapped and viewed back (a strided
/// view, not a copy).
fn transposed_view<const D: usize>(
    values: &[f64],
    shape: [usize; D],
    dtype: FloatDType,
    device: &Device,
) -> Tensor<D> {
    let (a_len, b_len) = (shape[D - 2], shape[D - 1]);
    let mut stored = vec![0.0; values.len()];
    for (batch, block) in values.chunks(a_len * b_len).enumerate() {
        for a in 0..a_len {
            for b in 0..b_len {
                stored[batch * a_len * b_len + b * a_len + a] = block[a * b_len + b];
            }
        }
    }
    let mut stored_shape = shape;
    stored_shape.swap(D - 2, D - 1);
    tensor(&stored, stored_shape, dtype, device).swap_dims(D - 2, D - 1)
}

/// Runs the product and the bias addition of `problem` on every backend and dtype, with `x`
/// and `w` contiguous or transposed views, and compares outputs and gradients with the loops.
fn check(problem: &Problem, transposed: bool) {
    let (y_ref, grad_x_ref, grad_w_ref) = problem.product_reference();
    let (bias_y_ref, grad_bias_ref) = problem.bias_reference();
    let (s, e, k, n) = (
        problem.rows,
        problem.experts,
        problem.inner,
        problem.columns,
    );
    for (backend, device) in devices_with_wgpu() {
        for (dtype, tolerance) in dtypes(&device) {
            let what = format!("{backend} {dtype:?} transposed={transposed}");
            let (x, w) = if transposed {
                (
                    transposed_view(&problem.x, [s, k], dtype, &device),
                    transposed_view(&problem.w, [e, k, n], dtype, &device),
                )
            } else {
                (
                    tensor(&problem.x, [s, k], dtype, &device),
                    tensor(&problem.w, [e, k, n], dtype, &device),
                )
            };
            let (x, w) = (x.require_grad(), w.require_grad());
            let g = tensor(&problem.g, [s, n], dtype, &device);
            let y = grouped_matmul(x.clone(), w.clone(), problem.offsets(&device));
            let grads = (y.clone() * g.clone()).sum().backward();
            assert_close(&format!("{what} y"), &host(y), &y_ref, tolerance);
            assert_gradients(
                &what,
                &grads,
                (&x, &grad_x_ref),
                (&w, &grad_w_ref),
                tolerance,
            );

            let y0 = g.clone().require_grad();
            let bias = tensor(&problem.bias, [e, n], dtype, &device).require_grad();
            let y = grouped_bias(y0.clone(), bias.clone(), problem.offsets(&device));
            let grads = (y.clone() * g).sum().backward();
            assert_close(&format!("{what} bias y"), &host(y), &bias_y_ref, tolerance);
            assert_gradients(
                &format!("{what} bias"),
                &grads,
                (&y0, &problem.g),
                (&bias, &grad_bias_ref),
                tolerance,
            );
        }
    }
}

#[test]
fn few_groups_match_the_loops() {
    // Fewer groups than twice the threads of a 2-core machine: flex runs them one by one.
    // Group 1 is empty; rows 7 and 8 are padding.
    let problem = Problem::new(9, 4, 6, vec![0, 5, 5, 7]);
    check(&problem, false);
    check(&problem, true);
}

#[test]
fn many_groups_match_the_loops() {
    let problem = Problem::new(14, 3, 5, vec![0, 4, 5, 5, 8, 12, 14]);
    check(&problem, false);
    check(&problem, true);
    // Sizes that are multiples of no tile, and more groups than rows per group.
    let wide = Problem::new(37, 33, 17, vec![0, 7, 13, 18, 22, 25, 27, 28, 28, 35]);
    check(&wide, false);
    check(&wide, true);
}

#[test]
fn long_groups_match_the_loops() {
    // Groups longer than a GEMM tile or a kernel's block of rows.
    let problem = Problem::new(300, 6, 5, vec![0, 250, 250, 291]);
    check(&problem, false);
    check(&problem, true);
}

#[test]
fn offsets_out_of_range_or_order_give_disjoint_groups() {
    // Padding before the first group (rows 0 and 1), an offset that goes back (3 < 6: group 2
    // is empty and group 3 starts at 6), and one past the end (20 counts as 10).
    let problem = Problem::new(10, 3, 4, vec![2, 6, 3, 8, 20]);
    check(&problem, false);
    // Negative offsets count as 0.
    let problem = Problem::new(5, 2, 3, vec![-3, -1, 4]);
    check(&problem, false);
}

#[test]
fn rows_outside_the_groups_are_never_read() {
    let mut problem = Problem::new(12, 5, 3, vec![1, 3, 9, 9, 10]);
    problem.poison_uncovered_rows();
    check(&problem, false);
    check(&problem, true);
}

#[test]
fn only_the_tracked_input_gets_a_gradient() {
    let problem = Problem::new(8, 3, 2, vec![0, 1, 5, 5, 8]);
    let (_, grad_x_ref, grad_w_ref) = problem.product_reference();
    let (s, e, k, n) = (8, 4, 3, 2);
    for (backend, device) in devices_with_wgpu() {
        // The most precise float type the device has.
        let (dtype, tolerance) = *dtypes(&device).last().expect("f32 at least");
        let g = tensor(&problem.g, [s, n], dtype, &device);
        for track_x in [true, false] {
            let x = tensor(&problem.x, [s, k], dtype, &device);
            let w = tensor(&problem.w, [e, k, n], dtype, &device);
            let (x, w) = if track_x {
                (x.require_grad(), w)
            } else {
                (x, w.require_grad())
            };
            let y = grouped_matmul(x.clone(), w.clone(), problem.offsets(&device));
            let grads = (y * g.clone()).sum().backward();
            let what = format!("{backend} track_x={track_x}");
            assert_eq!(x.grad(&grads).is_some(), track_x, "{what}: x's gradient");
            assert_eq!(w.grad(&grads).is_some(), !track_x, "{what}: w's gradient");
            if track_x {
                let grad_x = host(x.grad(&grads).unwrap());
                assert_close(&format!("{what} grad_x"), &grad_x, &grad_x_ref, tolerance);
            } else {
                let grad_w = host(w.grad(&grads).unwrap());
                assert_close(&format!("{what} grad_w"), &grad_w, &grad_w_ref, tolerance);
            }
        }
    }
}

/// A buffer the size a GPU sees: 262,144 rows, `K` and `N` of several tiles and off every tile
/// size (72 = 4.5 steps of 16; 120 = 1.9 blocks of 64; the `[S, N]` tensors stay under the
/// 128 MiB a storage buffer may have on some adapters, llvmpipe's among them), eight groups of which one holds half
/// the rows, one is empty, and the rest share the others, with 100 rows of padding. The three
/// products against f64 loops (the values are multiples of 1/8, so every sum is exact in f32
/// and only the final rounding to the dtype differs), in f32 and in f16 where the device
/// computes in it; each run twice, equal bit for bit.
#[test]
fn gpu_sized_buffers_match_the_loops_and_repeat_exactly() {
    let (rows, inner, columns) = (262_144, 72, 120);
    let routed = rows as i64 - 100;
    let half = routed / 2;
    let share = (routed - half) / 6;
    let mut offsets = vec![0, half, half];
    for _ in 0..6 {
        offsets.push(offsets.last().unwrap() + share);
    }
    let problem = Problem::new(rows, inner, columns, offsets);
    let (y_ref, grad_x_ref, grad_w_ref) = problem.product_reference();
    let e = problem.experts;
    for (backend, device) in devices_with_wgpu() {
        let device = device.inner();
        let mut dtypes = vec![(FloatDType::F32, 1e-6)];
        if backend == "wgpu" && device.supports_dtype(FloatDType::F16) {
            dtypes.push((FloatDType::F16, 1e-3));
        }
        for (dtype, tolerance) in dtypes {
            let what = format!("{backend} {dtype:?} {rows} rows");
            let x = tensor(&problem.x, [rows, inner], dtype, &device);
            let w = tensor(&problem.w, [e, inner, columns], dtype, &device);
            let g = tensor(&problem.g, [rows, columns], dtype, &device);
            let products = || {
                let offsets = problem.offsets(&device);
                [
                    bits(grouped_matmul(x.clone(), w.clone(), offsets.clone())),
                    bits(grouped_matmul(
                        g.clone(),
                        w.clone().swap_dims(1, 2),
                        offsets.clone(),
                    )),
                    bits(grouped_weight_grad(x.clone(), g.clone(), offsets)),
                ]
            };
            let first = products();
            assert!(first == products(), "{what}: a second run differs");
            for ((name, got), expected) in
                ["y", "grad_x", "grad_w"]
                    .iter()
                    .zip(&first)
                    .zip([&y_ref, &grad_x_ref, &grad_w_ref])
            {
                let got: Vec<f64> = got.iter().map(|&(value, _)| value).collect();
                assert_close(&format!("{what} {name}"), &got, expected, tolerance);
            }
        }
    }
}

/// A tensor's values as f64 with their f64 bits, to compare runs bit for bit.
fn bits<const D: usize>(tensor: Tensor<D>) -> Vec<(f64, u64)> {
    host(tensor)
        .into_iter()
        .map(|value| (value, value.to_bits()))
        .collect()
}
