//! flex's dropout mask: one pass of counter-based draws ([`crate::counter_rng`]), split over
//! the cores with rayon (each chunk knows its first index, so the mask does not depend on how
//! the work is split) and vectorised.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use crate::counter_rng::{draw, drop_threshold};
use crate::dropout::DropoutBackend;

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

impl DropoutBackend for Flex {
    fn dropout_mask(x: FlexTensor, key: FlexTensor, prob: f64) -> FlexTensor {
        let key = stream_key(key);
        let threshold = drop_threshold(prob);
        let scale = 1.0 / (1.0 - prob);
        let shape = x.shape();
        let len = shape.num_elements();
        match x.dtype() {
            DType::F32 => {
                let mut mask = vec![0.0f32; len];
                fill(&mut mask, |start, chunk| {
                    mask_f32(start, key, threshold, scale as f32, chunk)
                });
                FlexTensor::from_data(TensorData::new(mask, shape))
            }
            dtype => {
                let mut mask = vec![0.0f64; len];
                fill(&mut mask, |start, chunk| {
                    mask_f64(start, key, threshold, scale, chunk)
                });
                let mask = FlexTensor::from_data(TensorData::new(mask, shape));
                if dtype == DType::F64 {
                    mask
                } else {
                    // Half precisions: drawn in f64, stored in the tensor's own dtype.
                    <Flex as burn::backend::ops::FloatTensorOps<Flex>>::float_cast(
                        mask,
                        dtype.into(),
                    )
                }
            }
        }
    }
}

/// The stream's key from the two uniform numbers in `[0, 1)` of `key`.
fn stream_key(key: FlexTensor) -> [u32; 2] {
    let key = key.into_data();
    let mut words = key
        .iter::<f64>()
        .map(|uniform| (uniform * 4_294_967_296.0) as u32);
    [words.next().unwrap_or(0), words.next().unwrap_or(0)]
}

/// Runs `kernel(first index, chunk)` over `mask` in parallel chunks.
fn fill<E: Send>(mask: &mut [E], kernel: impl Fn(usize, &mut [E]) + Sync) {
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| kernel(chunk * CHUNK, out));
}

vectorised! {
    /// `out[j] = scale` if draw `start + j` is kept, else `0`.
    fn mask_f32(start: usize, key: [u32; 2], threshold: u32, scale: f32, out: &mut [f32]) {
        for (j, out) in out.iter_mut().enumerate() {
            let kept = draw((start + j) as u32, key) >= threshold;
            *out = if kept { scale } else { 0.0 };
        }
    }
}

/// `out[j] = scale` if draw `start + j` is kept, else `0`.
fn mask_f64(start: usize, key: [u32; 2], threshold: u32, scale: f64, out: &mut [f64]) {
    for (j, out) in out.iter_mut().enumerate() {
        let kept = draw((start + j) as u32, key) >= threshold;
        *out = if kept { scale } else { 0.0 };
    }
}
