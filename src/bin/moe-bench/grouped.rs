//! W7: the grouped (ragged) expert matmul against the backend's own matmul at the same FLOPs.
//!
//! Each case is a ragged buffer of `rows` rows split over `experts` groups and the three
//! products an expert projection runs per training step:
//!
//! - forward, `y[s] = x[s] · w[e]` ([`grouped_matmul()`]), against `x · W` for one `[K, N]` W;
//! - the input gradient, `g[s] · w[e]ᵀ` (the same kernel on the transposed weights), against
//!   `g · Wᵀ`;
//! - the weight gradient, `Σ_{s in e} x[s]ᵀ g[s]` ([`grouped_weight_grad`]), against `xᵀ · g`.
//!
//! Both sides do `2 x rows x K x N` useful FLOPs, so the ratio of their times is the share of
//! the backend's matmul speed the grouped kernel reaches (1.0: as fast). A third form lays the
//! rows out as the capacity layout would, `[E, C, K]` with `C = ceil(1.25 S / E)` rows per
//! group, and runs the backend's batched matmul over it (autotuned on the cube backends): the
//! alternative to the ragged kernel, timed beside it. All three sides of each product are timed
//! in interleaved rounds.

use burn::tensor::{Device, Distribution, FloatDType, Int, Tensor, TensorData};
use burn_moe::kernels::grouped_matmul;
use burn_moe::kernels::grouped_matmul::grouped_weight_grad;
use serde::Serialize;

use crate::timing::interleaved_median_seconds;

/// How the rows are spread over the groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    /// Every group near `rows / experts` (between half and one and a half times it).
    Even,
    /// One group holds half the rows, a quarter of the groups none, the rest share the others.
    Skewed,
}

/// One W7 shape: an expert projection of a preset.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GroupedShape {
    /// What it is (the preset and projection it comes from).
    pub name: &'static str,
    /// Rows of the buffer, `S`.
    pub rows: usize,
    /// Input width, `K`.
    pub inner: usize,
    /// Output width, `N`.
    pub columns: usize,
    /// Groups, `E`.
    pub experts: usize,
    /// How the rows are spread over the groups.
    pub spread: Spread,
}

/// The shapes: the tiny preset's two projections (64 experts of width 32, 16,384 rows), the
/// small preset's (8 experts of width 512, its 10,240-row capacity buffer) and, off the tile
/// sizes, a skewed one.
pub fn shapes(quick: bool) -> Vec<GroupedShape> {
    let shape = |name, rows, inner, columns, experts, spread| GroupedShape {
        name,
        rows,
        inner,
        columns,
        experts,
        spread,
    };
    let mut shapes = vec![
        shape("tiny w_in", 16_384, 128, 32, 64, Spread::Even),
        shape("small w_in", 10_240, 256, 512, 8, Spread::Even),
    ];
    if !quick {
        shapes.push(shape("tiny w_out", 16_384, 32, 128, 64, Spread::Even));
        shapes.push(shape("small w_out", 10_240, 512, 256, 8, Spread::Even));
        shapes.push(shape(
            "skewed, off-tile",
            12_000,
            200,
            136,
            16,
            Spread::Skewed,
        ));
    }
    shapes
}

/// The `base` preset's SwiGLU projection, for GPUs (`gpu-check`).
pub fn gpu_shapes() -> Vec<GroupedShape> {
    let mut shapes = shapes(false);
    shapes.push(GroupedShape {
        name: "base w_in",
        rows: 20_480,
        inner: 512,
        columns: 1024,
        experts: 16,
        spread: Spread::Even,
    });
    shapes
}

/// Which of the three products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Product {
    /// `x · w[e]`.
    Forward,
    /// `g · w[e]ᵀ`.
    InputGrad,
    /// `Σ x[s]ᵀ g[s]` per group.
    WeightGrad,
}

/// One measured product of one shape.
#[derive(Debug, Clone, Serialize)]
pub struct GroupedRow {
    /// The shape.
    pub shape: GroupedShape,
    /// The product.
    pub product: Product,
    /// `f32` or `f16`.
    pub dtype: String,
    /// Median seconds of the grouped product.
    pub grouped_seconds: f64,
    /// Median seconds of the backend's matmul on the same rows.
    pub matmul_seconds: f64,
    /// Median seconds of the backend's batched matmul over the `[E, C, ·]` capacity layout.
    pub batched_seconds: f64,
    /// Useful GFLOP/s of the grouped product.
    pub grouped_gflops: f64,
    /// GFLOP/s of the backend's matmul.
    pub matmul_gflops: f64,
    /// `matmul_seconds / grouped_seconds` (target on llvmpipe: >= 0.8).
    pub ratio: f64,
    /// `matmul_seconds / batched_seconds`: the same share for the batched form, counting only
    /// the `S` useful rows (its padding rows are work it does in vain).
    pub batched_ratio: f64,
}

/// Rows per group of the capacity layout at capacity factor 1.25, `ceil(1.25 S / E)`.
pub fn capacity_rows(rows: usize, experts: usize) -> usize {
    (rows * 5).div_ceil(experts * 4)
}

/// Group sizes summing to `rows`, by `spread` (deterministic).
pub fn group_sizes(rows: usize, experts: usize, spread: Spread) -> Vec<usize> {
    let mut state = 0x9e37_79b9_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f64 / (1u64 << 31) as f64
    };
    let weights: Vec<f64> = match spread {
        Spread::Even => (0..experts).map(|_| 0.5 + next()).collect(),
        Spread::Skewed => (0..experts)
            .map(|e| match e {
                0 => experts as f64 * 0.75,
                _ if e % 4 == 3 => 0.0,
                _ => 0.5 + next(),
            })
            .collect(),
    };
    let total: f64 = weights.iter().sum();
    let mut sizes: Vec<usize> = weights
        .iter()
        .map(|w| (w / total * rows as f64).floor() as usize)
        .collect();
    let short = rows - sizes.iter().sum::<usize>();
    sizes[0] += short;
    sizes
}

/// `[E + 1]` offsets of `sizes`.
pub fn offsets_of(sizes: &[usize], device: &Device) -> Tensor<1, Int> {
    let mut offsets = vec![0i64];
    for size in sizes {
        offsets.push(offsets.last().copied().unwrap_or(0) + *size as i64);
    }
    let len = offsets.len();
    Tensor::from_data(TensorData::new(offsets, [len]), device)
}

/// W7 for every shape and product, in `dtype`.
pub fn measure(
    device: &Device,
    shapes: &[GroupedShape],
    dtype: FloatDType,
    warmup: usize,
    repeats: usize,
) -> Vec<GroupedRow> {
    let mut rows = Vec::new();
    for &shape in shapes {
        let GroupedShape {
            rows: s,
            inner: k,
            columns: n,
            experts: e,
            ..
        } = shape;
        let random = |dims: Vec<usize>| {
            Tensor::<1>::random(
                [dims.iter().product::<usize>()],
                Distribution::Uniform(-1.0, 1.0),
                device,
            )
            .cast(dtype)
        };
        let x = random(vec![s, k]).reshape([s, k]);
        let g = random(vec![s, n]).reshape([s, n]);
        let w = random(vec![e, k, n]).reshape([e, k, n]);
        let dense_w = random(vec![k, n]).reshape([k, n]);
        let offsets = offsets_of(&group_sizes(s, e, shape.spread), device);
        let c = capacity_rows(s, e);
        let x_batched = random(vec![e, c, k]).reshape([e, c, k]);
        let g_batched = random(vec![e, c, n]).reshape([e, c, n]);

        let mut works: Vec<Box<dyn FnMut() + '_>> = vec![
            Box::new(|| drop(grouped_matmul(x.clone(), w.clone(), offsets.clone()))),
            Box::new(|| drop(x.clone().matmul(dense_w.clone()))),
            Box::new(|| drop(x_batched.clone().matmul(w.clone()))),
            Box::new(|| {
                drop(grouped_matmul(
                    g.clone(),
                    w.clone().swap_dims(1, 2),
                    offsets.clone(),
                ))
            }),
            Box::new(|| drop(g.clone().matmul(dense_w.clone().transpose()))),
            Box::new(|| drop(g_batched.clone().matmul(w.clone().swap_dims(1, 2)))),
            Box::new(|| drop(grouped_weight_grad(x.clone(), g.clone(), offsets.clone()))),
            Box::new(|| drop(x.clone().transpose().matmul(g.clone()))),
            Box::new(|| drop(x_batched.clone().swap_dims(1, 2).matmul(g_batched.clone()))),
        ];
        let seconds = interleaved_median_seconds(device, warmup, repeats, &mut works);
        let flops = 2.0 * s as f64 * k as f64 * n as f64;
        let products = [Product::Forward, Product::InputGrad, Product::WeightGrad];
        for (product, sides) in products.into_iter().zip(seconds.chunks(3)) {
            let (grouped, matmul, batched) = (sides[0], sides[1], sides[2]);
            rows.push(GroupedRow {
                shape,
                product,
                dtype: format!("{dtype:?}").to_lowercase(),
                grouped_seconds: grouped,
                matmul_seconds: matmul,
                batched_seconds: batched,
                grouped_gflops: flops / grouped / 1e9,
                matmul_gflops: flops / matmul / 1e9,
                ratio: matmul / grouped,
                batched_ratio: matmul / batched,
            });
        }
    }
    rows
}

/// Prints W7's rows as a table.
pub fn print(rows: &[GroupedRow]) {
    println!(
        "{:<18} {:>6} {:>5} {:>5} {:>4} {:<11} {:<5} {:>9} {:>9} {:>8} {:>8} {:>6} {:>8}",
        "shape",
        "S",
        "K",
        "N",
        "E",
        "product",
        "dtype",
        "ms",
        "matmul",
        "GFLOP/s",
        "matmul",
        "ratio",
        "batched"
    );
    for row in rows {
        let product = match row.product {
            Product::Forward => "forward",
            Product::InputGrad => "input grad",
            Product::WeightGrad => "weight grad",
        };
        println!(
            "{:<18} {:>6} {:>5} {:>5} {:>4} {:<11} {:<5} {:>9.2} {:>9.2} {:>8.1} {:>8.1} {:>6.2} {:>8.2}",
            row.shape.name,
            row.shape.rows,
            row.shape.inner,
            row.shape.columns,
            row.shape.experts,
            product,
            row.dtype,
            row.grouped_seconds * 1e3,
            row.matmul_seconds * 1e3,
            row.grouped_gflops,
            row.matmul_gflops,
            row.ratio,
            row.batched_ratio
        );
    }
}

/// The geometric mean of the rows' grouped ratios (1.0 for none).
pub fn mean_ratio(rows: &[GroupedRow]) -> f64 {
    geometric_mean(rows.iter().map(|row| row.ratio))
}

/// The geometric mean of the rows' batched ratios (1.0 for none).
pub fn mean_batched_ratio(rows: &[GroupedRow]) -> f64 {
    geometric_mean(rows.iter().map(|row| row.batched_ratio))
}

fn geometric_mean(values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let count = values.len();
    if count == 0 {
        return 1.0;
    }
    (values.map(f64::ln).sum::<f64>() / count as f64).exp()
}
