//! A block-quantized weight read back in f32, for the products that use it.
//!
//! A weight held in 8 or 4 bits (`moe_models::storage`) is dequantized at each use:
//! `x = m s_b q`, with `q` the stored integer, `s_b` the scale of its block and `m` the
//! per-tensor scale of a two-level scheme (1 otherwise). Burn's cube backends do it in a
//! kernel. Burn 0.22.1's flex backend does it on one thread, finding each value's block with
//! a division per axis (about 0.1 s per million values here, minutes per token for a 7 B
//! model); on flex this reads the values and scales once and multiplies them on every core, in
//! the same order of operations, so the result is the same to the bit.
//!
//! A grouped product needs only the experts that received rows: [`dequantize_experts`] reads
//! those alone (decoding a token routes to 8 of OLMoE's 64 experts).

use burn::tensor::quantization::{QuantScheme, QuantStore, QuantizedBytes};
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

/// `tensor` in `dtype`: dequantized when it is quantized, then cast where the types differ,
/// the tensor itself where they do not (a cast to its own type would still add a node to the
/// autodiff graph and an operation to fusion's queue). The cast is differentiable.
pub fn in_dtype<const D: usize>(tensor: Tensor<D>, dtype: DType) -> Tensor<D> {
    let tensor = dequantize(tensor);
    if tensor.dtype() == dtype {
        tensor
    } else {
        tensor.cast(dtype)
    }
}

/// Experts `experts` (indices along the first axis, in order) of the stack `w: [E, K, N]` in
/// `dtype`, `[experts.len(), K, N]`: on flex a quantized stack dequantizes those experts'
/// values alone; elsewhere, and for float stacks, a `select` then [`in_dtype`].
pub fn dequantize_experts(w: Tensor<3>, experts: &[usize], dtype: DType) -> Tensor<3> {
    if let DType::QFloat(scheme) = w.dtype() {
        if let (true, Some(run)) = (on_flex(&w), trailing_block(&scheme, &w.shape())) {
            return in_dtype(experts_on_host(w, experts, run), dtype);
        }
    }
    let indices: Vec<i64> = experts.iter().map(|&e| e as i64).collect();
    let count = indices.len();
    let indices =
        Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(indices, [count]), &w.device());
    in_dtype(w.select(0, indices), dtype)
}

/// Whether `tensor` lives on the flex backend.
pub(crate) fn on_flex<const D: usize>(tensor: &Tensor<D>) -> bool {
    is_flex(&tensor.device())
}

/// How `device` holds values quantized to 8 or 4 bits, `None` where our products cannot read
/// them: one value a byte on flex (the only form Burn 0.22.1's flex backend stores), packed
/// into u32 words (4 or 8 values a word, along the last axis) on a cube device such as wgpu
/// (the only form Burn's cube kernels read).
pub fn quant_store(device: &burn::tensor::Device) -> Option<QuantStore> {
    if is_flex(device) {
        Some(QuantStore::Native)
    } else {
        crate::adapter::compiler(device).map(|_| QuantStore::PackedU32(0))
    }
}

/// Whether `device` is a flex device.
fn is_flex(device: &burn::tensor::Device) -> bool {
    #[cfg(feature = "flex")]
    {
        let device = device.clone().inner();
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// The length of the runs of consecutive values that share a scale under `scheme` for a
/// tensor of `shape`: the whole tensor for a per-tensor scale, the block's extent for blocks
/// along the last axis only that divide it; `None` for any other block shape.
pub(crate) fn trailing_block(scheme: &QuantScheme, shape: &Shape) -> Option<usize> {
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

/// The values and the combined scales (`m s_b`, one per run of `run` values) of a quantized
/// tensor, read to the host.
fn read_quantized<const D: usize>(tensor: Tensor<D>) -> (Vec<i8>, Vec<f32>) {
    let shape = tensor.shape();
    let data = tensor.into_data();
    let DType::QFloat(scheme) = data.dtype() else {
        unreachable!("a quantized tensor reads back as quantized data")
    };
    let bytes = QuantizedBytes {
        bytes: data.into_bytes(),
        scheme,
        shape,
    };
    let (values, scales) = bytes.into_vec_i8();
    let multiplier = scales.global.unwrap_or(1.0);
    let scales = scales.block.iter().map(|&s| multiplier * s).collect();
    (values, scales)
}

/// `scale * q` for each value, `run` consecutive values per scale, on every core.
pub(crate) fn dequantized(values: &[i8], scales: &[f32], run: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    // Chunks of whole runs, about 64 K values each.
    let chunk = run * (65_536 / run).max(1);
    out.par_chunks_mut(chunk)
        .zip(values.par_chunks(chunk))
        .enumerate()
        .for_each(|(index, (out, values))| {
            let first_run = index * chunk / run;
            for (r, (out, values)) in out.chunks_mut(run).zip(values.chunks(run)).enumerate() {
                let scale = scales[first_run + r];
                for (o, &q) in out.iter_mut().zip(values) {
                    *o = scale * q as f32;
                }
            }
        });
    out
}

/// Dequantizes on the host, `run` consecutive values per scale.
fn on_host<const D: usize>(tensor: Tensor<D>, run: usize) -> Tensor<D> {
    let (device, shape) = (tensor.device(), tensor.shape());
    let (values, scales) = read_quantized(tensor);
    let out = dequantized(&values, &scales, run);
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// Experts `experts` of the quantized stack `w`, dequantized on the host (`run` divides one
/// expert's values, so each expert's scales are a slice of the tensor's).
fn experts_on_host(w: Tensor<3>, experts: &[usize], run: usize) -> Tensor<3> {
    let (device, [_, k, n]) = (w.device(), w.dims());
    let (values, scales) = read_quantized(w);
    let size = k * n;
    let mut out = Vec::with_capacity(experts.len() * size);
    for &e in experts {
        let range = e * size..(e + 1) * size;
        let scales = &scales[range.start / run..range.end.div_ceil(run)];
        out.extend(dequantized(&values[range], scales, run));
    }
    Tensor::from_data(TensorData::new(out, [experts.len(), k, n]), &device)
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::quantization::{QuantValue, ScaleDtype};
    use burn::tensor::{Device, Distribution};

    fn block_scheme(value: QuantValue) -> QuantScheme {
        QuantScheme::default()
            .with_value(value)
            .per_block([8], ScaleDtype::F32)
    }

    /// The host path against Burn's own dequantization, bit for bit, for per-block scales
    /// (blocks of 8 along the last axis, a shape off any tile) and one scale per tensor.
    #[test]
    fn the_host_path_gives_burns_values_to_the_bit() {
        let device = Device::flex();
        let weight = Tensor::<3>::random([3, 5, 24], Distribution::Normal(0.0, 0.1), &device);
        for value in [QuantValue::Q8S, QuantValue::Q4S] {
            let block = block_scheme(value);
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
        // Experts 2 and 0 of the stack, alone, are those experts of the whole.
        let quantized = weight
            .clone()
            .quantize_dynamic(&block_scheme(QuantValue::Q4S));
        let picked = dequantize_experts(quantized.clone(), &[2, 0], DType::F32).into_data();
        let whole = quantized.dequantize();
        let expected = Tensor::cat(
            vec![whole.clone().narrow(0, 2, 1), whole.narrow(0, 0, 1)],
            0,
        );
        assert_eq!(picked.as_bytes(), expected.into_data().as_bytes());
        // A float tensor passes through.
        let same = dequantize(weight.clone()).into_data();
        assert_eq!(same.as_bytes(), weight.into_data().as_bytes());
    }
}
