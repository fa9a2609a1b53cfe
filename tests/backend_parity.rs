//! Backend parity: the same weights and input on ndarray (the reference) and on flex and wgpu
//! give the same outputs, auxiliary losses, routing decisions and gradients (the cases and the
//! comparison: `burn_moe::parity`), and the Hugging Face fixtures give transformers' logits.
//!
//! This test has its own runner (`harness = false`) so that it can say, unconditionally, which
//! backends it ran and which it skipped and why. With `BURN_MOE_REQUIRE_WGPU=1` (set by
//! `.ci/run` once it has installed a software Vulkan driver), a missing wgpu device fails the
//! run instead of being skipped.

use burn::tensor::{Device, Tensor};
use burn_moe::parity;

/// A Hugging Face fixture (`tests/fixtures/hf`) loaded on `device`: its logits against those
/// transformers computed for the same tokens, within 1e-4 (the CPU backends are checked in
/// moe-models' tests).
fn compare_hf_fixture(arch: burn_moe::models::hf::HfArchitecture, device: &Device) {
    use burn_store::{bridge, ModuleStore, SafetensorsStore};
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(arch.model_type());
    let mut store = SafetensorsStore::from_file(folder.join("expected.safetensors"));
    let mut read = |name: &str| bridge::to_data(store.get_tensor(name).unwrap().unwrap()).unwrap();
    let ids = read("input_ids").convert::<i64>();
    let expected = read("logits").try_to_vec::<f32>().unwrap();
    let model = burn_moe::models::hf::load(&folder, device).unwrap().model;
    let length = ids.shape()[1];
    let tokens = Tensor::<2, burn::tensor::Int>::from_data(ids, device);
    let logits = model.forward(tokens).logits;
    assert_eq!(logits.dims()[1], length);
    let ours = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let diff = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "logits differ from transformers' by {diff}");
}

/// A Hugging Face fixture with its weights held in `storage` (8 or 4 bits; embeddings f32) on
/// `device` gives the logits of the same held model on flex, within 1e-4: the same rounded
/// values, stored a byte each on flex and packed into u32 words on wgpu, through Burn's
/// quantized kernels and our frozen products.
fn compare_held_hf_fixture(
    arch: burn_moe::models::hf::HfArchitecture,
    storage: burn_moe::models::hf::Storage,
    device: &Device,
) {
    use burn::tensor::DType;
    use burn_moe::models::hf::{self, StorageOptions};
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(arch.model_type());
    let options = StorageOptions {
        weights: storage,
        embeddings: Some(hf::Storage::F32),
    };
    let logits = |device: &Device| {
        let model = hf::load_with(&folder, device, &options).unwrap().model;
        let moe = model.stack.blocks.iter().find_map(|b| b.ffn.moe.as_ref());
        let w_in = moe.expect("an MoE layer").experts.w_in.val();
        let store = burn_moe::kernels::quant_store(device);
        assert!(
            matches!(w_in.dtype(), DType::QFloat(scheme) if Some(scheme.store) == store),
            "the experts are held in {storage} stored as {store:?}, not {:?}",
            w_in.dtype()
        );
        let ids: Vec<i64> = (1..=12).collect();
        let tokens = Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids, [1, 12]),
            device,
        );
        model
            .forward(tokens)
            .logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (ours, flex) = (logits(device), logits(&Device::flex()));
    let diff = ours
        .iter()
        .zip(&flex)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "logits differ from flex's by {diff}");
}

fn main() {
    #[allow(deprecated)]
    let reference = Device::ndarray();
    let require_wgpu = std::env::var("BURN_MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1");
    let mut backends: Vec<(&str, Result<Device, String>)> = vec![("flex", Ok(Device::flex()))];
    match burn_moe::train::runtime::backend::any_wgpu() {
        Ok(selected) => {
            println!("wgpu device: {}", selected.adapter);
            backends.push(("wgpu", Ok(selected.device)));
        }
        Err(error) => backends.push(("wgpu", Err(error.to_string()))),
    }

    let cases = parity::cases();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (backend, device) in &backends {
        let device = match device {
            Ok(device) => device,
            Err(reason) => {
                println!(
                    "backend parity on {backend}: SKIPPED ({} cases): {reason}",
                    cases.len()
                );
                skipped += cases.len();
                if require_wgpu {
                    println!("BURN_MOE_REQUIRE_WGPU=1: a missing wgpu device is a failure");
                    failed += 1;
                }
                continue;
            }
        };
        let mut results = parity::run(&reference, device);
        for arch in burn_moe::models::hf::HfArchitecture::ALL {
            results.push((
                format!(
                    "{} fixture, logits against transformers'",
                    arch.class_name()
                ),
                parity::catching(|| compare_hf_fixture(arch, device)),
            ));
            for storage in [
                burn_moe::models::hf::Storage::Q8,
                burn_moe::models::hf::Storage::Q4,
            ] {
                results.push((
                    format!(
                        "{} fixture held in {storage}, logits against flex's",
                        arch.class_name()
                    ),
                    parity::catching(|| compare_held_hf_fixture(arch, storage, device)),
                ));
            }
        }
        for (name, result) in results {
            match result {
                Ok(()) => {
                    println!("test {backend} vs ndarray: {name} ... ok");
                    passed += 1;
                }
                Err(message) => {
                    println!("test {backend} vs ndarray: {name} ... FAILED: {message}");
                    failed += 1;
                }
            }
        }
    }
    println!("backend parity: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}
