//! LoRA adapters in PEFT's form against PEFT itself: the fixtures of `tests/fixtures/hf/peft`
//! were written by peft 0.22 (random factors on the attention projections, routers, fused
//! expert parameters, shared experts, dense layers and `shared_expert_gate`, one of them with
//! per-module ranks and alphas), with the logits PEFT's adapted model gives.

use std::path::PathBuf;

use burn::tensor::Device;
use moe_core::lora::{self, LoraConfig, LoraTarget};
use moe_models::hf::peft;
use moe_models::hf::{self, HfArchitecture};
use moe_models::MoeTransformer;

use crate::common::cpu;
use crate::hf::{expected, fixture, logits};
use moe_kernels::testing::max_difference;

/// The f32 tensor `name` of the safetensors file `path` (the expected logits).
fn read_f32(path: &std::path::Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn peft_fixture(arch: HfArchitecture) -> PathBuf {
    fixture(arch).join("../peft").join(arch.model_type())
}

/// The fixture's base with the adapters of the PEFT folder `dir`, as `train --init-lora`
/// builds it.
fn with_peft_adapters(
    arch: HfArchitecture,
    dir: &std::path::Path,
    device: &Device,
) -> MoeTransformer {
    let config = peft::read_adapter_config(dir).unwrap().lora_config();
    let model = hf::load(&fixture(arch), device).unwrap().model;
    let model = model.with_lora(&config).unwrap();
    peft::load_adapters(model, dir).unwrap()
}

#[test]
fn peft_adapters_give_peft_logits() {
    let device = cpu();
    for arch in HfArchitecture::ALL {
        let dir = peft_fixture(arch);
        let adapters = peft::read_adapter_config(&dir).unwrap();
        assert_eq!(
            adapters.targets,
            LoraTarget::ALL.to_vec(),
            "{arch:?}: the fixture adapts every kind of weight"
        );
        let model = with_peft_adapters(arch, &dir, &device);
        let (ids, _) = expected(arch);
        let ours = logits(&model, &ids, &device);
        let theirs = read_f32(&dir.join("expected.safetensors"), "logits");
        let base = read_f32(&dir.join("expected.safetensors"), "base_logits");
        let diff = max_difference(&ours, &theirs);
        let moved = max_difference(&base, &theirs);
        eprintln!("{arch:?}: {diff:.2e} from PEFT's logits (the adapters move them {moved:.2})");
        assert!(moved > 0.1, "{arch:?}: the adapters hardly matter: {moved}");
        assert!(diff < 1e-4, "{arch:?}: {diff} from PEFT's logits");
    }
}

/// The Qwen2-MoE fixture gives `down_proj` rank 2 and the fused `gate_up_proj` rank 3 with an
/// alpha of its own, under a default rank 4: the run takes rank 4 and the folder's default
/// scale, and the lower ranks sit in zero-padded adapters.
#[test]
fn per_module_ranks_and_alphas_load_at_the_largest_rank() {
    let dir = peft_fixture(HfArchitecture::Qwen2Moe);
    let adapters = peft::read_adapter_config(&dir).unwrap();
    assert_eq!(adapters.rank, 4);
    assert!((adapters.alpha - 8.0).abs() < 1e-12, "{}", adapters.alpha);
    let model = with_peft_adapters(HfArchitecture::Qwen2Moe, &dir, &cpu());
    let experts = &model.stack.blocks[0].ffn.moe.as_ref().unwrap().experts;
    let down = experts
        .w_out
        .reparameterization::<lora::LoraAdapter>()
        .unwrap();
    let b = down
        .b
        .val()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let [e, r, d] = down.b.shape().dims::<3>();
    assert_eq!(r, 4);
    for expert in 0..e {
        for k in 0..r {
            let row = &b[(expert * r + k) * d..(expert * r + k + 1) * d];
            assert_eq!(
                row.iter().all(|&x| x == 0.0),
                k >= 2,
                "expert {expert}, rank row {k}: only the folder's rank 2 is filled"
            );
        }
    }
}

/// Adapters written by `save_adapters` carry PEFT's names for every weight (the set the
/// PEFT fixture of the same model has) and read back to the same model.
#[test]
fn adapters_written_as_peft_read_back() {
    let device = cpu();
    let root = std::env::temp_dir().join(format!("peft-out-{}", std::process::id()));
    for arch in HfArchitecture::ALL {
        let model = with_peft_adapters(arch, &peft_fixture(arch), &device);
        let out = root.join(arch.model_type());
        let written = peft::save_adapters(&model, arch, &out, "base").unwrap();
        assert_eq!(written, lora::adapter_count(&model));
        let names = |dir: &std::path::Path| {
            let bytes = std::fs::read(dir.join(peft::ADAPTER_WEIGHTS)).unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
            names.sort();
            names
        };
        assert_eq!(names(&out), names(&peft_fixture(arch)), "{arch:?}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(peft::ADAPTER_CONFIG)).unwrap())
                .unwrap();
        let rank = config["r"].as_u64().unwrap();
        assert_eq!(config["rank_pattern"]["gate_up_proj"], 2 * rank);

        let again = with_peft_adapters(arch, &out, &device);
        let (ids, _) = expected(arch);
        let diff = max_difference(
            &logits(&again, &ids, &device),
            &logits(&model, &ids, &device),
        );
        assert!(diff < 1e-5, "{arch:?}: read back {diff} away");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// A folder holding a tensor for a module the model does not have is refused by name.
#[test]
fn a_tensor_for_no_weight_of_ours_is_refused() {
    let dir = std::env::temp_dir().join(format!("peft-stray-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = peft_fixture(HfArchitecture::Mixtral);
    std::fs::copy(
        source.join(peft::ADAPTER_CONFIG),
        dir.join(peft::ADAPTER_CONFIG),
    )
    .unwrap();
    let bytes = std::fs::read(source.join(peft::ADAPTER_WEIGHTS)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> =
        file.tensors().into_iter().collect();
    let (_, a) = tensors
        .iter()
        .find(|(n, _)| n.ends_with("layers.0.self_attn.q_proj.lora_A.weight"))
        .cloned()
        .unwrap();
    let stray = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight";
    tensors.push((stray.to_string(), a));
    safetensors::serialize_to_file(tensors, None, &dir.join(peft::ADAPTER_WEIGHTS)).unwrap();
    let device = cpu();
    let adapters = peft::read_adapter_config(&dir).unwrap();
    let model = hf::load(&fixture(HfArchitecture::Mixtral), &device)
        .unwrap()
        .model;
    let model = model
        .with_lora(&LoraConfig::new(adapters.rank).with_targets(adapters.targets))
        .unwrap();
    let error = peft::load_adapters(model, &dir).unwrap_err().to_string();
    assert!(error.contains("layers.7"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}
