//! `moe_kernels::{exclusive_cumsum, invert_slots, top_k_indices}` on every backend built in
//! (wgpu included where a device opens) against plain loops on the host: columns shorter and
//! longer than a cube's units and than a million rows, a single row and a single column, slot
//! maps with dropped pairs, and rows with ties for the top-k.

use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_kernels::{exclusive_cumsum, invert_slots, top_k_indices};

mod common;
use common::devices_with_wgpu;

fn int_matrix(values: &[i64], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn host_ints<const D: usize>(tensor: Tensor<D, Int>) -> Vec<i64> {
    tensor.try_into_vec_as::<i64>().unwrap()
}

/// `y[t][c] = Σ_{t' < t} x[t'][c]` by loops.
fn column_prefixes(x: &[i64], [rows, columns]: [usize; 2]) -> Vec<i64> {
    let mut y = vec![0; x.len()];
    for c in 0..columns {
        let mut running = 0;
        for t in 0..rows {
            y[t * columns + c] = running;
            running += x[t * columns + c];
        }
    }
    y
}

/// Deterministic small integers, about a third of them zero (a mask with counts in it).
fn pattern(len: usize, seed: usize) -> Vec<i64> {
    (0..len)
        .map(|i| ((i * seed + i / 7) % 5) as i64 / 2)
        .collect()
}

#[test]
fn exclusive_cumsum_matches_the_loops() {
    for (backend, device) in devices_with_wgpu() {
        // On cube, a block scans 1,024 rows: one block, two, several, and more than 1,024
        // blocks (their totals scanned in blocks themselves).
        let shapes = [
            [1, 5],
            [7, 3],
            [300, 4],
            [1000, 1],
            [2049, 3],
            [9000, 2],
            [1_050_000, 1],
        ];
        for shape in shapes {
            let x = pattern(shape[0] * shape[1], 3);
            let got = host_ints(exclusive_cumsum(int_matrix(&x, shape, &device)));
            assert_eq!(
                got,
                column_prefixes(&x, shape),
                "{backend}: exclusive_cumsum of {shape:?}"
            );
        }
        // A transposed view: the kernel reads through the strides.
        let x = pattern(6 * 40, 7);
        let view = int_matrix(&x, [6, 40], &device).transpose();
        let transposed: Vec<i64> = (0..40)
            .flat_map(|r| (0..6).map(move |c| (r, c)))
            .map(|(r, c)| x[c * 40 + r])
            .collect();
        assert_eq!(
            host_ints(exclusive_cumsum(view)),
            column_prefixes(&transposed, [40, 6]),
            "{backend}: exclusive_cumsum of a transposed view"
        );
    }
}

#[test]
fn invert_slots_matches_the_loops() {
    for (backend, device) in devices_with_wgpu() {
        // 5 tokens x 3 experts; slot 8 (= slots) means dropped; slots 2 and 6 stay empty and
        // name the pair 15 (= 5 x 3, no pair).
        let slots = 8;
        #[rustfmt::skip]
        let slot_of_pair = vec![
            0, 8, 4,
            1, 3, 8,
            8, 8, 5,
            8, 7, 8,
            8, 8, 8,
        ];
        let mut expected = vec![15; slots];
        for (pair, &slot) in slot_of_pair.iter().enumerate() {
            if (slot as usize) < slots {
                expected[slot as usize] = pair as i64;
            }
        }
        let got = host_ints(invert_slots(
            int_matrix(&slot_of_pair, [5, 3], &device),
            slots,
        ));
        assert_eq!(got, expected, "{backend}: invert_slots");

        // Many pairs, every other one kept, in a buffer with room to spare.
        let (tokens, experts) = (700, 4);
        let slot_of_pair: Vec<i64> = (0..tokens * experts)
            .map(|pair| {
                if pair % 2 == 0 {
                    (pair / 2) as i64
                } else {
                    5000
                }
            })
            .collect();
        let slots = tokens * experts / 2 + 9;
        let mut expected = vec![(tokens * experts) as i64; slots];
        for pair in (0..tokens * experts).step_by(2) {
            expected[pair / 2] = pair as i64;
        }
        let got = host_ints(invert_slots(
            int_matrix(&slot_of_pair, [tokens, experts], &device),
            slots,
        ));
        assert_eq!(got, expected, "{backend}: invert_slots, many pairs");
    }
}

/// The indices of each row's `k` largest, by a stable sort: larger first, equal values in
/// index order.
fn largest_by_sorting(values: &[f32], columns: usize, k: usize) -> Vec<i64> {
    values
        .chunks(columns)
        .flat_map(|row| {
            let mut order: Vec<usize> = (0..columns).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order.into_iter().take(k).map(|index| index as i64)
        })
        .collect()
}

#[test]
fn top_k_indices_matches_a_sort() {
    for (backend, device) in devices_with_wgpu() {
        for (rows, columns) in [(1, 1), (5, 4), (37, 64), (300, 9)] {
            // Few distinct values, so that most rows have ties.
            let values: Vec<f32> = (0..rows * columns)
                .map(|i| ((i * 7 + i / 5) % 6) as f32 - 2.5)
                .collect();
            let x =
                Tensor::<2>::from_data(TensorData::new(values.clone(), [rows, columns]), &device);
            for k in [1, 2, 3, 16, columns].into_iter().filter(|&k| k <= columns) {
                let got = host_ints(top_k_indices(x.clone(), k));
                assert_eq!(
                    got,
                    largest_by_sorting(&values, columns, k),
                    "{backend}: top-{k} of [{rows}, {columns}]"
                );
            }
        }
    }
}
