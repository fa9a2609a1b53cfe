//! A dense model and an MoE model with one expert (top-1, no capacity) compute the same
//! function when they hold the same weights.

use burn::module::Module;
use moe_core::{CapacityConfig, ExpertConfig, GateConfig, MoeConfig};
use moe_models::{DecoderConfig, MoeTransformerConfig, PositionKind};

use crate::common::{cpu, random_ids, tokens, values, with_moe_every, VOCAB};

#[test]
fn dense_and_single_expert_models_agree() {
    let device = cpu();
    let moe = MoeConfig::new(16, 1, ExpertConfig::new(32))
        .with_top_k(1)
        .with_gate(GateConfig::softmax_top_k())
        .with_capacity(CapacityConfig::dropless());
    let decoder = DecoderConfig::new(10, 16, 3, 2, 32, moe).with_positions(PositionKind::Learned);
    let config = MoeTransformerConfig::new(VOCAB, decoder);
    let moe_model = config.clone().init(&device).unwrap();
    let mut dense_model = with_moe_every(config, 0).init(&device).unwrap();

    // Everything but the FFNs through the record (the router has no place in the dense model),
    // then the single expert as the dense FFN.
    dense_model = dense_model.load_record(
        moe_model
            .clone()
            .into_record()
            .allow_partial(true)
            .allow_unused(true),
    );
    for (dense_block, moe_block) in dense_model
        .stack
        .blocks
        .iter_mut()
        .zip(&moe_model.stack.blocks)
    {
        dense_block.ffn.dense = Some(moe_block.ffn.moe.as_ref().unwrap().experts.clone());
    }

    let ids = tokens(&random_ids(20, VOCAB, 4), 2, &device);
    let a = values(moe_model.forward(ids.clone()).logits);
    let b = values(dense_model.forward(ids).logits);
    moe_kernels::testing::assert_close("logits", &a, &b, 1e-5);
}
