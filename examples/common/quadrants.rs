//! The toy task of the layer examples: `y = A_q x` with `q` the quadrant of `(x0, x1)`, four
//! linear maps that four experts can learn one each, once the router sends each quadrant to
//! its own expert.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use burn_moe::core::rng::SplitMix64;
use burn_moe::core::Moe;

/// Width of `x` and `y`.
pub const D: usize = 8;
/// Rows per batch.
pub const BATCH: usize = 256;

/// The four maps `A_q`, `[D * D]` each, drawn from `rng`.
pub fn maps(rng: &mut SplitMix64) -> Vec<Vec<f32>> {
    (0..4)
        .map(|_| (0..D * D).map(|_| rng.uniform() as f32).collect())
        .collect()
}

/// A batch `(x, y)`, `[BATCH, D]` each.
pub fn batch(rng: &mut SplitMix64, maps: &[Vec<f32>], device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut x = Vec::with_capacity(BATCH * D);
    let mut y = Vec::with_capacity(BATCH * D);
    for _ in 0..BATCH {
        let row: Vec<f32> = (0..D).map(|_| rng.uniform() as f32).collect();
        let quadrant = usize::from(row[0] > 0.0) * 2 + usize::from(row[1] > 0.0);
        let map = &maps[quadrant];
        for i in 0..D {
            y.push((0..D).map(|j| map[i * D + j] * row[j]).sum());
        }
        x.extend(row);
    }
    let tensor = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [BATCH, D]), device);
    (tensor(x), tensor(y))
}

/// A user's model that holds the MoE layer.
#[derive(Module, Debug)]
pub struct Regressor {
    /// The layer.
    pub moe: Moe,
}
