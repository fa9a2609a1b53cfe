//! Parameter counts against a hand count.

use burn::module::Module;
use moe_core::CapacityConfig;
use moe_models::PositionKind;

use crate::common::{cpu, tiny, with_moe_every};

#[test]
fn counts_match_a_hand_count_and_burn() {
    // vocab 23, d 16, 2 layers, 4 heads, d_ff 48, LayerNorm, rotary, tied embeddings;
    // MoE: 4 FFN experts of 24 hidden units, top-2, in every layer.
    let config = tiny(PositionKind::Rotary, CapacityConfig::new());
    let embedding = 23 * 16; // 368
    let norm = 2 * 16; // gamma and beta
    let attention = 4 * (16 * 16 + 16); // q, k, v, o with biases: 1088
    let router = 16 * 4; // 64
    let expert = 2 * 16 * 24 + 24 + 16; // 808
    let moe_block = 2 * norm + attention + router + 4 * expert; // 4448
    let total = embedding + 2 * moe_block + norm; // 9296
    let active = embedding + 2 * (2 * norm + attention + router + 2 * expert) + norm; // 6064
    assert_eq!((total, active), (9296, 6064));

    let count = config.parameter_count();
    assert_eq!(count.total, total);
    assert_eq!(count.active, active);
    assert_eq!(count.embedding, embedding);
    assert_eq!(config.init(&cpu()).unwrap().num_params(), total);

    // Every other layer MoE: layer 0 is a dense FFN of 48 hidden units.
    let mixed = with_moe_every(config.clone(), 2);
    let dense_ffn = 2 * 16 * 48 + 48 + 16; // 1600
    let mixed_total = embedding + (2 * norm + attention + dense_ffn) + moe_block + norm;
    assert_eq!(mixed.parameter_count().total, mixed_total);
    assert_eq!(mixed.init(&cpu()).unwrap().num_params(), mixed_total);
}

#[test]
fn the_dense_equivalent_has_the_same_active_parameters_but_routers_and_biases() {
    let config = tiny(PositionKind::Rotary, CapacityConfig::new());
    let dense = config.dense_equivalent();
    assert_eq!(dense.num_moe_layers(), 0);
    assert_eq!(dense.decoder.d_ff, 2 * 24);
    let count = dense.parameter_count();
    assert_eq!(count.total, count.active);
    // Two MoE layers: routers 2 * 64, and top_k - 1 = 1 extra output bias of 16 each.
    assert_eq!(
        count.active,
        config.parameter_count().active - 2 * 64 - 2 * 16
    );
    assert_eq!(dense.init(&cpu()).unwrap().num_params(), count.total);
}
