//! Shared helpers: temporary folders, a small generated corpus, a tiny config.
#![allow(dead_code)]

use std::path::PathBuf;

use moe_core::rng::SplitMix64;
use moe_train::config::{Preset, TrainConfig};
use moe_train::runtime::backend::BackendChoice;

/// Holds the lock that serialises the tests drawing from the backend's random generator:
/// Burn's CPU backends keep one generator per process, so two tests seeding and drawing at
/// the same time would interleave their draws and break reproducibility.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fresh empty folder under the system temporary folder, removed when dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh empty folder under the system temporary folder.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("burn-moe-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Writes a generated corpus: 200 "poems" of four lines of five characters from a small set,
/// with a regular pattern a tiny model can learn quickly.
pub fn write_generated_corpus(path: &std::path::Path) {
    let alphabet: Vec<char> = "春山月水风花雨云夜江".chars().collect();
    let mut rng = SplitMix64(7);
    let mut text = String::new();
    for _ in 0..200 {
        let start = rng.below(alphabet.len());
        for line in 0..4 {
            for i in 0..5 {
                text.push(alphabet[(start + line + 2 * i) % alphabet.len()]);
            }
            text.push(if line % 2 == 0 { '，' } else { '。' });
            text.push('\n');
        }
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A tiny config on the ndarray backend training on `text`.
pub fn tiny_config(text: PathBuf, steps: usize) -> TrainConfig {
    let mut config = Preset::Tiny.config();
    config.data.text = Some(text);
    config.model.d_model = 32;
    config.model.moe.d_model = 32;
    config.model.num_layers = 2;
    config.model.num_heads = 2;
    config.model.context_length = 16;
    config.model.d_ff = 64;
    config.model.moe.expert.d_hidden = 32;
    config.model.moe.num_experts = 4;
    config.model.moe.top_k = 2;
    config.model.moe_every = 2;
    config.model.moe.capacity.dropless = false;
    config.model.dropout = 0.0;
    config.optim.batch_size = 8;
    config.optim.warmup_steps = 5.min(steps);
    config.optim.lr = 1e-2;
    config.optim.min_lr = 1e-3;
    config.run.steps = steps;
    config.run.log_every = 1;
    config.run.eval_every = steps;
    config.run.eval_batches = 2;
    config.run.checkpoint_every = steps;
    config.run.samples = 0;
    config.run.backend = BackendChoice::Ndarray;
    config
}

/// A fresh folder holding the generated corpus, and the tiny config training on it.
pub fn tiny_run(name: &str, steps: usize) -> (TempDir, TrainConfig) {
    let dir = temp_dir(name);
    let corpus = dir.join("corpus.txt");
    write_generated_corpus(&corpus);
    let config = tiny_config(corpus, steps);
    (dir, config)
}
