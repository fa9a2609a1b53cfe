//! f16 on wgpu: where the adapter has `shader-f16`, the layer runs in f16 and matches the f32
//! result within an f16 tolerance; where it has not, the backend chooser refuses with a clear
//! message. Its own process (`harness = false`), because a device's float type is set once.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use burn_moe::core::reference::{host, random_values};
use burn_moe::core::{
    CapacityConfig, ExpertConfig, ExpertKind, GateConfig, MoeConfig, RoutingMode,
};
use burn_moe::train::backend::{select, Backend, BackendError, Precision};

fn main() {
    let require_wgpu = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    let selected = match select(Backend::Wgpu, Precision::F16) {
        Ok(selected) => selected,
        Err(BackendError::NoF16 { device }) => {
            // The refusal itself is what this adapter should get: check its message.
            let message = select(Backend::Wgpu, Precision::F16)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains("shader-f16") && message.contains("--precision f32"),
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

        // The same weights, cast to f16 on load.
        let half = config
            .init(&selected.device)
            .unwrap()
            .load_record(moe.clone().into_record().cast_to_module_dtype());
        let output = half
            .forward_with_mode(input(&selected.device), RoutingMode::Eval)
            .output;
        assert_eq!(
            output.dtype(),
            burn::tensor::DType::F16,
            "{name}: output is not f16"
        );
        let actual = host(output);
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = actual
            .iter()
            .zip(&expected)
            .map(|(a, e)| (a - e).abs())
            .fold(0f64, f64::max);
        // f16 has an 11-bit mantissa (relative precision 4.9e-4); a few roundings per element.
        assert!(
            worst <= 1e-2 * scale,
            "{name}: f16 differs from f32 by {worst} (scale {scale})"
        );
        println!("test wgpu f16: {name} ... ok (largest difference {worst:.2e}, scale {scale:.2})");
    }
}
