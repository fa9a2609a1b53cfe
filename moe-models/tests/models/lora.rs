//! LoRA fine-tuning of the Hugging Face fixtures: adapter counts against the config's formula,
//! a fresh adapter leaving transformers' logits alone, trained adapters against their merge,
//! the cache and a save-and-load of the adapters alone.

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::lora::{self, LoraConfig, LoraTarget};
use moe_models::hf::{self, HfArchitecture};
use moe_models::{KvCache, MoeTransformer};

use crate::common::{cpu, values};
use crate::hf::{expected, fixture};
use moe_kernels::testing::max_difference;

fn ids_tensor(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn logits(model: &MoeTransformer, ids: &[i64], device: &Device) -> Vec<f64> {
    values(model.forward(ids_tensor(ids, device)).logits)
}

fn every_target(rank: usize) -> LoraConfig {
    LoraConfig::new(rank).with_targets(LoraTarget::ALL.to_vec())
}

#[test]
fn adapter_parameters_match_the_config_formula() {
    let device = cpu();
    let subsets = [
        vec![LoraTarget::Attention],
        vec![LoraTarget::Router],
        vec![LoraTarget::Experts],
        LoraTarget::ALL.to_vec(),
    ];
    for arch in HfArchitecture::ALL {
        let loaded = hf::load(&fixture(arch), &device).unwrap();
        for targets in &subsets {
            let config = LoraConfig::new(3).with_targets(targets.clone());
            let model = loaded.model.clone().with_lora(&config).unwrap();
            assert_eq!(
                lora::adapter_params(&model),
                loaded.model.config().decoder.lora_params(&config),
                "{arch:?}, {targets:?}"
            );
        }
    }
}

/// The fixture with adapters on every target, trained for a few AdamW steps on its own tokens
/// so that the adapters are not zero; with the tokens and the untouched model.
fn trained(arch: HfArchitecture) -> (MoeTransformer, MoeTransformer, Vec<i64>) {
    let device = cpu().autodiff();
    device.seed(3);
    let base = hf::load(&fixture(arch), &device).unwrap().model;
    let mut model = base.clone().with_lora(&every_target(4)).unwrap();
    let (ids, _) = expected(arch);
    let inputs = ids_tensor(&ids[..ids.len() - 1], &device);
    let targets = ids_tensor(&ids[1..], &device);
    let mask = targets.clone().greater_equal_elem(0);
    let mut optim = AdamWConfig::new().init();
    for _ in 0..3 {
        let out = model.loss(inputs.clone(), targets.clone(), mask.clone());
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    (model.valid(), base.valid(), ids)
}

#[test]
fn fresh_adapters_leave_transformers_logits_alone() {
    let device = cpu();
    for arch in HfArchitecture::ALL {
        let (ids, reference) = expected(arch);
        let model = hf::load(&fixture(arch), &device)
            .unwrap()
            .model
            .with_lora(&every_target(4))
            .unwrap();
        let reference: Vec<f64> = reference.into_iter().map(f64::from).collect();
        let diff = max_difference(&logits(&model, &ids, &device), &reference);
        assert!(diff < 1e-4, "{arch:?}: {diff}");
    }
}

#[test]
fn trained_adapters_equal_their_merge_and_leave_the_base_alone() {
    let device = cpu();
    for arch in HfArchitecture::ALL {
        let (model, base, ids) = trained(arch);
        let adapted = logits(&model, &ids, &device);
        let before = logits(&base, &ids, &device);
        assert!(
            max_difference(&adapted, &before) > 1e-3,
            "{arch:?}: three steps changed nothing"
        );
        // The frozen weights did not move.
        let block = &model.stack.blocks[0];
        assert_eq!(
            values(block.attention.query.weight.base()),
            values(base.stack.blocks[0].attention.query.weight.val()),
            "{arch:?}: a frozen weight changed"
        );
        // Our forward passes compute `x W_0 + s (x A) B`; the merge forms `W_0 + s A B`.
        let merged = model.clone().materialize();
        assert_eq!(lora::adapter_count(&merged), 0);
        let diff = max_difference(&logits(&merged, &ids, &device), &adapted);
        assert!(diff < 1e-4, "{arch:?}: merged logits differ by {diff}");

        // Decoding the second half against the cache of the first gives the same rows.
        let split = ids.len() / 2;
        let mut cache = KvCache::new();
        let _ = model.forward_cached(ids_tensor(&ids[..split], &device), &mut cache);
        let rest = values(
            model
                .forward_cached(ids_tensor(&ids[split..], &device), &mut cache)
                .logits,
        );
        let vocab = adapted.len() / ids.len();
        let diff = max_difference(&rest, &adapted[split * vocab..]);
        assert!(diff < 1e-4, "{arch:?}: cached rows differ by {diff}");
    }
}

#[test]
fn adapters_saved_alone_load_onto_the_base() {
    let device = cpu();
    let arch = HfArchitecture::Qwen2Moe;
    let (model, _, ids) = trained(arch);
    let record = model.clone().into_record_group(lora::adapter_group());
    assert_eq!(record.len(), 2 * lora::adapter_count(&model));
    let bytes = record.into_bytes().unwrap();
    let all = model.clone().into_record().into_bytes().unwrap();
    assert!(
        bytes.len() * 5 < all.len(),
        "the adapters ({} bytes) are a small part of the model ({} bytes)",
        bytes.len(),
        all.len()
    );

    let fresh = hf::load(&fixture(arch), &device)
        .unwrap()
        .model
        .with_lora(&every_target(4))
        .unwrap();
    let record = burn::store::ModuleRecord::from_bytes(bytes)
        .unwrap()
        .allow_partial(true);
    let loaded = fresh.try_load_record(record).unwrap();
    let diff = max_difference(
        &logits(&loaded, &ids, &device),
        &logits(&model, &ids, &device),
    );
    assert!(diff < 1e-6, "reloaded adapters give logits {diff} away");
}
