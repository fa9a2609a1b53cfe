//! `moe_kernels::grouped_matmul` on every CPU backend built in, in f32 and f64, against plain
//! loops over experts, rows and columns on the host: the output, the gradient of `x` and the
//! gradient of `w`, for contiguous and transposed inputs, for expert counts on both sides of
//! flex's switch between parallel experts and parallel GEMMs, for slot counts on both sides of
//! its switch between column- and row-major outputs, with empty, full and out-of-range row
//! counts, and with NaN in the rows that must not be read.

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use moe_kernels::grouped_matmul;

mod common;
use common::{assert_close, assert_gradients, devices, host, values, DTYPES};

/// A `[E, C, K]` problem with per-expert row counts and an upstream gradient `g: [E, C, N]`.
struct Problem {
    experts: usize,
    slots: usize,
    inner: usize,
    columns: usize,
    /// `x[e][r][k]`, row-major.
    x: Vec<f64>,
    /// `w[e][k][n]`, row-major.
    w: Vec<f64>,
    /// `g[e][r][n]`, row-major: the loss is `sum(y * g)`.
    g: Vec<f64>,
    rows: Vec<i64>,
}

impl Problem {
    fn new(experts: usize, slots: usize, inner: usize, columns: usize, rows: Vec<i64>) -> Self {
        assert_eq!(rows.len(), experts);
        Self {
            experts,
            slots,
            inner,
            columns,
            x: values(experts * slots * inner, 5),
            w: values(experts * inner * columns, 11),
            g: values(experts * slots * columns, 3),
            rows,
        }
    }

    /// Rows of expert `e` that count: the count clamped to `0..=slots`.
    fn filled(&self, e: usize) -> usize {
        self.rows[e].clamp(0, self.slots as i64) as usize
    }

    /// `(y, grad_x, grad_w)` by loops.
    fn reference(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (c, k_len, n_len) = (self.slots, self.inner, self.columns);
        let mut y = vec![0.0; self.experts * c * n_len];
        let mut grad_x = vec![0.0; self.experts * c * k_len];
        let mut grad_w = vec![0.0; self.experts * k_len * n_len];
        for e in 0..self.experts {
            for r in 0..self.filled(e) {
                for n in 0..n_len {
                    let g = self.g[(e * c + r) * n_len + n];
                    for k in 0..k_len {
                        let x = self.x[(e * c + r) * k_len + k];
                        let w = self.w[(e * k_len + k) * n_len + n];
                        y[(e * c + r) * n_len + n] += x * w;
                        grad_x[(e * c + r) * k_len + k] += g * w;
                        grad_w[(e * k_len + k) * n_len + n] += x * g;
                    }
                }
            }
        }
        (y, grad_x, grad_w)
    }

    /// Sets every element of `x` beyond each expert's filled rows to NaN.
    fn poison_unfilled_rows(&mut self) {
        for e in 0..self.experts {
            for r in self.filled(e)..self.slots {
                let start = (e * self.slots + r) * self.inner;
                self.x[start..start + self.inner].fill(f64::NAN);
            }
        }
    }
}

fn tensor(values: &[f64], shape: [usize; 3], dtype: FloatDType, device: &Device) -> Tensor<3> {
    Tensor::<3>::from_data(TensorData::new(values.to_vec(), shape), device).cast(dtype)
}

/// The same values, stored transposed (`[E, B, A]` in memory) and viewed as `[E, A, B]`.
fn transposed_view(
    values: &[f64],
    [e_len, a_len, b_len]: [usize; 3],
    dtype: FloatDType,
    device: &Device,
) -> Tensor<3> {
    let mut stored = vec![0.0; values.len()];
    for e in 0..e_len {
        for a in 0..a_len {
            for b in 0..b_len {
                stored[(e * b_len + b) * a_len + a] = values[(e * a_len + a) * b_len + b];
            }
        }
    }
    tensor(&stored, [e_len, b_len, a_len], dtype, device).swap_dims(1, 2)
}

/// Runs `problem` on every backend and dtype, with `x` and `w` contiguous or transposed
/// views, and compares output and both gradients with the loops.
fn check(problem: &Problem, transposed: bool) {
    let (y_ref, grad_x_ref, grad_w_ref) = problem.reference();
    let (e, c, k, n) = (
        problem.experts,
        problem.slots,
        problem.inner,
        problem.columns,
    );
    for (backend, device) in devices() {
        for (dtype, tolerance) in DTYPES {
            let what = format!("{backend} {dtype:?} transposed={transposed}");
            let (x, w) = if transposed {
                (
                    transposed_view(&problem.x, [e, c, k], dtype, &device),
                    transposed_view(&problem.w, [e, k, n], dtype, &device),
                )
            } else {
                (
                    tensor(&problem.x, [e, c, k], dtype, &device),
                    tensor(&problem.w, [e, k, n], dtype, &device),
                )
            };
            let (x, w) = (x.require_grad(), w.require_grad());
            let g = tensor(&problem.g, [e, c, n], dtype, &device);
            let rows =
                Tensor::<1, Int>::from_data(TensorData::new(problem.rows.clone(), [e]), &device);
            let y = grouped_matmul(x.clone(), w.clone(), rows);
            let grads = (y.clone() * g).sum().backward();
            assert_close(&format!("{what} y"), &host(y), &y_ref, tolerance);
            assert_gradients(
                &what,
                &grads,
                (&x, &grad_x_ref),
                (&w, &grad_w_ref),
                tolerance,
            );
        }
    }
}

#[test]
fn few_experts_match_the_loops() {
    // Fewer experts than twice the threads of a 2-core machine: flex runs them one by one.
    let problem = Problem::new(3, 5, 4, 6, vec![5, 0, 2]);
    check(&problem, false);
    check(&problem, true);
}

#[test]
fn many_experts_match_the_loops() {
    // Out-of-range counts: 9 counts as all 4 slots, -2 as none.
    let problem = Problem::new(6, 4, 3, 5, vec![4, 1, 0, 3, 9, -2]);
    check(&problem, false);
    check(&problem, true);
    let wide = Problem::new(9, 7, 33, 17, vec![7, 6, 5, 4, 3, 2, 1, 0, 7]);
    check(&wide, false);
}

#[test]
fn many_slots_match_the_loops() {
    // More slots than flex stores column by column when `w` is a transposed view (256): the
    // backward pass's `w[e]ᵀ` product is stored row-major again.
    let problem = Problem::new(3, 400, 6, 5, vec![400, 123, 0]);
    check(&problem, false);
    check(&problem, true);
}

#[test]
fn rows_beyond_the_counts_are_never_read() {
    let mut problem = Problem::new(4, 6, 5, 3, vec![2, 6, 0, 3]);
    problem.poison_unfilled_rows();
    check(&problem, false);
    check(&problem, true);
}

#[test]
fn only_the_tracked_input_gets_a_gradient() {
    let problem = Problem::new(5, 4, 3, 2, vec![1, 4, 2, 0, 3]);
    let (_, grad_x_ref, grad_w_ref) = problem.reference();
    let (e, c, k, n) = (5, 4, 3, 2);
    for (backend, device) in devices() {
        let rows = Tensor::<1, Int>::from_data(TensorData::new(problem.rows.clone(), [e]), &device);
        let g = tensor(&problem.g, [e, c, n], FloatDType::F64, &device);
        for track_x in [true, false] {
            let x = tensor(&problem.x, [e, c, k], FloatDType::F64, &device);
            let w = tensor(&problem.w, [e, k, n], FloatDType::F64, &device);
            let (x, w) = if track_x {
                (x.require_grad(), w)
            } else {
                (x, w.require_grad())
            };
            let y = grouped_matmul(x.clone(), w.clone(), rows.clone());
            let grads = (y * g.clone()).sum().backward();
            let what = format!("{backend} track_x={track_x}");
            assert_eq!(x.grad(&grads).is_some(), track_x, "{what}: x's gradient");
            assert_eq!(w.grad(&grads).is_some(), !track_x, "{what}: w's gradient");
            if track_x {
                let grad_x = host(x.grad(&grads).unwrap());
                assert_close(&format!("{what} grad_x"), &grad_x, &grad_x_ref, 1e-12);
            } else {
                let grad_w = host(w.grad(&grads).unwrap());
                assert_close(&format!("{what} grad_w"), &grad_w, &grad_w_ref, 1e-12);
            }
        }
    }
}
