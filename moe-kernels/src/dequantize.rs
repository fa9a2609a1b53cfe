//! A block-quantized weight read back in f32, for the products that use it.
//!
//! A weight held in 8 or 4 bits (`moe_models::storage`) is dequantized at each use:
//! `x = m s_b q`, with `q` the stored integer, `s_b` the scale of its block and `m` the
//! per-tensor scale of a two-level scheme (1 otherwise). Burn's cube backends do it in a
//! kernel. Burn 0.22.1's flex backend does it on one thread, finding each value's block with
//! a division per axis (about 0.1 s per million values here, minutes per token for a 7 B
//! model); on flex this reads the values and scales once and multiplies them on every core, in
//! the same order of operations, so the result is the same to the bit.

use burn::tensor::quantization::{QuantScheme, QuantizedBytes};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use rayon::prelude::*;

/// `tensor` in f32 (the device's float type): dequantized when it is quantized, itself
/// otherwise.
pub fn dequantize<const D: usize>(tensor: Tensor<D>) -> Tensor<D> {
    let DType::QFloat(scheme) = tensor.dtype() else {
        return tensor;
    };
    match (on_flex(&tensor), trailing_block(&scheme, &tensor.shape())) {
        (true, Some(block)) => on_host(tensor, block),
        _ => tensor.dequantize(),
    }
}

/// Whether `tensor` lives on the flex backend.
fn on_flex<const D: usize>(tensor: &Tensor<D>) -> bool {
    #[cfg(feature = "flex")]
    {
        let device = tensor.device().inner();
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = tensor;
        false
    }
}

/// The length of the runs of consecutive values that share a scale under `scheme` for a
/// tensor of `shape`: the whole tensor for a per-tensor scale, the block's extent for blocks
/// along the last axis only that divide it; `None` for any other block shape.
fn trailing_block(scheme: &QuantScheme, shape: &Shape) -> Option<usize> {
    let dims = shape.as_slice();
    let Some(block) = scheme.block_size() else {
        return Some(shape.num_elements().max(1));
    };
    let extents = block.to_dim_vec(dims.len());
    let (last, leading) = extents.split_last()?;
    let last = *last as usize;
    let divides = dims.last().is_some_and(|&n| n.is_multiple_of(last));
    (leading.iter().all(|&e| e == 1) && divides && last > 0).then_some(last)
}

/// Dequantizes on the host, `run` consecutive values per scale, on every core.
fn on_host<const D: usize>(tensor: Tensor<D>, run: usize) -> Tensor<D> {
    let device = tensor.device();
    let shape = tensor.shape();
    let data = tensor.into_data();
    let DType::QFloat(scheme) = data.dtype() else {
        unreachable!("a quantized tensor reads back as quantized data")
    };
    let bytes = QuantizedBytes {
        bytes: data.into_bytes(),
        scheme,
        shape: shape.clone(),
    };
    let (values, scales) = bytes.into_vec_i8();
    let multiplier = scales.global.unwrap_or(1.0);
    let mut out = vec![0.0f32; values.len()];
    // Chunks of whole runs, about 64 K values each.
    let chunk = run * (65_536 / run).max(1);
    out.par_chunks_mut(chunk)
        .zip(values.par_chunks(chunk))
        .enumerate()
        .for_each(|(index, (out, values))| {
            let first_run = index * chunk / run;
            for (r, (out, values)) in out.chunks_mut(run).zip(values.chunks(run)).enumerate() {
                let scale = multiplier * scales.block[first_run + r];
                for (o, &q) in out.iter_mut().zip(values) {
                    *o = scale * q as f32;
                }
            }
        });
    Tensor::from_data(TensorData::new(out, shape), &device)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::quantization::{QuantValue, ScaleDtype};
    use burn::tensor::{Device, Distribution};

    /// The host path against Burn's own dequantization, bit for bit, for per-block scales
    /// (blocks of 8 along the last axis, a shape off any tile) and one scale per tensor.
    #[test]
    fn the_host_path_gives_burns_values_to_the_bit() {
        let device = Device::flex();
        let weight = Tensor::<3>::random([3, 5, 24], Distribution::Normal(0.0, 0.1), &device);
        for value in [QuantValue::Q8S, QuantValue::Q4S] {
            let block = QuantScheme::default()
                .with_value(value)
                .per_block([8], ScaleDtype::F32);
            let tensor = QuantScheme::default()
                .with_value(value)
                .per_tensor(ScaleDtype::F32);
            for scheme in [block, tensor] {
                let quantized = weight.clone().quantize_dynamic(&scheme);
                let ours = dequantize(quantized.clone()).into_data();
                let burns = quantized.dequantize().into_data();
                assert_eq!(ours.dtype(), DType::F32);
                assert_eq!(ours.as_bytes(), burns.as_bytes(), "{scheme:?}");
            }
        }
        // A float tensor passes through.
        let same = dequantize(weight.clone()).into_data();
        assert_eq!(same.as_bytes(), weight.into_data().as_bytes());
    }
}
