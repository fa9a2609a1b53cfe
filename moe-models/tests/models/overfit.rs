//! Tiny models memorise tiny batches: the training loop, gradients and optimiser work end to end.

use burn::optim::{AdamWConfig, GradientsParams};
use moe_core::rng::SplitMix64;
use moe_core::CapacityConfig;
use moe_models::digits;
use moe_models::{PositionKind, Segment};

use crate::common::{cpu, random_ids, tiny, tokens, VOCAB};

#[test]
fn the_text_model_memorises_a_batch() {
    let device = cpu().autodiff();
    device.seed(1);
    let mut model = tiny(PositionKind::Rotary, CapacityConfig::new())
        .init(&device)
        .unwrap();
    let mut optim = AdamWConfig::new().init();
    let ids = random_ids(4 * 13, VOCAB, 99);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for row in ids.chunks(13) {
        inputs.extend_from_slice(&row[..12]);
        targets.extend_from_slice(&row[1..]);
    }
    let inputs = tokens(&inputs, 4, &device);
    let targets = tokens(&targets, 4, &device);
    let mask = targets.clone().greater_equal_elem(0);
    let mut last = f32::MAX;
    for _ in 0..200 {
        let out = model.loss(inputs.clone(), targets.clone(), mask.clone());
        last = out.cross_entropy.clone().into_scalar();
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    // ln(23) = 3.14 at chance; memorised well below 0.3.
    assert!(last < 0.3, "cross-entropy after 200 steps: {last}");
}

fn train_multimodal(caption: bool, steps: usize) -> f32 {
    let device = cpu().autodiff();
    device.seed(2);
    let levels = 2;
    let mut model = crate::multimodal::config(levels).init(&device).unwrap();
    let mut optim = AdamWConfig::new().init();
    let batch = digits::batch(6, levels, &mut SplitMix64(4), &device);
    let (prefix, target) = if caption {
        (
            Segment::ImagePatches(batch.images),
            Segment::Text(batch.captions),
        )
    } else {
        (
            Segment::Text(batch.prompts),
            Segment::ImageTokens(batch.image_tokens),
        )
    };
    let mut last = f32::MAX;
    for _ in 0..steps {
        let (loss, out) = model.loss(&prefix, &target);
        last = (loss.clone() - out.aux_loss).into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    last
}

#[test]
fn the_multimodal_model_learns_to_caption() {
    // Six images, ten possible numerals: chance is ln(13) = 2.6 per token.
    let loss = train_multimodal(true, 120);
    assert!(loss < 0.1, "caption cross-entropy after 120 steps: {loss}");
}

#[test]
fn the_multimodal_model_learns_to_draw() {
    // 64 binary pixel tokens per image: chance is ln(2) = 0.69 per token. The prompt does not
    // say where the digit sits, but the first stroke pixels do, so the loss can fall far.
    let loss = train_multimodal(false, 400);
    assert!(loss < 0.2, "pixel cross-entropy after 400 steps: {loss}");
}
