//! `generate --hf` and `eval --hf` on the Hugging Face fixtures (`tests/fixtures/hf`): the
//! tokenizer against the ids transformers' tokenizer gave, and the perplexity against one
//! computed by hand from the logits transformers gave.

use std::path::{Path, PathBuf};

use burn_store::{bridge, ModuleStore, SafetensorsStore};
use moe_models::hf::{self, HfArchitecture};
use moe_models::SamplingConfig;
use moe_train::backend::Backend;
use moe_train::hf::{evaluate_text, generate, GenerationSettings, HfTokenizer};

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
        let ours = evaluate_text(&fixture(arch), &text, None, Backend::Ndarray).unwrap();
        assert_eq!(ours.tokens, ids.len() - 1);
        assert!(
            (ours.loss - reference).abs() < 1e-5,
            "{arch:?}: loss {} against {reference}",
            ours.loss
        );
        // Windows of 5 tokens predict 4 of them each; the count says the text was cut.
        let windowed = evaluate_text(&fixture(arch), &text, Some(5), Backend::Ndarray).unwrap();
        assert_eq!(windowed.tokens, ids.len() - ids.len().div_ceil(5));
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
    let settings = GenerationSettings {
        max_tokens: 1,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        },
    };
    let text = generate(&fixture(arch), &prompt(arch), settings, Backend::Ndarray).unwrap();
    let (_, _, config) = hf::read_config(&fixture(arch)).unwrap();
    let tokenizer = HfTokenizer::load(&fixture(arch), &config).unwrap();
    assert_eq!(
        text,
        format!("{}{}", prompt(arch), tokenizer.decode(&[best]))
    );
}

#[test]
fn bad_arguments_are_named() {
    let arch = HfArchitecture::Olmoe;
    let text = fixture(arch).join("prompt.txt");
    let error = evaluate_text(&fixture(arch), &text, Some(1), Backend::Ndarray).unwrap_err();
    assert!(error.to_string().contains("--window"), "{error}");
    let missing = fixture(arch).join("no-such-file.txt");
    let error = evaluate_text(&fixture(arch), &missing, None, Backend::Ndarray).unwrap_err();
    assert!(error.to_string().contains("no-such-file.txt"), "{error}");
    let error = HfTokenizer::load(Path::new("/nonexistent"), &serde_json::Value::Null)
        .err()
        .unwrap();
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
}

#[path = "train/common.rs"]
#[allow(dead_code)]
mod common;

#[test]
fn fine_tuning_a_hub_model_trains_saves_and_exports_it_back() {
    use burn::tensor::{Int, Tensor, TensorData};
    use moe_train::cli::{EvalArgs, ExportArgs, GenerateArgs};
    use moe_train::config::HfInit;
    use moe_train::export::{export, ExportLayout};
    use moe_train::trainer::{train, RunOptions};

    let _serial = common::serial();
    let dir = common::temp_dir("init-hf");
    let corpus = dir.join("corpus.txt");
    common::write_generated_corpus(&corpus);
    let arch = HfArchitecture::Qwen2Moe;
    let mut config = common::tiny_config(corpus, 30);
    config.model.hf = Some(HfInit::read(&fixture(arch)).unwrap());
    config.optim.lr = 3e-3;
    config.optim.min_lr = 3e-4;
    let run = dir.join("run");
    let summary = train(config, RunOptions::new(run.clone())).unwrap();
    let first = summary.train_losses[0].1;
    let last = summary.train_losses.last().unwrap().1;
    assert!(
        last < 0.7 * first,
        "fine-tuning moved the loss from {first} to {last}"
    );

    // The checkpoint opens in eval and generate without the Hugging Face folder's help.
    let report =
        moe_train::commands::evaluate(&EvalArgs::checkpoint(run.clone(), Backend::Ndarray))
            .unwrap();
    assert!((report.evaluation.loss - summary.val_losses.last().unwrap().1).abs() < 1e-4);
    let text = moe_train::commands::generate(&GenerateArgs::greedy(
        run.clone(),
        "春",
        4,
        Backend::Ndarray,
    ))
    .unwrap();
    assert!(text.starts_with('春'), "{text}");

    // Exported, it is a Qwen2-MoE folder again, with the fine-tuned weights and the tokenizer.
    let out = dir.join("export");
    let layout = export(&ExportArgs {
        checkpoint: run.clone(),
        out: out.clone(),
        arch: None,
        backend: Backend::Ndarray,
    })
    .unwrap();
    assert_eq!(layout, ExportLayout::HuggingFace(arch));
    #[allow(deprecated)] // ndarray, as the run trained on
    let device = burn::tensor::Device::ndarray();
    let exported = hf::load(&out, &device).unwrap().model;
    let opened = moe_train::checkpoint::open(&run).unwrap();
    let trained = moe_train::commands::load_finite(
        &opened.folder,
        opened.config.text_model_config(0).init(&device).unwrap(),
    )
    .unwrap();
    let (ids, _) = expected(arch);
    let tokens = || {
        let data: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device)
    };
    let values = |model: &moe_models::MoeTransformer| {
        model
            .forward(tokens())
            .logits
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (a, b) = (values(&exported), values(&trained));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "the exported model's logits differ by {diff}");
    let (_, _, json) = hf::read_config(&out).unwrap();
    let tokenizer = HfTokenizer::load(&out, &json).unwrap();
    assert_eq!(tokenizer.encode(&prompt(arch)).unwrap(), ids);
}
