//! Autoregressive generation with a key/value cache.

use burn::tensor::{Int, Tensor, TensorData};

use crate::block::KvCache;
use crate::error::ModelError;
use crate::sampling::{Sampler, SamplingConfig};
use crate::transformer::MoeTransformer;

/// Settings of [`MoeTransformer::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// How each token is picked.
    pub sampling: SamplingConfig,
    /// Generation stops after producing one of these (it is included in the output).
    pub stop_tokens: Vec<usize>,
    /// Tokens never to produce (padding, say).
    pub banned_tokens: Vec<usize>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingConfig::default(),
            stop_tokens: Vec::new(),
            banned_tokens: Vec::new(),
        }
    }
}

impl MoeTransformer {
    /// Continues `prompt` (at least one token) and returns the new tokens, calling `on_token`
    /// with each as soon as it is chosen (for streaming). Decoding reuses a key/value cache;
    /// when the context is full, the cache is rebuilt from the most recent half of the text.
    pub fn generate(
        &self,
        prompt: &[usize],
        config: &GenerationConfig,
        mut on_token: impl FnMut(usize),
    ) -> Result<Vec<usize>, ModelError> {
        let vocab_size = self.config().vocab_size;
        let context = self.config().decoder.context_length;
        if prompt.is_empty() {
            return Err(ModelError::Zero {
                field: "prompt length",
            });
        }
        if let Some(&token) = prompt.iter().find(|&&t| t >= vocab_size) {
            return Err(ModelError::TokenOutOfRange { token, vocab_size });
        }
        let device = self.token_embedding.weight.val().device();
        let to_tensor = |ids: &[usize]| {
            let data: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
            Tensor::<2, Int>::from_data(TensorData::new(data, [1, ids.len()]), &device)
        };
        let mut sampler = Sampler::new(config.sampling.clone());
        let mut text: Vec<usize> = prompt.to_vec();
        let mut generated = Vec::new();

        // Prefill with the most recent part of the prompt that leaves room to generate.
        let keep = prompt.len().min(context.saturating_sub(1).max(1));
        let mut cache = KvCache::new();
        let mut logits = self
            .forward_cached(to_tensor(&text[text.len() - keep..]), &mut cache)
            .logits;

        for _ in 0..config.max_new_tokens {
            let [_, length, _] = logits.dims();
            let last: Vec<f32> = logits
                .slice([0..1, length - 1..length])
                .try_into_vec_as::<f32>()
                .expect("logits convert to f32");
            let token = sampler.sample(&last, &config.banned_tokens);
            on_token(token);
            generated.push(token);
            text.push(token);
            if config.stop_tokens.contains(&token) {
                break;
            }
            if cache.len >= context {
                // Slide: start again from the newest half of the text.
                let keep = (context / 2).max(1);
                cache = KvCache::new();
                logits = self
                    .forward_cached(to_tensor(&text[text.len() - keep..]), &mut cache)
                    .logits;
            } else {
                logits = self.forward_cached(to_tensor(&[token]), &mut cache).logits;
            }
        }
        Ok(generated)
    }
}
