//! Fuzzing of the readers a user's files reach: the config reader (TOML and JSON, then the
//! range checks and the model configs built from what passes) and the checkpoint readers
//! (manifest, state, config, data record, tokenizer, model and optimizer records).
//!
//! Each case mutates a valid file (flipped bytes, extreme numbers, cut or repeated pieces) and
//! feeds it to the reader; the reader may accept it or refuse it with an error, but must not
//! panic. Checkpoint files are fed twice: as they are (the recorded checksums catch the damage)
//! and with both records (manifest and `state.json`) updated to match, so the damage reaches the
//! reader behind them.
//!
//! Bounded: `BURN_MOE_FUZZ_CASES` cases per reader (default 2,000 for configs, 300 for
//! checkpoints) and at most a minute each. A longer campaign:
//! `BURN_MOE_FUZZ_CASES=100000 cargo test --release --workspace --test fuzz -- --nocapture`.

#[path = "train/common.rs"]
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_core::rng::SplitMix64;
use moe_train::cli::EvalArgs;
use moe_train::config::{Preset, TrainConfig};
use moe_train::store::checkpoint::{self, Manifest, MANIFEST_FILE};
use moe_train::training::{train, RunOptions};

const TIME_LIMIT: Duration = Duration::from_secs(60);

fn cases(default: usize) -> usize {
    std::env::var("BURN_MOE_FUZZ_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Pieces that tend to break readers: extreme and non-finite numbers, stray syntax.
const TOKENS: [&str; 22] = [
    "-1",
    "0",
    "1e309",
    "-1e309",
    "nan",
    "inf",
    "18446744073709551616",
    "99999999999",
    "4294967296",
    "0.0000001",
    "\"x\"",
    "[",
    "]",
    "{",
    "}",
    "=",
    ":",
    ",",
    "\n",
    "true",
    "null",
    "\u{0}",
];

/// One random change to `bytes`.
fn mutate(bytes: &mut Vec<u8>, rng: &mut SplitMix64) {
    if bytes.is_empty() {
        bytes.extend_from_slice(TOKENS[rng.below(TOKENS.len())].as_bytes());
        return;
    }
    let at = rng.below(bytes.len());
    match rng.below(6) {
        0 => bytes[at] ^= 1 << rng.below(8),
        1 => {
            let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
            bytes.splice(at..at, token.iter().copied());
        }
        2 => {
            let end = (at + 1 + rng.below(16)).min(bytes.len());
            bytes.drain(at..end);
        }
        3 => {
            // Replace the number under `at` (if any) with a token.
            let is_digit = |b: &u8| b.is_ascii_digit() || *b == b'.' || *b == b'-' || *b == b'e';
            let start = bytes[..at]
                .iter()
                .rposition(|b| !is_digit(b))
                .map_or(0, |p| p + 1);
            let end = bytes[at..]
                .iter()
                .position(|b| !is_digit(b))
                .map_or(bytes.len(), |p| at + p);
            let token = TOKENS[rng.below(11)].as_bytes();
            bytes.splice(start..end, token.iter().copied());
        }
        4 => bytes.truncate(at),
        _ => {
            let end = (at + 1 + rng.below(64)).min(bytes.len());
            let piece = bytes[at..end].to_vec();
            bytes.splice(at..at, piece);
        }
    }
}

/// Runs `f`, turning a panic into its message.
fn no_panic(messages: &Arc<Mutex<Vec<String>>>, f: impl FnOnce()) -> bool {
    let result = catch_unwind(AssertUnwindSafe(f));
    if result.is_err() {
        messages
            .lock()
            .unwrap()
            .push("(see the panic message above)".into());
    }
    result.is_ok()
}

/// Replaces the panic hook with one that records the message and the place.
fn record_panics() -> Arc<Mutex<Vec<String>>> {
    let messages = Arc::new(Mutex::new(Vec::new()));
    let record = messages.clone();
    std::panic::set_hook(Box::new(move |info| {
        record.lock().unwrap().push(info.to_string());
    }));
    messages
}

#[test]
fn the_config_reader_refuses_what_it_cannot_use_without_panicking() {
    let messages = record_panics();
    let dir = common::temp_dir("fuzz-config");
    let config = Preset::Tiny.config();
    let toml_text = toml::to_string(&config).unwrap();
    let json_text = serde_json::to_string_pretty(&config).unwrap();
    let mut rng = SplitMix64(17);
    let (mut accepted, mut refused, mut panics) = (0, 0, 0);
    let started = Instant::now();
    let total = cases(2000);
    for case in 0..total {
        if started.elapsed() > TIME_LIMIT {
            break;
        }
        let (name, base) = if case % 2 == 0 {
            ("c.toml", &toml_text)
        } else {
            ("c.json", &json_text)
        };
        let mut bytes = base.as_bytes().to_vec();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut bytes, &mut rng);
        }
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let ok = no_panic(&messages, || {
            let Ok(config) = TrainConfig::from_preset_and_file(Preset::Tiny, Some(&path)) else {
                refused += 1;
                return;
            };
            if config.validate().is_err() {
                refused += 1;
                return;
            }
            let model = config.text_model_config(100);
            let _ = model.validate();
            let _ = config.multimodal_model_config(13).validate();
            let _ = moe_train::runtime::memory::estimate(&config, &model);
            accepted += 1;
        });
        if !ok {
            panics += 1;
            println!("panic on {name}:\n{}", String::from_utf8_lossy(&bytes));
        }
    }
    let _ = std::panic::take_hook();
    println!("config reader: {accepted} accepted, {refused} refused, {panics} panics");
    assert_eq!(panics, 0, "{:?}", messages.lock().unwrap());
}

/// A checkpoint of a two-step run.
fn make_checkpoint(dir: &Path) -> std::path::PathBuf {
    let corpus = dir.join("corpus.txt");
    common::write_generated_corpus(&corpus);
    let config = common::tiny_config(corpus, 2);
    let out = dir.join("run");
    train(config, RunOptions::new(out.clone())).unwrap();
    checkpoint::resolve(&out).unwrap()
}

/// Size and checksum of `path` as it is now, as a checkpoint records them.
fn entry_of(path: &Path) -> checkpoint::FileEntry {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_default();
    checkpoint::FileEntry {
        bytes: bytes.len() as u64,
        sha256: moe_train::checksum::hex(&sha2::Sha256::digest(&bytes)),
    }
}

/// Points both records of `name`'s checksum (the manifest's and the one in `state.json`) at the
/// file as it is now, so that the damage passes the check and reaches the file's reader.
fn refresh_records(folder: &Path, name: &str) {
    let state_path = folder.join("state.json");
    if name != "state.json" {
        if let Ok(text) = std::fs::read_to_string(&state_path) {
            if let Ok(mut state) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(files) = state.get_mut("files").and_then(|f| f.as_object_mut()) {
                    let entry = serde_json::to_value(entry_of(&folder.join(name))).unwrap();
                    files.insert(name.to_string(), entry);
                    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
                }
            }
        }
    }
    let path = folder.join(MANIFEST_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let Ok(mut manifest) = serde_json::from_str::<Manifest>(&text) else {
        return;
    };
    for file in [name, "state.json"] {
        manifest
            .files
            .insert(file.to_string(), entry_of(&folder.join(file)));
    }
    std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
}

#[test]
fn the_checkpoint_readers_refuse_damage_without_panicking() {
    let _serial = common::serial();
    let dir = common::temp_dir("fuzz-checkpoint");
    let original = make_checkpoint(&dir);
    let messages = record_panics();
    let files = [
        "manifest.json",
        "state.json",
        "config.json",
        "data.json",
        "tokenizer.json",
        "model.bpk",
        "optimizer.bpk",
    ];
    let mut rng = SplitMix64(23);
    let (mut accepted, mut refused, mut panics) = (0, 0, 0);
    let started = Instant::now();
    let total = cases(300);
    for case in 0..total {
        if started.elapsed() > TIME_LIMIT {
            break;
        }
        // A folder per case: Burn reads records lazily, so a model or optimizer state loaded
        // from a folder still reads its file after the load returns.
        let work = dir.join(format!("work-{case}"));
        std::fs::create_dir_all(&work).unwrap();
        for entry in std::fs::read_dir(&original).unwrap().flatten() {
            std::fs::copy(entry.path(), work.join(entry.file_name())).unwrap();
        }
        let name = files[rng.below(files.len())];
        let path = work.join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut bytes, &mut rng);
        }
        std::fs::write(&path, &bytes).unwrap();
        if case % 2 == 1 && name != MANIFEST_FILE {
            refresh_records(&work, name);
        }
        let ok = no_panic(&messages, || {
            let result = moe_train::commands::evaluate(&EvalArgs {
                batches: Some(1),
                ..EvalArgs::checkpoint(
                    work.clone(),
                    moe_train::runtime::backend::BackendChoice::Ndarray,
                )
            });
            let optimizer = checkpoint::open(&work, moe_train::store::checkpoint::Verify::Checked)
                .and_then(|opened| {
                    let optimizer = moe_train::training::optimizer::FusedAdamW::new(0.1).init();
                    checkpoint::load_optimizer(&opened.folder, optimizer, &[]).map(|_| ())
                });
            match (result, optimizer) {
                (Ok(_), Ok(())) => accepted += 1,
                _ => refused += 1,
            }
        });
        if !ok {
            panics += 1;
            println!("panic with a damaged {name} (case {case})");
        }
        if case >= 16 {
            let _ = std::fs::remove_dir_all(dir.join(format!("work-{}", case - 16)));
        }
    }
    let _ = std::panic::take_hook();
    println!("checkpoint readers: {accepted} accepted, {refused} refused, {panics} panics");
    assert_eq!(panics, 0, "{:?}", messages.lock().unwrap());
}
