//! Hugging Face fixtures (`tests/fixtures/hf`, written by `make_fixtures.py` with transformers'
//! own classes): our logits for the fixture's tokens against the logits transformers computed.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_store::{bridge, ModuleStore, SafetensorsStore};
use moe_core::GateConfig;
use moe_models::hf::{self, HfArchitecture};
use moe_models::{KvCache, MoeTransformer};

use crate::common::cpu;
use moe_kernels::testing::max_difference;

/// The fixture folder of `arch`.
pub fn fixture(arch: HfArchitecture) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(arch.model_type())
}

/// transformers' logits for the fixture's tokens with the weights burn-moe holds in bf16
/// rounded to bf16 (`make_fixtures.py --bf16-weights`), `[1, T, vocab]`.
pub fn expected_bf16(arch: HfArchitecture) -> Vec<f32> {
    let mut store = SafetensorsStore::from_file(fixture(arch).join("expected_bf16.safetensors"));
    let tensor = store.get_tensor("logits").unwrap().unwrap();
    bridge::to_data(tensor)
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap()
}

/// The fixture's token ids and transformers' logits, `[1, T, vocab]`.
pub fn expected(arch: HfArchitecture) -> (Vec<i64>, Vec<f32>) {
    let mut store = SafetensorsStore::from_file(fixture(arch).join("expected.safetensors"));
    let mut read = |name: &str| {
        let tensor = store.get_tensor(name).unwrap().unwrap();
        bridge::to_data(tensor).unwrap()
    };
    let ids = read("input_ids")
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    let logits = read("logits").try_to_vec::<f32>().unwrap();
    (ids, logits)
}

/// `model`'s logits for the tokens `ids`, `[1, T, vocab]`, in f32.
pub fn logits(model: &MoeTransformer, ids: &[i64], device: &Device) -> Vec<f32> {
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device);
    model
        .forward(tokens)
        .logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

fn devices() -> Vec<Device> {
    vec![
        cpu(),
        #[cfg(feature = "flex")]
        Device::flex(),
    ]
}

#[test]
fn logits_match_transformers_on_every_architecture() {
    for arch in HfArchitecture::ALL {
        let (ids, expected) = expected(arch);
        for device in devices() {
            let loaded = hf::load(&fixture(arch), &device).unwrap();
            assert_eq!(loaded.architecture, arch);
            let ours = logits(&loaded.model, &ids, &device);
            let diff = max_difference(&ours, &expected);
            eprintln!("{arch:?} on {device:?}: largest logit difference {diff:.2e}");
            assert!(
                diff < 1e-4,
                "{arch:?} on {device:?}: logits differ by {diff}"
            );
        }
    }
}

#[test]
fn the_fixtures_cover_what_the_architectures_differ_in() {
    let config = |arch| hf::read_config(&fixture(arch)).unwrap().1.decoder;
    let (mixtral, qwen, olmoe) = (
        config(HfArchitecture::Mixtral),
        config(HfArchitecture::Qwen2Moe),
        config(HfArchitecture::Olmoe),
    );
    // Grouped and full key/value heads.
    assert!(mixtral.kv_heads() < mixtral.num_heads && qwen.kv_heads() == qwen.num_heads);
    // Renormalised and plain top-k.
    let renormalised = |d: &moe_models::DecoderConfig| match &d.moe.gate {
        GateConfig::SoftmaxTopK(gate) => gate.renormalize,
        _ => panic!("the Hugging Face routers are softmax top-k"),
    };
    assert!(renormalised(&mixtral) && !renormalised(&qwen) && !renormalised(&olmoe));
    // The shared expert with its gate and its own width; a dense layer among MoE layers.
    assert!(qwen.moe.shared_gate && qwen.moe.shared_d_hidden == Some(40));
    assert_eq!(qwen.moe_layers(), vec![0, 2]);
    // OLMoE's q/k norms and clipping; Qwen2's q/k/v biases without an output bias.
    assert!(olmoe.qk_norm && olmoe.qkv_clip == Some(0.5));
    assert!(qwen.qkv_bias && !qwen.output_bias);
}

#[test]
fn a_wrong_routing_rule_shows_in_the_logits() {
    // The fixtures' smallest top-k gaps are about 1e-3 (make_fixtures.py prints them), so
    // renormalising where the model does not, or the reverse, moves the logits far beyond the
    // tolerance: the comparison above would catch a loader that got the rule wrong.
    let device = cpu();
    for arch in HfArchitecture::ALL {
        let (ids, expected) = expected(arch);
        let (_, mut config, _) = hf::read_config(&fixture(arch)).unwrap();
        if let GateConfig::SoftmaxTopK(gate) = &mut config.decoder.moe.gate {
            gate.renormalize = !gate.renormalize;
        }
        let mut loaded = hf::load(&fixture(arch), &device).unwrap();
        let model = config.init(&device).unwrap();
        // The loaded weights under the wrong rule.
        loaded.model = model.load_record(loaded.model.into_record());
        let diff = max_difference(&logits(&loaded.model, &ids, &device), &expected);
        assert!(
            diff > 1e-2,
            "{arch:?}: flipping the renormalisation moved logits only {diff}"
        );
    }
}

#[test]
fn cached_decoding_matches_the_full_pass() {
    // Grouped key/value heads are cached un-repeated and rotated in half-split order; decoding
    // the second half against the cache of the first must give the full pass's rows.
    let device = cpu();
    for arch in HfArchitecture::ALL {
        let (ids, expected) = expected(arch);
        let model = hf::load(&fixture(arch), &device).unwrap().model;
        let split = ids.len() / 2;
        let mut cache = KvCache::new();
        let tokens = |ids: &[i64]| {
            Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device)
        };
        let _ = model.forward_cached(tokens(&ids[..split]), &mut cache);
        let rest = model
            .forward_cached(tokens(&ids[split..]), &mut cache)
            .logits
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let vocab = expected.len() / ids.len();
        let diff = max_difference(&rest, &expected[split * vocab..]);
        assert!(diff < 1e-4, "{arch:?}: cached rows differ by {diff}");
    }
}

#[test]
fn bad_folders_get_errors_that_name_the_problem() {
    let dir = std::env::temp_dir().join(format!("hf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let message = |dir: &Path| hf::load(dir, &cpu()).unwrap_err().to_string();
    assert!(message(&dir).contains("config.json"), "{}", message(&dir));

    let source = fixture(HfArchitecture::Olmoe);
    let config = std::fs::read_to_string(source.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"olmoe\"", "\"gpt2\""),
    )
    .unwrap();
    assert!(message(&dir).contains("gpt2"), "{}", message(&dir));

    std::fs::write(dir.join("config.json"), &config).unwrap();
    assert!(
        message(&dir).contains("model.safetensors"),
        "{}",
        message(&dir)
    );

    // Weights of another architecture: the missing tensors are named.
    std::fs::copy(
        fixture(HfArchitecture::Mixtral).join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let text = message(&dir);
    assert!(text.contains("lacks") && text.contains("q_norm"), "{text}");

    let scaled = config.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"");
    std::fs::write(dir.join("config.json"), scaled).unwrap();
    assert!(message(&dir).contains("yarn"), "{}", message(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_saved_folder_loads_back_to_the_same_logits() {
    // Load transformers' model, write it back in its own layout, load that: the logits must
    // still be transformers'. (make_fixtures.py --check-export loads such a folder with
    // transformers itself.)
    let device = cpu();
    for arch in HfArchitecture::ALL {
        let (ids, expected) = expected(arch);
        let loaded = hf::load(&fixture(arch), &device).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "hf-save-{}-{}",
            arch.model_type(),
            std::process::id()
        ));
        hf::save(&loaded.model, arch, &dir, Some(&loaded.config_json)).unwrap();
        let again = hf::load(&dir, &device).unwrap();
        assert_eq!(again.model.config(), loaded.model.config());
        let diff = max_difference(&logits(&again.model, &ids, &device), &expected);
        assert!(
            diff < 1e-4,
            "{arch:?}: the saved folder's logits differ by {diff}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn configs_that_do_not_fit_an_architecture_are_named() {
    let mixtral = hf::read_config(&fixture(HfArchitecture::Mixtral))
        .unwrap()
        .1;
    assert_eq!(
        hf::fitting_architecture(&mixtral),
        Some(HfArchitecture::Mixtral)
    );
    let mut adjacent = mixtral.clone();
    adjacent.decoder.rotary_pairing = moe_models::RotaryPairing::Adjacent;
    assert_eq!(hf::fitting_architecture(&adjacent), None);
    let error = hf::to_hf_config(&adjacent, HfArchitecture::Mixtral).unwrap_err();
    assert!(error.to_string().contains("adjacent rotary"), "{error}");
    // Mixtral's config read as OLMoE: it has no q/k norms.
    let error = hf::to_hf_config(&mixtral, HfArchitecture::Olmoe).unwrap_err();
    assert!(error.to_string().contains("OlmoeForCausalLM"), "{error}");
}

/// A model loaded from a bf16 folder exports in bf16 (`hf::save` keeps its base's precision):
/// every tensor is BF16 in the file, `torch_dtype` says so, and each value is the f32 export's
/// rounded to bf16 (widened here by shifting its bits, not by the code under test).
#[test]
fn a_bf16_folder_saves_as_bf16() {
    let device = cpu();
    let arch = HfArchitecture::Qwen2Moe;
    let loaded = hf::load(&fixture(arch), &device).unwrap();
    let root = std::env::temp_dir().join(format!("hf-bf16-{}", std::process::id()));
    let (f32_dir, bf16_dir) = (root.join("f32"), root.join("bf16"));
    hf::save(&loaded.model, arch, &f32_dir, Some(&loaded.config_json)).unwrap();
    let mut base = loaded.config_json.clone();
    base["dtype"] = "bfloat16".into();
    hf::save(&loaded.model, arch, &bf16_dir, Some(&base)).unwrap();

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let wide = std::fs::read(f32_dir.join("model.safetensors")).unwrap();
    let narrow = std::fs::read(bf16_dir.join("model.safetensors")).unwrap();
    let wide = safetensors::SafeTensors::deserialize(&wide).unwrap();
    let narrow = safetensors::SafeTensors::deserialize(&narrow).unwrap();
    assert_eq!(wide.names().len(), narrow.names().len());
    for (name, view) in narrow.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
        let exact = wide.tensor(&name).unwrap();
        let exact = exact
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let rounded = view
            .data()
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16));
        for (exact, rounded) in exact.zip(rounded) {
            // bf16 keeps 8 significant bits: rounding to nearest is off by at most 2^-9 of it.
            assert!(
                (exact - rounded).abs() <= exact.abs() / 256.0,
                "{name}: {exact} stored as {rounded}"
            );
        }
    }
    // And it loads back.
    let again = hf::load(&bf16_dir, &device).unwrap();
    assert_eq!(again.model.config(), loaded.model.config());
    std::fs::remove_dir_all(&root).unwrap();
}
