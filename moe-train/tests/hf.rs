//! `generate --hf` and `eval --hf` on the Hugging Face fixtures (`tests/fixtures/hf`): the
//! tokenizer against the ids transformers' tokenizer gave, and the perplexity against one
//! computed by hand from the logits transformers gave.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use burn_store::{bridge, ModuleStore, SafetensorsStore};
use moe_core::lora::{LoraConfig, LoraTarget};
use moe_kernels::testing::max_difference;
use moe_models::hf::Storage;
use moe_models::hf::{self, HfArchitecture};
use moe_models::{MoeTransformer, SamplingConfig};
use moe_train::cli::{EvalArgs, ExportArgs, GenerateArgs, HeldWeights};
use moe_train::commands::export::{export, ExportLayout};
use moe_train::commands::hf::{evaluate_text, generate, GenerationSettings, HfTokenizer};
use moe_train::config::{HfInit, TrainConfig};
use moe_train::data::tasks::text::text_model;
use moe_train::runtime::backend::BackendChoice;
use moe_train::training::{train, RunOptions, RunSummary};

fn fixture(arch: HfArchitecture) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hf")
        .join(arch.model_type())
}

/// The fixture's prompt ids and transformers' logits for them.
fn expected(arch: HfArchitecture) -> (Vec<usize>, Vec<f64>) {
    let mut store = SafetensorsStore::from_file(fixture(arch).join("expected.safetensors"));
    let mut read = |name: &str| bridge::to_data(store.get_tensor(name).unwrap().unwrap()).unwrap();
    let ids = read("input_ids")
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    let logits = read("logits").convert::<f64>().try_to_vec::<f64>().unwrap();
    (ids.into_iter().map(|id| id as usize).collect(), logits)
}

fn prompt(arch: HfArchitecture) -> String {
    std::fs::read_to_string(fixture(arch).join("prompt.txt")).unwrap()
}

#[test]
fn the_tokenizer_gives_the_ids_transformers_gave() {
    for arch in HfArchitecture::ALL {
        let (_, _, config) = hf::read_config(&fixture(arch)).unwrap();
        let tokenizer = HfTokenizer::load(&fixture(arch), &config).unwrap();
        let (ids, _) = expected(arch);
        assert_eq!(tokenizer.encode(&prompt(arch)).unwrap(), ids, "{arch:?}");
        assert_eq!(tokenizer.decode(&ids), prompt(arch), "{arch:?}");
        // A checkpoint fine-tuned from the folder reads a prompt as transformers does (no
        // start token these tokenizers' templates do not add), as `generate --hf` does.
        let ours = moe_train::data::tokenizer::Tokenizer::load_hf(&fixture(arch), &config).unwrap();
        assert_eq!(ours.encode_prompt(&prompt(arch)), ids, "{arch:?}");
    }
}

#[test]
fn perplexity_matches_transformers_logits() {
    for arch in HfArchitecture::ALL {
        let (ids, logits) = expected(arch);
        let vocab = logits.len() / ids.len();
        // -log softmax(logits[t])[ids[t + 1]], a plain loop over transformers' logits.
        let mut total = 0.0;
        for t in 0..ids.len() - 1 {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            total += log_sum - row[ids[t + 1]];
        }
        let reference = total / (ids.len() - 1) as f64;

        let text = fixture(arch).join("prompt.txt");
        let ours = evaluate_text(
            &fixture(arch),
            &text,
            None,
            BackendChoice::Ndarray,
            Storage::F32,
        )
        .unwrap();
        assert_eq!(ours.tokens, ids.len() - 1);
        assert!(
            (ours.loss - reference).abs() < 1e-5,
            "{arch:?}: loss {} against {reference}",
            ours.loss
        );
        // Windows of 5 tokens predict 4 of them each; the count says the text was cut.
        let windowed = evaluate_text(
            &fixture(arch),
            &text,
            Some(5),
            BackendChoice::Ndarray,
            Storage::F32,
        )
        .unwrap();
        assert_eq!(windowed.tokens, ids.len() - ids.len().div_ceil(5));
    }
}

/// Greedy generation of `max_tokens` with the weights held in `weights`.
fn greedy(max_tokens: usize, weights: Storage) -> GenerationSettings {
    GenerationSettings {
        max_tokens,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        },
        offload_experts: false,
        weights,
    }
}

/// `eval --hf --weights` and `generate --hf --weights` run end to end in every held format on
/// flex (what each format computes is checked in moe-models' `storage` tests).
#[test]
fn held_weights_evaluate_and_generate() {
    let arch = HfArchitecture::Olmoe;
    let text = fixture(arch).join("prompt.txt");
    let f32_loss = evaluate_text(
        &fixture(arch),
        &text,
        None,
        BackendChoice::Flex,
        Storage::F32,
    )
    .unwrap()
    .loss;
    for storage in [Storage::Bf16, Storage::Q8, Storage::Q4] {
        let held =
            evaluate_text(&fixture(arch), &text, None, BackendChoice::Flex, storage).unwrap();
        assert!(
            held.loss.is_finite() && held.loss != f32_loss,
            "{storage}: {}",
            held.loss
        );
        let settings = greedy(2, storage);
        let out = generate(&fixture(arch), &prompt(arch), settings, BackendChoice::Flex).unwrap();
        assert!(out.starts_with(&prompt(arch)), "{storage}: {out}");
    }
}

#[test]
fn greedy_generation_continues_with_the_most_likely_token() {
    let arch = HfArchitecture::Qwen2Moe;
    let (ids, logits) = expected(arch);
    let vocab = logits.len() / ids.len();
    let last = &logits[(ids.len() - 1) * vocab..];
    let best = (0..vocab)
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap();
    let settings = greedy(1, Storage::F32);
    let offloaded = GenerationSettings {
        offload_experts: true,
        ..settings.clone()
    };
    let text = generate(
        &fixture(arch),
        &prompt(arch),
        settings,
        BackendChoice::Ndarray,
    )
    .unwrap();
    let (_, _, config) = hf::read_config(&fixture(arch)).unwrap();
    let tokenizer = HfTokenizer::load(&fixture(arch), &config).unwrap();
    assert_eq!(
        text,
        format!("{}{}", prompt(arch), tokenizer.decode(&[best]))
    );
    // With the experts in CPU memory on flex (`--offload-experts`), the same token.
    let text = generate(
        &fixture(arch),
        &prompt(arch),
        offloaded,
        BackendChoice::Ndarray,
    )
    .unwrap();
    assert_eq!(
        text,
        format!("{}{}", prompt(arch), tokenizer.decode(&[best]))
    );
}

#[test]
fn bad_arguments_are_named() {
    let arch = HfArchitecture::Olmoe;
    let text = fixture(arch).join("prompt.txt");
    let error = evaluate_text(
        &fixture(arch),
        &text,
        Some(1),
        BackendChoice::Ndarray,
        Storage::F32,
    )
    .unwrap_err();
    assert!(error.to_string().contains("--window"), "{error}");
    let missing = fixture(arch).join("no-such-file.txt");
    let error = evaluate_text(
        &fixture(arch),
        &missing,
        None,
        BackendChoice::Ndarray,
        Storage::F32,
    )
    .unwrap_err();
    assert!(error.to_string().contains("no-such-file.txt"), "{error}");
    let error = HfTokenizer::load(Path::new("/nonexistent"), &serde_json::Value::Null)
        .err()
        .unwrap();
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
}

#[path = "train/common.rs"]
mod common;

/// The logits of `model` for the token ids `ids`, `[1, T, vocab]` flattened.
fn logits_of(model: &MoeTransformer, ids: &[usize], device: &Device) -> Vec<f32> {
    use burn::tensor::{Int, Tensor, TensorData};
    let data: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), device);
    model
        .forward(tokens)
        .logits
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Fine-tunes the Hugging Face folder `base` for 30 steps on a generated corpus in `dir`, in
/// full or with `lora`, at learning rate `lr`; checks that the training loss fell below `fall`
/// of its start. Returns the config and the run folder.
fn fine_tune(
    dir: &Path,
    base: &Path,
    lora: Option<LoraConfig>,
    lr: f64,
    fall: f64,
) -> (TrainConfig, PathBuf, RunSummary) {
    let held = (HeldWeights::F32, BackendChoice::Ndarray);
    fine_tune_held(dir, base, lora, held, lr, fall)
}

/// [`fine_tune`] with the base's frozen weights held as `weights` says (`train --weights`), on
/// `backend`.
fn fine_tune_held(
    dir: &Path,
    base: &Path,
    lora: Option<LoraConfig>,
    (weights, backend): (HeldWeights, BackendChoice),
    lr: f64,
    fall: f64,
) -> (TrainConfig, PathBuf, RunSummary) {
    let corpus = dir.join("corpus.txt");
    common::write_generated_corpus(&corpus);
    let mut config = common::tiny_config(corpus, 30);
    config.run.backend = backend;
    let mut hf = HfInit::read(base).unwrap();
    hf.weights = weights;
    config.variant.hf = Some(hf);
    config.variant.lora = lora;
    config.optim.lr = lr;
    config.optim.min_lr = lr / 10.0;
    let run = dir.join("run");
    let summary = train(config.clone(), RunOptions::new(run.clone())).unwrap();
    let first = summary.train_losses[0].1;
    let last = summary.train_losses.last().unwrap().1;
    assert!(
        last < fall * first,
        "fine-tuning moved the loss from {first} to {last}"
    );
    (config, run, summary)
}

/// `eval` and `generate` open the run's checkpoint: the loss is the run's last validation loss,
/// the text continues the prompt.
fn check_eval_and_generate(run: &Path, summary: &RunSummary) {
    check_eval_and_generate_on(run, summary, BackendChoice::Ndarray);
}

/// [`check_eval_and_generate`] on `backend`.
fn check_eval_and_generate_on(run: &Path, summary: &RunSummary, backend: BackendChoice) {
    let report =
        moe_train::commands::evaluate(&EvalArgs::checkpoint(run.to_path_buf(), backend)).unwrap();
    assert!((report.evaluation.loss - summary.val_losses.last().unwrap().1).abs() < 1e-4);
    let text =
        moe_train::commands::generate(&GenerateArgs::greedy(run.to_path_buf(), "春", 4, backend))
            .unwrap();
    assert!(text.starts_with('春'), "{text}");
}

/// The run's model on ndarray (as the runs train), as eval builds it.
fn run_model(run: &Path) -> MoeTransformer {
    #[allow(deprecated)]
    run_model_on(run, &Device::ndarray())
}

/// [`run_model`] on `device`.
fn run_model_on(run: &Path, device: &Device) -> MoeTransformer {
    let opened =
        moe_train::store::checkpoint::open(run, moe_train::store::checkpoint::Verify::Checked)
            .unwrap();
    let vocab = opened.config.variant.hf.as_ref().unwrap().config.vocab_size;
    let model = text_model(&opened.config, vocab, device, false).unwrap();
    moe_train::commands::load_finite(&opened.folder, model).unwrap()
}

/// Exports the run into `out`, which must come out as an `arch` folder; the exported model.
fn export_as(run: &Path, out: &Path, arch: HfArchitecture) -> MoeTransformer {
    export_on(run, out, arch, BackendChoice::Ndarray)
}

/// [`export_as`], the run's model built on `backend`.
fn export_on(
    run: &Path,
    out: &Path,
    arch: HfArchitecture,
    backend: BackendChoice,
) -> MoeTransformer {
    let layout = export(&ExportArgs {
        checkpoint: run.to_path_buf(),
        out: out.to_path_buf(),
        arch: None,
        no_verify: false,
        backend,
        weights: None,
        adapters: false,
    })
    .unwrap();
    assert_eq!(layout, ExportLayout::HuggingFace(arch));
    #[allow(deprecated)]
    let device = Device::ndarray();
    hf::load(out, &device).unwrap().model
}

#[test]
fn fine_tuning_a_hub_model_trains_saves_and_exports_it_back() {
    let _serial = common::serial();
    let dir = common::temp_dir("init-hf");
    let arch = HfArchitecture::Qwen2Moe;
    let (_, run, summary) = fine_tune(&dir, &fixture(arch), None, 3e-3, 0.7);
    // The checkpoint opens without the Hugging Face folder's help.
    check_eval_and_generate(&run, &summary);

    // Exported, it is a Qwen2-MoE folder again, with the fine-tuned weights and the tokenizer.
    let out = dir.join("export");
    let exported = export_as(&run, &out, arch);
    #[allow(deprecated)]
    let device = Device::ndarray();
    let (ids, _) = expected(arch);
    let diff = max_difference(
        &logits_of(&exported, &ids, &device),
        &logits_of(&run_model(&run), &ids, &device),
    );
    assert!(diff < 1e-5, "the exported model's logits differ by {diff}");
    let (_, _, json) = hf::read_config(&out).unwrap();
    let tokenizer = HfTokenizer::load(&out, &json).unwrap();
    assert_eq!(tokenizer.encode(&prompt(arch)).unwrap(), ids);
}

#[test]
fn lora_fine_tuning_trains_adapters_alone_and_merges_them_on_export() {
    use moe_train::store::checkpoint::{self, ADAPTERS_FILE, MODEL_FILE};

    let _serial = common::serial();
    let dir = common::temp_dir("lora");
    let arch = HfArchitecture::Qwen2Moe;
    // A copy of the fixture, so that the test can change it under the run.
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for entry in std::fs::read_dir(fixture(arch)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
    }
    let lora = LoraConfig::new(4).with_targets(LoraTarget::ALL.to_vec());
    let (config, run, summary) = fine_tune(&dir, &base, Some(lora.clone()), 1e-2, 0.8);

    // The checkpoint holds the adapters alone: the count the config gives, in f32.
    let opened = checkpoint::open(&run, moe_train::store::checkpoint::Verify::Checked).unwrap();
    assert!(!opened.folder.join(MODEL_FILE).exists());
    let adapters = std::fs::metadata(opened.folder.join(ADAPTERS_FILE))
        .unwrap()
        .len();
    let hf_config = &config.variant.hf.as_ref().unwrap().config;
    let expected_bytes = 4 * hf_config.decoder.lora_params(&lora) as u64;
    assert!(
        adapters >= expected_bytes && adapters < expected_bytes + 64 * 1024,
        "adapters.bpk has {adapters} bytes for {expected_bytes} bytes of adapters"
    );

    // The run's model: the fixture's weights untouched, the adapters trained.
    #[allow(deprecated)]
    let device = Device::ndarray();
    let trained = run_model(&run);
    let original = hf::load(&base, &device).unwrap().model;
    let query = |model: &MoeTransformer| {
        model.stack.blocks[1]
            .attention
            .query
            .weight
            .base()
            .into_data()
    };
    assert_eq!(query(&trained), query(&original), "a frozen weight moved");

    // eval and generate open the checkpoint (reading the base from its folder), and a resumed
    // run continues from the adapters.
    check_eval_and_generate(&run, &summary);
    let mut longer = config.clone();
    longer.run.steps = 34;
    let resumed = train(
        longer,
        RunOptions {
            resume: true,
            ..RunOptions::new(run.clone())
        },
    )
    .unwrap();
    let first = summary.train_losses[0].1;
    assert!(
        resumed.train_losses[0].1 < 0.9 * first,
        "the resumed run started over"
    );

    // Exported, the adapters are merged: transformers' layout, the adapted model's logits.
    let exported = export_as(&run, &dir.join("export"), arch);
    let trained = run_model(&run);
    let (ids, _) = expected(arch);
    let ours = logits_of(&trained, &ids, &device);
    let diff = max_difference(&logits_of(&exported, &ids, &device), &ours);
    assert!(diff < 1e-4, "the merged export's logits differ by {diff}");
    let moved = max_difference(&logits_of(&original, &ids, &device), &ours);
    assert!(
        moved > 1e-3,
        "the adapters changed the logits by only {moved}"
    );
    assert_eq!(moe_core::lora::adapter_count(&trained.materialize()), 0);

    // The adapters on routers and experts have a PEFT form too (the experts' gate and up
    // adapters fused into `gate_up_proj`'s): `train --init-lora` reads the folder back to the
    // trained model.
    let peft_dir = dir.join("peft");
    assert_eq!(
        peft_export(&run, &peft_dir).unwrap(),
        ExportLayout::Peft(arch)
    );
    let continued = continued_from_peft(&run, &peft_dir, &device);
    let diff = max_difference(&logits_of(&continued, &ids, &device), &ours);
    assert!(
        diff < 1e-5,
        "the adapters read back give logits {diff} away"
    );

    // A base folder changed or gone under the run is named: a weight changed in place (every
    // size kept), then a file grown.
    let weights = base.join("model.safetensors");
    let original_bytes = std::fs::read(&weights).unwrap();
    let mut bytes = original_bytes.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let eval_error = || {
        moe_train::commands::evaluate(&EvalArgs::checkpoint(run.clone(), BackendChoice::Ndarray))
            .unwrap_err()
            .to_string()
    };
    let error = eval_error();
    assert!(
        error.contains("has changed since this LoRA run started"),
        "a weight changed in place: {error}"
    );
    let mut bytes = original_bytes;
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(&weights, bytes).unwrap();
    let error = eval_error();
    assert!(
        error.contains("has changed since this LoRA run started"),
        "{error}"
    );
    assert!(error.contains(&base.display().to_string()), "{error}");
    std::fs::remove_dir_all(&base).unwrap();
    let error = eval_error();
    assert!(error.contains(&base.display().to_string()), "{error}");
}

/// The model a new run of `run`'s config builds with `--init-lora peft` (the adapters sized
/// by the folder, as the command line sizes them).
fn continued_from_peft(run: &Path, peft: &Path, device: &Device) -> MoeTransformer {
    let opened =
        moe_train::store::checkpoint::open(run, moe_train::store::checkpoint::Verify::Checked)
            .unwrap();
    let mut config = opened.config.clone();
    config.variant.hf.as_mut().unwrap().init_lora = Some(peft.to_path_buf());
    config.variant.lora = Some(hf::peft::read_adapter_config(peft).unwrap().lora_config());
    let vocab = config.variant.hf.as_ref().unwrap().config.vocab_size;
    text_model(&config, vocab, device, true).unwrap()
}

/// `export --adapters` of `run` into `out`.
fn peft_export(run: &Path, out: &Path) -> moe_train::error::Result<ExportLayout> {
    export(&ExportArgs {
        checkpoint: run.to_path_buf(),
        out: out.to_path_buf(),
        arch: None,
        no_verify: false,
        backend: BackendChoice::Ndarray,
        weights: None,
        adapters: true,
    })
}

/// Little-endian f32 bytes as values.
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `export --adapters` writes a PEFT folder whose adapters, applied to the base by PEFT's rule
/// (`W += (lora_alpha / r) B A` on each targeted `[out, in]` weight, by plain loops here), give
/// the run's logits.
#[test]
fn lora_adapters_export_as_a_peft_folder() {
    let _serial = common::serial();
    let dir = common::temp_dir("peft");
    let arch = HfArchitecture::Qwen2Moe;
    let lora = LoraConfig::new(4)
        .with_alpha(Some(6.0))
        .with_targets(vec![LoraTarget::Attention]);
    let (_, run, _) = fine_tune(&dir, &fixture(arch), Some(lora), 1e-2, 0.8);
    let out = dir.join("peft");
    assert_eq!(peft_export(&run, &out).unwrap(), ExportLayout::Peft(arch));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    let rank = config["r"].as_u64().unwrap() as usize;
    let alpha = config["lora_alpha"].as_f64().unwrap();
    assert_eq!((rank, alpha), (4, 6.0));

    let adapter_bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let adapters = safetensors::SafeTensors::deserialize(&adapter_bytes).unwrap();
    let base_bytes = std::fs::read(fixture(arch).join("model.safetensors")).unwrap();
    let base = safetensors::SafeTensors::deserialize(&base_bytes).unwrap();
    let mut applied = 0;
    let mut tensors = Vec::new();
    for (name, view) in base.tensors() {
        let shape = view.shape().to_vec();
        let mut values = f32s(view.data());
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        let factor =
            |f: &str| adapters.tensor(&format!("base_model.model.{module}.lora_{f}.weight"));
        if let (Ok(a), Ok(b)) = (factor("A"), factor("B")) {
            let (a, b) = (f32s(a.data()), f32s(b.data()));
            let (outputs, inputs) = (shape[0], shape[1]);
            let scale = (alpha / rank as f64) as f32;
            for o in 0..outputs {
                for i in 0..inputs {
                    let sum: f32 = (0..rank).map(|j| b[o * rank + j] * a[j * inputs + i]).sum();
                    values[o * inputs + i] += scale * sum;
                }
            }
            applied += 1;
        }
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, shape, bytes));
    }
    let layers = hf::read_config(&fixture(arch))
        .unwrap()
        .1
        .decoder
        .num_layers;
    assert_eq!(
        applied,
        4 * layers,
        "every attention projection has its adapter"
    );
    assert_eq!(adapters.len(), 2 * applied, "nothing else is in the file");

    let merged = dir.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    for entry in std::fs::read_dir(fixture(arch)).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&path, merged.join(path.file_name().unwrap())).unwrap();
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes);
            (name.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &merged.join("model.safetensors")).unwrap();
    #[allow(deprecated)]
    let device = Device::ndarray();
    let applied_by_loops = hf::load(&merged, &device).unwrap().model;
    let (ids, _) = expected(arch);
    let diff = max_difference(
        &logits_of(&applied_by_loops, &ids, &device),
        &logits_of(&run_model(&run), &ids, &device),
    );
    assert!(
        diff < 1e-4,
        "PEFT's rule on our adapters gives logits {diff} away"
    );

    // `train --init-lora` reads the folder back: a new run starts from the same adapters.
    let continued = continued_from_peft(&run, &out, &device);
    let opened =
        moe_train::store::checkpoint::open(&run, moe_train::store::checkpoint::Verify::Checked)
            .unwrap();
    let vocab = opened.config.variant.hf.as_ref().unwrap().config.vocab_size;
    let fresh = text_model(&opened.config, vocab, &device, true).unwrap();
    let trained = logits_of(&run_model(&run), &ids, &device);
    let diff = max_difference(&logits_of(&continued, &ids, &device), &trained);
    assert!(
        diff < 1e-5,
        "the adapters read back give logits {diff} away"
    );
    let moved = max_difference(&logits_of(&fresh, &ids, &device), &trained);
    assert!(
        moved > 1e-3,
        "fresh adapters are {moved} away: the test cannot tell"
    );
}

/// Reads every parameter of `model` in f32 (dequantizing those held in 8 or 4 bits, widening
/// bf16 ones).
struct ReadInF32;

impl burn::module::ModuleMapper for ReadInF32 {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        param.map(|tensor| moe_kernels::in_dtype(tensor, burn::tensor::DType::F32))
    }
}

/// A copy of the `arch` fixture in f32 holding the values its weights take in `storage`
/// (rounded by the loader's own rule, which `moe-models`' storage tests check against a plain
/// loop), in `dir`.
fn rounded_fixture(arch: HfArchitecture, storage: Storage, dir: &Path) {
    let device = Device::flex();
    let options = moe_models::hf::StorageOptions::new(storage);
    let held = hf::load_with(&fixture(arch), &device, &options).unwrap();
    let rounded = held.model.map(&mut ReadInF32);
    hf::save(&rounded, arch, dir, Some(&held.config_json)).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let source = fixture(arch).join(file);
        if source.exists() {
            std::fs::copy(source, dir.join(file)).unwrap();
        }
    }
}

/// QLoRA: a LoRA run on a base held in 4 bits (`train --weights q4`, the products reading the
/// held weights through `moe_kernels::frozen_grouped_matmul`) gives the losses of the LoRA run
/// on the f32 model holding the same rounded values (multiplied by Burn's f32 products). Its
/// checkpoint evaluates and generates from the 4-bit base, and exports with the adapters
/// merged into the dequantized weights: the exported f32 folder gives the run's logits.
#[test]
fn lora_on_a_4_bit_base_trains_as_on_its_values_in_f32() {
    let _serial = common::serial();
    let arch = HfArchitecture::Qwen2Moe;
    let lora = LoraConfig::new(4).with_targets(LoraTarget::ALL.to_vec());
    // flex: ndarray cannot hold the embeddings in bf16, as they are below f32.
    let on_flex = |weights| (weights, BackendChoice::Flex);
    let reference_dir = common::temp_dir("lora-rounded-base");
    let rounded = reference_dir.join("base");
    rounded_fixture(arch, Storage::Q4, &rounded);
    let f32_base = on_flex(HeldWeights::F32);
    let (_, _, reference) = fine_tune_held(
        &reference_dir,
        &rounded,
        Some(lora.clone()),
        f32_base,
        1e-2,
        0.8,
    );
    let dir = common::temp_dir("lora-q4-base");
    let q4_base = on_flex(HeldWeights::Q4);
    let (config, run, summary) =
        fine_tune_held(&dir, &fixture(arch), Some(lora), q4_base, 1e-2, 0.8);
    let losses = |summary: &RunSummary| -> Vec<f64> {
        summary.train_losses.iter().map(|&(_, loss)| loss).collect()
    };
    moe_kernels::testing::assert_close(
        "training losses on the 4-bit base, against its values in f32",
        &losses(&summary),
        &losses(&reference),
        1e-3,
    );
    assert_eq!(config.variant.hf.as_ref().unwrap().weights, HeldWeights::Q4);

    let device = Device::flex();
    let trained = run_model_on(&run, &device);
    let moe = trained.stack.blocks.iter().find_map(|b| b.ffn.moe.as_ref());
    let experts = &moe.expect("an MoE layer").experts;
    assert!(matches!(
        experts.w_in.base().dtype(),
        burn::tensor::DType::QFloat(_)
    ));
    check_eval_and_generate_on(&run, &summary, BackendChoice::Flex);
    let exported = export_on(&run, &dir.join("export"), arch, BackendChoice::Flex);
    let (ids, _) = expected(arch);
    #[allow(deprecated)]
    let read_back = Device::ndarray();
    let diff = max_difference(
        &logits_of(&exported, &ids, &read_back),
        &logits_of(&trained, &ids, &device),
    );
    assert!(diff < 1e-4, "the merged export's logits differ by {diff}");
}

/// A run fine-tuned from a bf16 folder exports in bf16 (the source's precision, recorded in
/// the run's config); `--weights f32` writes f32. Read from the files' own headers.
#[test]
fn export_keeps_the_source_precision_unless_told() {
    let dir = common::temp_dir("hf-export-dtype");
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for entry in std::fs::read_dir(fixture(HfArchitecture::Qwen2Moe)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), base.join(entry.file_name())).unwrap();
    }
    let config_path = base.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    json["dtype"] = "bfloat16".into();
    std::fs::write(&config_path, json.to_string()).unwrap();
    let corpus = dir.join("corpus.txt");
    common::write_generated_corpus(&corpus);
    let mut config = common::tiny_config(corpus, 2);
    config.variant.hf = Some(HfInit::read(&base).unwrap());
    let run = dir.join("run");
    train(config, RunOptions::new(run.clone())).unwrap();

    let exported = |out: &str, weights| {
        let out = dir.join(out);
        export(&ExportArgs {
            checkpoint: run.clone(),
            out: out.clone(),
            arch: None,
            no_verify: false,
            backend: BackendChoice::Ndarray,
            weights,
            adapters: false,
        })
        .unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let dtypes: std::collections::BTreeSet<String> = file
            .tensors()
            .iter()
            .map(|(_, view)| format!("{:?}", view.dtype()))
            .collect();
        (config["torch_dtype"].as_str().unwrap().to_string(), dtypes)
    };
    let (named, dtypes) = exported("as-source", None);
    assert_eq!(named, "bfloat16");
    assert_eq!(dtypes.into_iter().collect::<Vec<_>>(), ["BF16"]);
    let (named, dtypes) = exported("f32", Some(moe_train::cli::ExportWeights::F32));
    assert_eq!(named, "float32");
    assert_eq!(dtypes.into_iter().collect::<Vec<_>>(), ["F32"]);
}
