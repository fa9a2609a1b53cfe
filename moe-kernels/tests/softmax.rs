//! `moe_kernels::{softmax, log_softmax}` on every CPU backend built in, in f32 and f64, against
//! host loops in f64: the output and the gradient, for short, odd, vector-sized and very long
//! rows, with masked (`-inf`) entries, along the last and an inner dimension, and a NaN that
//! must spread over its own row only; and the causal softmax against the same loop on masked
//! rows.

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use moe_kernels::{causal_softmax, log_softmax, softmax};

mod common;
use common::{assert_close, devices_with_wgpu, host};

/// An operation under test: softmax or log-softmax along a dimension.
type Operation<const D: usize> = fn(Tensor<D>, usize) -> Tensor<D>;

/// Host references `(x, g, row) -> (output, gradient)`.
type Reference = fn(&[f64], &[f64], usize) -> (Vec<f64>, Vec<f64>);

/// Both operations, for rank 2 and rank 3, with their references.
const OPERATIONS: [Named; 2] = [
    ("softmax", softmax, softmax, reference),
    ("log_softmax", log_softmax, log_softmax, log_reference),
];

const DTYPES: [(FloatDType, f64); 2] = [(FloatDType::F32, 2e-6), (FloatDType::F64, 1e-13)];

/// The entries of [`DTYPES`] `backend` computes in. On wgpu only f32: the cube kernels compute
/// in f32, and f64 (which llvmpipe offers) falls back to Burn's composed ops, whose f64 `exp`
/// is wrong there in Burn 0.22.1 (its softmax of `[-2, -1.63, -1.26, -0.89]` comes out as
/// 0.234, 0.339, 0.247, 0.180 against 0.132, 0.191, 0.277, 0.400): not ours to test, and not
/// a dtype burn-moe trains in.
fn supported((backend, device): &(&'static str, Device)) -> Vec<(FloatDType, f64)> {
    DTYPES
        .into_iter()
        .filter(|(dtype, _)| device.supports_dtype(*dtype))
        .filter(|(dtype, _)| *backend != "wgpu" || *dtype == FloatDType::F32)
        .collect()
}

/// Values in about [-12, 12], every fifth of them `-inf` when `masked` (never a whole row:
/// the first element of a row is kept, as the diagonal of a causal mask is).
fn values(len: usize, row: usize, seed: usize, masked: bool) -> Vec<f64> {
    (0..len)
        .map(|i| {
            if masked && i % row != 0 && (i * 7 + seed).is_multiple_of(5) {
                f64::NEG_INFINITY
            } else {
                ((i * seed + 3) % 97) as f64 / 4.0 - 12.0
            }
        })
        .collect()
}

/// `max + ln Σ e^{x - max}` of one row: softmax is `e^{x - this}`, log-softmax `x - this`.
fn log_normaliser(row: &[f64]) -> f64 {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Softmax of each `row`-long row and its gradient for the upstream `g`, by loops in f64:
/// `y = e^{x - max} / Σ e^{x - max}`, `grad = y (g - Σ g y)`.
fn reference(x: &[f64], g: &[f64], row: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; x.len()];
    let mut grad = vec![0.0; x.len()];
    for start in (0..x.len()).step_by(row) {
        let range = start..start + row;
        let offset = log_normaliser(&x[range.clone()]);
        for i in range.clone() {
            y[i] = (x[i] - offset).exp();
        }
        let dot: f64 = range.clone().map(|i| g[i] * y[i]).sum();
        for i in range {
            grad[i] = y[i] * (g[i] - dot);
        }
    }
    (y, grad)
}

/// Log-softmax of each `row`-long row and its gradient for the upstream `g`, by loops in f64:
/// `z = x - max - ln Σ e^{x - max}`, `grad = g - e^z Σ g`.
fn log_reference(x: &[f64], g: &[f64], row: usize) -> (Vec<f64>, Vec<f64>) {
    let mut z = vec![0.0; x.len()];
    let mut grad = vec![0.0; x.len()];
    for start in (0..x.len()).step_by(row) {
        let range = start..start + row;
        let offset = log_normaliser(&x[range.clone()]);
        let total: f64 = g[range.clone()].iter().sum();
        for i in range {
            z[i] = x[i] - offset;
            grad[i] = g[i] - z[i].exp() * total;
        }
    }
    (z, grad)
}

#[test]
fn rows_of_every_length_match_the_loops() {
    // 1, odd, one and two vector widths plus a tail, attention-sized, longer than flex's
    // parallel block (2^15).
    for (rows, row) in [(3, 1), (5, 7), (4, 16), (6, 33), (9, 128), (2, 40_000)] {
        for masked in [false, true] {
            let x = values(rows * row, row, 13, masked);
            let g = values(rows * row, row, 29, false);
            for ((name, op, _, reference), (backend, device), (dtype, tolerance)) in cases() {
                let expected = reference(&x, &g, row);
                let what = format!("{name} {backend} {dtype:?} {rows}x{row} masked={masked}");
                let tensor = |v: &[f64]| {
                    Tensor::<2>::from_data(TensorData::new(v.to_vec(), [rows, row]), &device)
                        .cast(dtype)
                };
                check(&what, op, tensor(&x), tensor(&g), expected, tolerance);
            }
        }
    }
}

/// Runs `op` along dimension 1 of `x` with the upstream gradient `g` and compares the output
/// and the gradient of `x` with `(y, grad)`.
fn check<const D: usize>(
    what: &str,
    op: Operation<D>,
    x: Tensor<D>,
    g: Tensor<D>,
    (y_ref, grad_ref): (Vec<f64>, Vec<f64>),
    tolerance: f64,
) {
    let input = x.require_grad();
    let y = op(input.clone(), 1);
    let grads = (y.clone() * g).sum().backward();
    assert_close(&format!("{what} y"), &host(y), &y_ref, tolerance);
    let grad = host(input.grad(&grads).expect("x has a gradient"));
    assert_close(&format!("{what} grad"), &grad, &grad_ref, tolerance);
}

/// `[outer, rows, cols]` values, row-major, rearranged as `[outer, cols, rows]`.
fn swap_inner(v: &[f64], outer: usize, rows: usize, cols: usize) -> Vec<f64> {
    let mut swapped = vec![0.0; v.len()];
    for o in 0..outer {
        for r in 0..rows {
            for c in 0..cols {
                swapped[(o * cols + c) * rows + r] = v[(o * rows + r) * cols + c];
            }
        }
    }
    swapped
}

#[test]
fn an_inner_dimension_matches_the_loops() {
    // Softmax over dimension 1 of [2, 5, 3]: the reference works on the transposed layout.
    let (outer, along, inner) = (2, 5, 3);
    let x = values(outer * along * inner, along, 17, false);
    let g = values(outer * along * inner, along, 31, false);
    for ((name, _, op, reference), (backend, device), (dtype, tolerance)) in cases() {
        let (y_t, grad_t) = reference(
            &swap_inner(&x, outer, along, inner),
            &swap_inner(&g, outer, along, inner),
            along,
        );
        let expected = (
            swap_inner(&y_t, outer, inner, along),
            swap_inner(&grad_t, outer, inner, along),
        );
        let what = format!("{name} {backend} {dtype:?}");
        let tensor = |v: &[f64]| {
            Tensor::<3>::from_data(TensorData::new(v.to_vec(), [outer, along, inner]), &device)
                .cast(dtype)
        };
        check(&what, op, tensor(&x), tensor(&g), expected, tolerance);
    }
}

#[test]
fn a_nan_spreads_over_its_row_only() {
    for ((name, op, _, _), (backend, device), (dtype, _)) in cases() {
        let mut x = values(3 * 20, 20, 5, false);
        x[25] = f64::NAN;
        let x = Tensor::<2>::from_data(TensorData::new(x, [3, 20]), &device).cast(dtype);
        let y = host(op(x, 1));
        for (i, value) in y.iter().enumerate() {
            let in_nan_row = (20..40).contains(&i);
            let what = format!("{name} {backend} {dtype:?}");
            assert_eq!(value.is_nan(), in_nan_row, "{what}: y[{i}] = {value}");
        }
    }
}

/// An operation with its name and reference.
type Named = (&'static str, Operation<2>, Operation<3>, Reference);

/// One operation on one backend in one dtype (with its tolerance).
type Case = (Named, (&'static str, Device), (FloatDType, f64));

/// Every operation on every backend in every dtype.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for operation in OPERATIONS {
        for device in devices_with_wgpu() {
            for dtype in supported(&device) {
                cases.push((operation, device.clone(), dtype));
            }
        }
    }
    cases
}

#[test]
fn causal_softmax_is_softmax_over_the_visible_keys() {
    // [2 batches, 3 queries, keys]: without and with earlier positions (a cache), more keys
    // than queries, and enough rows (2 x 300 x 128) for several flex tasks.
    for (batch, queries, keys, offset) in
        [(2, 3, 3, 0), (2, 3, 7, 4), (1, 4, 4, 9), (2, 300, 128, 0)]
    {
        let len = batch * queries * keys;
        let x = values(len, keys, 13, false);
        let g = values(len, keys, 29, false);
        // The reference: keys after `query + offset` set to -inf, then the plain softmax loop.
        let masked: Vec<f64> = (0..len)
            .map(|i| {
                let (query, key) = ((i / keys) % queries, i % keys);
                if key > query + offset {
                    f64::NEG_INFINITY
                } else {
                    x[i]
                }
            })
            .collect();
        let expected = reference(&masked, &g, keys);
        for ((backend, device), (dtype, tolerance)) in
            devices_with_wgpu().into_iter().flat_map(|device| {
                supported(&device)
                    .into_iter()
                    .map(move |dtype| (device.clone(), dtype))
            })
        {
            let what =
                format!("causal {backend} {dtype:?} [{batch}, {queries}, {keys}] offset {offset}");
            let tensor = |v: &[f64]| {
                Tensor::<3>::from_data(TensorData::new(v.to_vec(), [batch, queries, keys]), &device)
                    .cast(dtype)
            };
            let input = tensor(&x).require_grad();
            let y = causal_softmax(input.clone(), offset);
            let grads = (y.clone() * tensor(&g)).sum().backward();
            let y = host(y);
            assert_close(&format!("{what} y"), &y, &expected.0, tolerance);
            for (i, value) in y.iter().enumerate() {
                if masked[i] == f64::NEG_INFINITY {
                    assert_eq!(*value, 0.0, "{what}: y[{i}] of a future key");
                }
            }
            let grad = host(input.grad(&grads).expect("x has a gradient"));
            assert_close(&format!("{what} grad"), &grad, &expected.1, tolerance);
        }
    }
}
