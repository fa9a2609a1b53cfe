//! Mixed f16 on wgpu: where the adapter has `shader-f16`, the layer with f32 weights computes
//! f16 tokens in f16 and matches the f32 result within an f16 tolerance, and the gradient of
//! its weights comes back in f32 close to the f32 model's; where the adapter has no f16, the
//! backend chooser refuses with a clear message, and bf16 is either computed or refused naming
//! what is missing (the compiler or the adapter's arithmetic). Its own process
//! (`harness = false`).

use burn::module::Module;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use burn_moe::core::reference::{host, random_values};
use burn_moe::core::{
    CapacityConfig, ExpertConfig, ExpertKind, GateConfig, Moe, MoeConfig, RoutingMode,
};
use burn_moe::train::runtime::backend::{select, BackendChoice, BackendError, Precision};

fn main() {
    let require_wgpu = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    bf16_is_refused_by_name_or_computes();
    let selected = match select(BackendChoice::Wgpu, Precision::F16) {
        Ok(selected) => selected,
        Err(BackendError::NoHalfPrecision { device, .. }) => {
            // The refusal itself is what this adapter should get: check its message.
            let message = select(BackendChoice::Wgpu, Precision::F16)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains("no shader f16") && message.contains("--precision f32"),
                "{message}"
            );
            println!("wgpu f16: SKIPPED: {device} has no shader-f16; the chooser says: {message}");
            return;
        }
        Err(error) => {
            println!("wgpu f16: SKIPPED: {error}");
            if require_wgpu {
                println!("BURN_MOE_REQUIRE_WGPU=1: a missing wgpu device is a failure");
                std::process::exit(1);
            }
            return;
        }
    };
    println!("wgpu f16 on {}", selected.adapter);

    let (tokens, d_model) = (32, 16);
    #[allow(deprecated)]
    let reference = Device::ndarray();
    for (name, gate, top_k, kind) in [
        (
            "softmax top-2, FFN",
            GateConfig::softmax_top_k(),
            2,
            ExpertKind::Ffn(burn_moe::core::Activation::Gelu),
        ),
        (
            "switch, SwiGLU",
            GateConfig::switch(),
            1,
            ExpertKind::SwiGlu,
        ),
    ] {
        let config = MoeConfig::new(d_model, 4, ExpertConfig::new(32).with_kind(kind))
            .with_top_k(top_k)
            .with_gate(gate)
            .with_capacity(CapacityConfig::dropless());
        reference.seed(3);
        let moe = config.init(&reference).unwrap();
        let x = random_values(tokens * d_model, 8);
        let input = |device: &Device| {
            Tensor::<2>::from_data(TensorData::new(x.clone(), [tokens, d_model]), device)
        };
        let expected = host(
            moe.forward_with_mode(input(&reference), RoutingMode::Eval)
                .output,
        );

        // Mixed precision: the same f32 weights on wgpu, the tokens in f16.
        let mixed = moe.clone().to_device(&selected.device);
        let output = mixed
            .forward_with_mode(
                input(&selected.device).cast(FloatDType::F16),
                RoutingMode::Eval,
            )
            .output;
        assert_eq!(output.dtype(), DType::F16, "{name}: output is not f16");
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = largest_difference(&host(output), &expected);
        // f16 has an 11-bit mantissa (relative precision 4.9e-4); a few roundings per element.
        assert!(
            worst <= 1e-2 * scale,
            "{name}: f16 differs from f32 by {worst} (scale {scale})"
        );

        // The gradient reaches the f32 master weights in f32, close to the f32 model's.
        let weight_gradient = |moe: Moe, device: &Device, dtype: FloatDType| {
            let device = device.clone().autodiff();
            let moe = moe.to_device(&device).train();
            let output = moe
                .forward_with_mode(input(&device).cast(dtype), RoutingMode::Eval)
                .output;
            let grads = output.cast(FloatDType::F32).sum().backward();
            moe.experts
                .w_in
                .val()
                .grad(&grads)
                .expect("w_in has a gradient")
        };
        let expected_grad = host(weight_gradient(moe.clone(), &reference, FloatDType::F32));
        let grad = weight_gradient(moe.clone(), &selected.device, FloatDType::F16);
        assert_eq!(
            grad.dtype(),
            DType::F32,
            "{name}: the master gradient is not f32"
        );
        let grad_scale = expected_grad.iter().fold(0f64, |m, v| m.max(v.abs()));
        let grad_worst = largest_difference(&host(grad), &expected_grad);
        assert!(
            grad_worst <= 1e-2 * grad_scale,
            "{name}: the f16 gradient differs from f32's by {grad_worst} (scale {grad_scale})"
        );
        println!(
            "test wgpu f16: {name} ... ok (largest difference {worst:.2e}, scale {scale:.2}; \
             w_in gradient {grad_worst:.2e}, scale {grad_scale:.2})"
        );
    }
}

/// The largest absolute difference between two equally long slices.
fn largest_difference(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0f64, f64::max)
}

/// bf16 on the wgpu adapter: where the chooser accepts it, a tensor computes in it; where it
/// refuses, the message names what is missing: Burn's vulkan or metal compiler (WGSL has no
/// bf16), or bf16 arithmetic on the adapter.
fn bf16_is_refused_by_name_or_computes() {
    match select(BackendChoice::Wgpu, Precision::Bf16) {
        Ok(selected) => {
            let x =
                Tensor::<1>::from_data(TensorData::new(vec![1.5f32, -2.25], [2]), &selected.device)
                    .cast(FloatDType::BF16);
            let doubled = (x.clone() + x).cast(FloatDType::F32);
            assert_eq!(
                doubled.into_data().try_to_vec::<f32>().unwrap(),
                vec![3.0, -4.5]
            );
            println!("wgpu bf16: computes on {}", selected.adapter);
        }
        Err(BackendError::NoHalfPrecision { device, why, .. }) => {
            let named = why.contains("bf16 needs Burn's vulkan or metal compiler")
                || why.contains("no bf16 arithmetic");
            assert!(named, "{why}");
            println!("wgpu bf16: refused on {device}: {why}");
        }
        Err(error) => println!("wgpu bf16: SKIPPED: {error}"),
    }
}
