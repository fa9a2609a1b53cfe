//! The multimodal model: shapes, modality routing statistics, generation.

use moe_core::rng::SplitMix64;
use moe_core::{CapacityConfig, ExpertConfig, GateConfig, MoeConfig};
use moe_models::digits::{self, TEXT_VOCAB};
use moe_models::{
    DecoderConfig, Modality, MultimodalMoeTransformerConfig, SamplingConfig, Segment,
};

use crate::common::cpu;

pub fn config(levels: usize) -> MultimodalMoeTransformerConfig {
    let moe = MoeConfig::new(32, 4, ExpertConfig::new(48))
        .with_top_k(2)
        .with_gate(GateConfig::softmax_top_k())
        .with_capacity(CapacityConfig::dropless());
    // 8x8 images: 16 patches of 2x2, or 64 pixel tokens.
    let decoder = DecoderConfig::new(80, 32, 2, 4, 64, moe);
    MultimodalMoeTransformerConfig::new(TEXT_VOCAB.len(), levels, 8, 2, decoder)
}

#[test]
fn routing_is_split_by_modality() {
    let device = cpu();
    let model = config(4).init(&device).unwrap();
    let batch = digits::batch(3, 4, &mut SplitMix64(1), &device);
    let out = model.forward(
        &Segment::ImagePatches(batch.images.clone()),
        &Segment::Text(batch.captions.clone()),
    );
    assert_eq!(out.logits.dims(), [3, 2, TEXT_VOCAB.len()]);
    assert_eq!(out.modality_routing.len(), 2);
    // Sequence: 16 patches then 1 caption token (the last caption token is only predicted).
    for (split, stats) in out.modality_routing.iter().zip(&out.layer_stats) {
        let image: Vec<i64> = split.image().try_into_vec_as().unwrap();
        let text: Vec<i64> = split.text().try_into_vec_as().unwrap();
        let total: Vec<i64> = stats.tokens_per_expert.clone().try_into_vec_as().unwrap();
        assert_eq!(
            image.iter().sum::<i64>(),
            3 * 16 * 2,
            "top-2 of 16 image positions"
        );
        assert_eq!(text.iter().sum::<i64>(), 3 * 2, "top-2 of 1 text position");
        for e in 0..4 {
            assert_eq!(image[e] + text[e], total[e]);
        }
    }

    // Text first: the image tokens are the target.
    let out = model.forward(
        &Segment::Text(batch.prompts.clone()),
        &Segment::ImageTokens(batch.image_tokens.clone()),
    );
    assert_eq!(out.logits.dims(), [3, 64, 4]);
    let image: i64 = out.modality_routing[0].image().sum().into_scalar();
    assert_eq!(image, 3 * 63 * 2, "63 image-token positions are inputs");
}

#[test]
fn generates_image_tokens_from_a_prompt() {
    let device = cpu();
    let model = config(2).init(&device).unwrap();
    let batch = digits::batch(1, 2, &mut SplitMix64(2), &device);
    let tokens = model
        .generate(
            &Segment::Text(batch.prompts),
            Modality::Image,
            64,
            SamplingConfig::default(),
        )
        .unwrap();
    assert_eq!(tokens.len(), 64);
    assert!(tokens.iter().all(|&t| t < 2));
}

#[test]
fn drawn_digits_look_like_their_glyphs() {
    // The stroke pixels of a drawn "1" are bright and the background dark.
    let pixels = digits::draw(1, &mut SplitMix64(3));
    let bright = pixels.iter().filter(|&&p| p > 0.5).count();
    // The glyph of 1 has 10 stroke cells.
    assert_eq!(bright, 10);
    assert!(pixels.iter().all(|&p| (0.0..=1.0).contains(&p)));
    assert_eq!(digits::quantize(0.99, 4), 3);
    assert_eq!(digits::quantize(0.0, 4), 0);
}
