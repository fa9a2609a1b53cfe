//! `moe_kernels::{matmul, batched_matmul, multi_head_matmul}` on every CPU backend built in, in
//! f32 and f64, against plain loops on the host: the output and both gradients, for contiguous
//! and transposed operands, a rank-3 left operand, a product large enough that flex splits its
//! GEMM over the cores, batches on both sides of flex's switch to parallel batch entries, and
//! multi-head products of attention's head-split views stored either way.

use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use moe_kernels::{batched_matmul, matmul, multi_head_matmul, HeadLayout};

mod common;
use common::{assert_close, assert_gradients, devices, host, matrix, values, DTYPES};

/// Three vectors: `(x, w, g)` or `(y, grad_x, grad_w)`.
type Triple = (Vec<f64>, Vec<f64>, Vec<f64>);

/// `(y, grad_x, grad_w)` of `y = x w` and the loss `sum(y * g)`, by loops.
fn reference(x: &[f64], w: &[f64], g: &[f64], [m, k, n]: [usize; 3]) -> Triple {
    let mut y = vec![0.0; m * n];
    let mut grad_x = vec![0.0; m * k];
    let mut grad_w = vec![0.0; k * n];
    for r in 0..m {
        for c in 0..n {
            for i in 0..k {
                y[r * n + c] += x[r * k + i] * w[i * n + c];
                grad_x[r * k + i] += g[r * n + c] * w[i * n + c];
                grad_w[i * n + c] += x[r * k + i] * g[r * n + c];
            }
        }
    }
    (y, grad_x, grad_w)
}

/// `[m, k] x [k, n]` on every backend, dtype and operand layout.
fn check([m, k, n]: [usize; 3]) {
    let (x_values, w_values, g_values) = (values(m * k, 5), values(k * n, 11), values(m * n, 3));
    let (y_ref, grad_x_ref, grad_w_ref) = reference(&x_values, &w_values, &g_values, [m, k, n]);
    for (backend, device) in devices() {
        for (dtype, tolerance) in DTYPES {
            for (x_transposed, w_transposed) in [(false, false), (true, false), (false, true)] {
                let what = format!("{backend} {dtype:?} [{m}, {k}] x [{k}, {n}] transposed x={x_transposed} w={w_transposed}");
                let x = matrix(&x_values, [m, k], x_transposed, dtype, &device).require_grad();
                let w = matrix(&w_values, [k, n], w_transposed, dtype, &device).require_grad();
                let g = matrix(&g_values, [m, n], false, dtype, &device);
                let y = matmul(x.clone(), w.clone());
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
}

#[test]
fn small_products_match_the_loops() {
    check([3, 4, 5]);
    check([1, 7, 1]);
    check([6, 1, 2]);
}

#[test]
fn a_product_split_over_the_cores_matches_the_loops() {
    // 70 x 64 x 65 multiply-adds: above flex's threshold for splitting one GEMM.
    check([70, 64, 65]);
}

#[test]
fn leading_dimensions_are_rows() {
    let ([b, t, k, n], dtype) = ([2, 3, 4, 5], FloatDType::F64);
    let (x_values, w_values, g_values) = (
        values(b * t * k, 5),
        values(k * n, 11),
        values(b * t * n, 3),
    );
    let (y_ref, grad_x_ref, grad_w_ref) = reference(&x_values, &w_values, &g_values, [b * t, k, n]);
    for (backend, device) in devices() {
        let x = Tensor::<3>::from_data(TensorData::new(x_values.clone(), [b, t, k]), &device)
            .cast(dtype)
            .require_grad();
        let w = matrix(&w_values, [k, n], false, dtype, &device).require_grad();
        let g = Tensor::<3>::from_data(TensorData::new(g_values.clone(), [b, t, n]), &device)
            .cast(dtype);
        let y = matmul(x.clone(), w.clone());
        assert_eq!(y.dims(), [b, t, n], "{backend}: shape");
        let grads = (y.clone() * g).sum().backward();
        assert_close(&format!("{backend} y"), &host(y), &y_ref, 1e-12);
        assert_gradients(backend, &grads, (&x, &grad_x_ref), (&w, &grad_w_ref), 1e-12);
    }
}

#[test]
fn only_the_tracked_operand_gets_a_gradient() {
    let [m, k, n] = [4, 3, 2];
    let (x_values, w_values, g_values) = (values(m * k, 5), values(k * n, 11), values(m * n, 3));
    let (_, grad_x_ref, grad_w_ref) = reference(&x_values, &w_values, &g_values, [m, k, n]);
    for (backend, device) in devices() {
        let g = matrix(&g_values, [m, n], false, FloatDType::F64, &device);
        for track_x in [true, false] {
            let x = matrix(&x_values, [m, k], false, FloatDType::F64, &device);
            let w = matrix(&w_values, [k, n], false, FloatDType::F64, &device);
            let (x, w) = if track_x {
                (x.require_grad(), w)
            } else {
                (x, w.require_grad())
            };
            let grads = (matmul(x.clone(), w.clone()) * g.clone()).sum().backward();
            let what = format!("{backend} track_x={track_x}");
            assert_eq!(x.grad(&grads).is_some(), track_x, "{what}: x's gradient");
            assert_eq!(w.grad(&grads).is_some(), !track_x, "{what}: w's gradient");
            if track_x {
                let got = host(x.grad(&grads).unwrap());
                assert_close(&format!("{what} grad_x"), &got, &grad_x_ref, 1e-12);
            } else {
                let got = host(w.grad(&grads).unwrap());
                assert_close(&format!("{what} grad_w"), &got, &grad_w_ref, 1e-12);
            }
        }
    }
}

/// The values of `entries` products `[m, k] x [k, n]` and of the loss's gradient, one entry after
/// the other (`x`, `w`, `g`), with `(y, grad_x, grad_w)` by loops, entry after entry.
fn batch_of_products(
    entries: usize,
    [m, k, n]: [usize; 3],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Triple) {
    let (x_values, w_values, g_values) = (
        values(entries * m * k, 5),
        values(entries * k * n, 11),
        values(entries * m * n, 3),
    );
    let mut expected = (Vec::new(), Vec::new(), Vec::new());
    for e in 0..entries {
        let (y, grad_x, grad_w) = reference(
            &x_values[e * m * k..(e + 1) * m * k],
            &w_values[e * k * n..(e + 1) * k * n],
            &g_values[e * m * n..(e + 1) * m * n],
            [m, k, n],
        );
        expected.0.extend(y);
        expected.1.extend(grad_x);
        expected.2.extend(grad_w);
    }
    (x_values, w_values, g_values, expected)
}

/// `[batch, m, k] x [batch, k, n]` on every backend and dtype, contiguous and with both
/// operands stored transposed.
fn check_batched([batch, m, k, n]: [usize; 4]) {
    let (x_values, w_values, g_values, expected) = batch_of_products(batch, [m, k, n]);
    // `[batch, rows, columns]`, stored as given or as `[batch, columns, rows]` and viewed back.
    let stack =
        |values: &[f64], [rows, columns]: [usize; 2], transposed, dtype, device: &Device| {
            let entries = (0..batch)
                .map(|e| {
                    let entry = &values[e * rows * columns..(e + 1) * rows * columns];
                    matrix(entry, [rows, columns], transposed, dtype, device).unsqueeze_dim::<3>(0)
                })
                .collect();
            Tensor::cat(entries, 0)
        };
    for (backend, device) in devices() {
        for (dtype, tolerance) in DTYPES {
            for transposed in [false, true] {
                let what = format!("{backend} {dtype:?} batch {batch} transposed={transposed}");
                let x = stack(&x_values, [m, k], transposed, dtype, &device).require_grad();
                let w = stack(&w_values, [k, n], transposed, dtype, &device).require_grad();
                let g = stack(&g_values, [m, n], false, dtype, &device);
                let y = batched_matmul(x.clone(), w.clone());
                let grads = (y.clone() * g).sum().backward();
                assert_close(&format!("{what} y"), &host(y), &expected.0, tolerance);
                assert_gradients(
                    &what,
                    &grads,
                    (&x, &expected.1),
                    (&w, &expected.2),
                    tolerance,
                );
            }
        }
    }
}

#[test]
fn batched_products_match_the_loops() {
    // One entry, three (one after the other on a 2-core machine) and nine (in parallel).
    check_batched([1, 3, 4, 5]);
    check_batched([3, 5, 2, 4]);
    check_batched([9, 4, 6, 3]);
}

/// `[B, H, rows, columns]` from row-major values, stored with its dimensions in `order`
/// (outermost first) and viewed back: `[0, 2, 1, 3]` is attention's head split of a
/// `[B, L, H * d]` projection, `[0, 3, 1, 2]` the transposed keys.
fn stored_as(
    values: &[f64],
    shape: [usize; 4],
    order: [usize; 4],
    dtype: FloatDType,
    device: &Device,
) -> Tensor<4> {
    let stored_shape = order.map(|dim| shape[dim]);
    let mut stored = vec![0.0; values.len()];
    for (flat, &value) in values.iter().enumerate() {
        // The logical index of `flat`, then its place in storage.
        let mut index = [0; 4];
        let mut rest = flat;
        for dim in (0..4).rev() {
            index[dim] = rest % shape[dim];
            rest /= shape[dim];
        }
        let place = order
            .iter()
            .fold(0, |place, &dim| place * shape[dim] + index[dim]);
        stored[place] = value;
    }
    let mut axes = [0; 4];
    for (position, &dim) in order.iter().enumerate() {
        axes[dim] = position;
    }
    Tensor::<4>::from_data(TensorData::new(stored, stored_shape), device)
        .cast(dtype)
        .permute(axes)
}

/// `[B, H, m, k] x [B, H, k, n]` on every backend and dtype, with the operands stored row-major
/// or as attention's views, and the output stored either way.
fn check_heads([batch, heads, m, k, n]: [usize; 5]) {
    let (x_values, w_values, g_values, expected) = batch_of_products(batch * heads, [m, k, n]);
    let row_major = [0, 1, 2, 3];
    let operand_orders = [
        (row_major, row_major),
        // Queries and transposed keys, both split from `[B, L, H * d]`.
        ([0, 2, 1, 3], [0, 3, 1, 2]),
        // Attention weights and split values.
        (row_major, [0, 2, 1, 3]),
    ];
    for (backend, device) in devices() {
        for (dtype, tolerance) in DTYPES {
            for (x_order, w_order) in operand_orders {
                for layout in [HeadLayout::Separate, HeadLayout::Merged] {
                    let what = format!(
                        "{backend} {dtype:?} [{batch}, {heads}] x stored {x_order:?} w stored \
                         {w_order:?} output {layout:?}"
                    );
                    let x = stored_as(&x_values, [batch, heads, m, k], x_order, dtype, &device)
                        .require_grad();
                    let w = stored_as(&w_values, [batch, heads, k, n], w_order, dtype, &device)
                        .require_grad();
                    // The gradient arrives as the merged heads' gradient does in attention.
                    let g = stored_as(
                        &g_values,
                        [batch, heads, m, n],
                        [0, 2, 1, 3],
                        dtype,
                        &device,
                    );
                    let y = multi_head_matmul(x.clone(), w.clone(), layout);
                    assert_eq!(y.dims(), [batch, heads, m, n], "{what}: shape");
                    let grads = (y.clone() * g).sum().backward();
                    assert_close(
                        &format!("{what} y"),
                        &host(y.clone()),
                        &expected.0,
                        tolerance,
                    );
                    // Merging the heads reads the output in its other order.
                    let merged = host(y.swap_dims(1, 2).reshape([batch, m, heads * n]));
                    let mut merged_ref = vec![0.0; merged.len()];
                    for (e, chunk) in expected.0.chunks(m * n).enumerate() {
                        let (b, h) = (e / heads, e % heads);
                        for (i, &value) in chunk.iter().enumerate() {
                            let (row, column) = (i / n, i % n);
                            merged_ref[(b * m + row) * heads * n + h * n + column] = value;
                        }
                    }
                    assert_close(&format!("{what} merged"), &merged, &merged_ref, tolerance);
                    assert_gradients(
                        &what,
                        &grads,
                        (&x, &expected.1),
                        (&w, &expected.2),
                        tolerance,
                    );
                }
            }
        }
    }
}

#[test]
fn multi_head_products_match_the_loops() {
    // Two entries (one after the other on a 2-core machine), six (in parallel), one head.
    check_heads([1, 2, 3, 4, 5]);
    check_heads([2, 3, 4, 2, 3]);
    check_heads([3, 1, 5, 3, 4]);
}
