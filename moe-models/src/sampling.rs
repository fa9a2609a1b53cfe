//! Choosing the next token from logits: temperature, top-k, top-p (nucleus), greedy.

use moe_core::rng::SplitMix64;

/// How to pick each generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (Holtzman et
    /// al. 2020, "The Curious Case of Neural Text Degeneration"); None: all.
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            seed: 0,
        }
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler with `config`'s settings and seed.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = SplitMix64(config.seed);
        Self { config, rng }
    }

    /// Picks a token id from one row of logits. Tokens listed in `banned` are never picked.
    pub fn sample(&mut self, logits: &[f32], banned: &[usize]) -> usize {
        let mut candidates: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(id, logit)| !banned.contains(id) && logit.is_finite())
            .map(|(id, &logit)| (id, logit as f64))
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        // Most likely first; ties by id, so the result never depends on sort stability.
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.temperature <= 0.0 {
            return candidates[0].0;
        }
        if let Some(k) = self.config.top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, logit)| ((logit - max) / self.config.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.config.top_p {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let draw = self.rng.unit();
        let mut cumulative = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if draw < cumulative {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}
