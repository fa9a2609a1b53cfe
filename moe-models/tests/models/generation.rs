//! Key/value-cache decoding, generation and sampling.

use moe_core::CapacityConfig;
use moe_models::{GenerationConfig, KvCache, ModelError, PositionKind, Sampler, SamplingConfig};

use crate::common::{cpu, random_ids, tiny, tokens, values, VOCAB};

#[test]
fn cached_decoding_equals_the_full_forward_pass() {
    let device = cpu();
    for positions in [PositionKind::Rotary, PositionKind::Learned] {
        device.seed(9);
        let model = tiny(positions, CapacityConfig::dropless())
            .init(&device)
            .unwrap();
        let ids = random_ids(12, VOCAB, 21);
        let full = values(model.forward(tokens(&ids, 1, &device)).logits);

        // A prefix of 4, then one token at a time.
        let mut cache = KvCache::new();
        let mut incremental = values(
            model
                .forward_cached(tokens(&ids[..4], 1, &device), &mut cache)
                .logits,
        );
        for &id in &ids[4..] {
            incremental.extend(values(
                model
                    .forward_cached(tokens(&[id], 1, &device), &mut cache)
                    .logits,
            ));
        }
        assert_eq!(cache.len, 12);
        moe_kernels::testing::assert_close("cached logits", &incremental, &full, 1e-5);
    }
}

#[test]
fn greedy_generation_follows_the_model() {
    let device = cpu();
    let model = tiny(PositionKind::Rotary, CapacityConfig::dropless())
        .init(&device)
        .unwrap();
    let prompt = random_ids(5, VOCAB, 2);
    let config = GenerationConfig {
        max_new_tokens: 6,
        sampling: SamplingConfig {
            temperature: 0.0,
            ..SamplingConfig::default()
        },
        ..GenerationConfig::default()
    };
    let mut streamed = Vec::new();
    let generated = model
        .generate(&prompt, &config, |t| streamed.push(t))
        .unwrap();
    assert_eq!(generated, streamed);
    assert_eq!(generated.len(), 6);
    // Each greedy token is the argmax of a full forward pass over the text so far.
    let mut text = prompt.clone();
    for &token in &generated {
        let logits = values(model.forward(tokens(&text, 1, &device)).logits);
        let last = &logits[(text.len() - 1) * VOCAB..];
        let argmax = (0..VOCAB)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap();
        assert_eq!(token, argmax);
        text.push(token);
    }
}

#[test]
fn generation_is_seeded_stops_and_slides_past_the_context() {
    let device = cpu();
    let model = tiny(PositionKind::Learned, CapacityConfig::dropless())
        .init(&device)
        .unwrap();
    let prompt = [3, 4, 5];
    let run = |seed: u64, max_new_tokens: usize, stop_tokens: Vec<usize>| {
        let config = GenerationConfig {
            max_new_tokens,
            sampling: SamplingConfig {
                temperature: 1.0,
                top_k: None,
                top_p: None,
                seed,
            },
            stop_tokens,
            banned_tokens: vec![0],
        };
        model.generate(&prompt, &config, |_| {}).unwrap()
    };
    assert_eq!(run(1, 8, vec![]), run(1, 8, vec![]));
    assert_ne!(run(1, 8, vec![]), run(2, 8, vec![]));
    // Context is 12: 30 new tokens force the cache to slide.
    let long = run(3, 30, vec![]);
    assert_eq!(long.len(), 30);
    assert!(
        long.iter().all(|&t| t != 0 && t < VOCAB),
        "banned or invalid token in {long:?}"
    );
    // Every token is a stop token: one token, then stop.
    assert_eq!(run(3, 30, (0..VOCAB).collect()).len(), 1);
}

#[test]
fn bad_prompts_are_refused() {
    let model = tiny(PositionKind::Rotary, CapacityConfig::dropless())
        .init(&cpu())
        .unwrap();
    let config = GenerationConfig::default();
    assert!(matches!(
        model.generate(&[], &config, |_| {}),
        Err(ModelError::Zero { .. })
    ));
    assert_eq!(
        model.generate(&[VOCAB + 1], &config, |_| {}).unwrap_err(),
        ModelError::TokenOutOfRange {
            token: VOCAB + 1,
            vocab_size: VOCAB
        }
    );
}

#[test]
fn sampling_follows_the_softmax_and_its_filters() {
    // Logits ln 1, ln 3: probabilities 0.25 and 0.75.
    let logits = [0.0f32, 3f32.ln()];
    let mut sampler = Sampler::new(SamplingConfig {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed: 5,
    });
    let ones = (0..8000)
        .filter(|_| sampler.sample(&logits, &[]) == 1)
        .count();
    let share = ones as f64 / 8000.0;
    assert!(
        (share - 0.75).abs() < 0.02,
        "token 1 drawn {share} of the time, expected 0.75"
    );

    // top-k 1, top-p below the largest probability and temperature 0 are all greedy.
    for config in [
        SamplingConfig {
            temperature: 1.0,
            top_k: Some(1),
            top_p: None,
            seed: 1,
        },
        SamplingConfig {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
            seed: 1,
        },
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 1,
        },
    ] {
        let mut sampler = Sampler::new(config.clone());
        assert!(
            (0..200).all(|_| sampler.sample(&logits, &[]) == 1),
            "{config:?}"
        );
    }
    // A banned token is never drawn.
    let mut sampler = Sampler::new(SamplingConfig {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed: 2,
    });
    assert!((0..200).all(|_| sampler.sample(&logits, &[1]) == 0));
}
