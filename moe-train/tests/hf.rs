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
