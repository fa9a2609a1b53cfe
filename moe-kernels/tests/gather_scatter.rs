//! `moe_kernels::{gather_rows, combine_rows}` on every CPU backend built in, in f32 and f64,
//! against plain loops over slots and columns on the host: outputs and every gradient, for
//! contiguous and transposed inputs, with tokens that several slots name, tokens no slot
//! names, slots that name no token (padding: index `tokens`, or negative), and sizes large
//! enough that flex splits the rows over several tasks.

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use moe_kernels::{combine_rows, gather_rows};

mod common;
use common::{assert_close, devices, devices_with_wgpu, dtypes, host, matrix, values};

/// `tokens` rows of width `width`, `slots` slots naming them.
struct Problem {
    tokens: usize,
    slots: usize,
    width: usize,
    /// Token of each slot: some tokens repeat, the last ones are never named, and every fifth
    /// slot is padding (`tokens`, or `-1` for every tenth: no token).
    index: Vec<i64>,
    /// `x[t][j]` for the gather, `values[s][j]` and `weight[s]` for the combine.
    x: Vec<f64>,
    values: Vec<f64>,
    weight: Vec<f64>,
    /// Upstream gradients: `[slots, width]` for the gather, `[tokens, width]` for the combine.
    grad_gathered: Vec<f64>,
    grad_combined: Vec<f64>,
}

impl Problem {
    fn new(tokens: usize, slots: usize, width: usize) -> Self {
        // Tokens `0..named` are named, several times each; the rest never.
        let named = (tokens * 2 / 3).max(1);
        let index = (0..slots)
            .map(|s| match s % 10 {
                4 => tokens as i64,
                9 => -1,
                _ => ((s * 7 + s / 3) % named) as i64,
            })
            .collect();
        Self {
            tokens,
            slots,
            width,
            index,
            x: values(tokens * width, 5),
            values: values(slots * width, 11),
            weight: values(slots, 3),
            grad_gathered: values(slots * width, 13),
            grad_combined: values(tokens * width, 7),
        }
    }

    /// `(y, grad_x)` of the gather, by loops.
    fn gather_reference(&self) -> (Vec<f64>, Vec<f64>) {
        let w = self.width;
        let mut y = vec![0.0; self.slots * w];
        let mut grad_x = vec![0.0; self.tokens * w];
        for (s, t) in self.tokens_of_slots() {
            let Some(t) = t else { continue };
            for j in 0..w {
                y[s * w + j] = self.x[t * w + j];
                grad_x[t * w + j] += self.grad_gathered[s * w + j];
            }
        }
        (y, grad_x)
    }

    /// `(y, grad_values, grad_weight)` of the combine, by loops.
    fn combine_reference(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let w = self.width;
        let mut y = vec![0.0; self.tokens * w];
        let mut grad_values = vec![0.0; self.slots * w];
        let mut grad_weight = vec![0.0; self.slots];
        for (s, t) in self.tokens_of_slots() {
            let Some(t) = t else { continue };
            for j in 0..w {
                let g = self.grad_combined[t * w + j];
                y[t * w + j] += self.weight[s] * self.values[s * w + j];
                grad_values[s * w + j] = self.weight[s] * g;
                grad_weight[s] += g * self.values[s * w + j];
            }
        }
        (y, grad_values, grad_weight)
    }

    /// Each slot with the token it names, if any (a padding slot's gathered row is zero and
    /// it adds to no token).
    fn tokens_of_slots(&self) -> impl Iterator<Item = (usize, Option<usize>)> + '_ {
        self.index.iter().enumerate().map(|(s, &t)| {
            let named = (0..self.tokens as i64).contains(&t);
            (s, named.then_some(t as usize))
        })
    }

    fn index_tensor(&self, device: &Device) -> Tensor<1, Int> {
        Tensor::from_data(TensorData::new(self.index.clone(), [self.slots]), device)
    }
}

/// Both operations of `problem` on every backend and dtype, contiguous and transposed.
fn check(problem: &Problem) {
    let (gathered_ref, grad_x_ref) = problem.gather_reference();
    let (combined_ref, grad_values_ref, grad_weight_ref) = problem.combine_reference();
    let (t, s, w) = (problem.tokens, problem.slots, problem.width);
    for (backend, device) in devices_with_wgpu() {
        for (dtype, tolerance) in dtypes(&device) {
            for transposed in [false, true] {
                let what = format!("{backend} {dtype:?} transposed={transposed}");
                let index = problem.index_tensor(&device);

                let x = matrix(&problem.x, [t, w], transposed, dtype, &device).require_grad();
                let upstream = matrix(&problem.grad_gathered, [s, w], false, dtype, &device);
                let gathered = gather_rows(x.clone(), index.clone());
                let grads = (gathered.clone() * upstream).sum().backward();
                assert_close(
                    &format!("{what} gather y"),
                    &host(gathered),
                    &gathered_ref,
                    tolerance,
                );
                let grad_x = host(x.grad(&grads).expect("x has a gradient"));
                assert_close(
                    &format!("{what} gather grad_x"),
                    &grad_x,
                    &grad_x_ref,
                    tolerance,
                );

                let values =
                    matrix(&problem.values, [s, w], transposed, dtype, &device).require_grad();
                let weight =
                    Tensor::<1>::from_data(TensorData::new(problem.weight.clone(), [s]), &device)
                        .cast(dtype)
                        .require_grad();
                let upstream = matrix(&problem.grad_combined, [t, w], false, dtype, &device);
                let combined = combine_rows(values.clone(), weight.clone(), index, t);
                let grads = (combined.clone() * upstream).sum().backward();
                assert_close(
                    &format!("{what} combine y"),
                    &host(combined),
                    &combined_ref,
                    tolerance,
                );
                let grad_values = host(values.grad(&grads).expect("values have a gradient"));
                let grad_weight = host(weight.grad(&grads).expect("weight has a gradient"));
                assert_close(
                    &format!("{what} combine grad_values"),
                    &grad_values,
                    &grad_values_ref,
                    tolerance,
                );
                assert_close(
                    &format!("{what} combine grad_weight"),
                    &grad_weight,
                    &grad_weight_ref,
                    tolerance,
                );
            }
        }
    }
}

#[test]
fn small_problems_match_the_loops() {
    check(&Problem::new(5, 7, 3));
    check(&Problem::new(1, 4, 1));
    check(&Problem::new(6, 0, 4));
}

#[test]
fn problems_split_over_many_tasks_match_the_loops() {
    // flex gives each task 16,384 elements of whole rows: 496 rows of 33.
    check(&Problem::new(1500, 2600, 33));
}

#[test]
fn only_the_tracked_input_of_the_combine_gets_a_gradient() {
    let problem = Problem::new(9, 13, 5);
    let (_, grad_values_ref, grad_weight_ref) = problem.combine_reference();
    let (t, s, w) = (9, 13, 5);
    for (backend, device) in devices() {
        let upstream = matrix(
            &problem.grad_combined,
            [t, w],
            false,
            FloatDType::F64,
            &device,
        );
        for track_values in [true, false] {
            let values = matrix(&problem.values, [s, w], false, FloatDType::F64, &device);
            let weight =
                Tensor::<1>::from_data(TensorData::new(problem.weight.clone(), [s]), &device)
                    .cast(FloatDType::F64);
            let (values, weight) = if track_values {
                (values.require_grad(), weight)
            } else {
                (values, weight.require_grad())
            };
            let combined = combine_rows(
                values.clone(),
                weight.clone(),
                problem.index_tensor(&device),
                t,
            );
            let grads = (combined * upstream.clone()).sum().backward();
            let what = format!("{backend} track_values={track_values}");
            assert_eq!(
                values.grad(&grads).is_some(),
                track_values,
                "{what}: values"
            );
            assert_eq!(
                weight.grad(&grads).is_some(),
                !track_values,
                "{what}: weight"
            );
            if track_values {
                let got = host(values.grad(&grads).unwrap());
                assert_close(
                    &format!("{what} grad_values"),
                    &got,
                    &grad_values_ref,
                    1e-12,
                );
            } else {
                let got = host(weight.grad(&grads).unwrap());
                assert_close(
                    &format!("{what} grad_weight"),
                    &got,
                    &grad_weight_ref,
                    1e-12,
                );
            }
        }
    }
}
