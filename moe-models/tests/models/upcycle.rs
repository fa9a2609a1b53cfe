//! Upcycling: at initialisation an MoE layer whose experts copy the dense FFN computes
//! `(sum of the token's gate weights) * FFN(x)`.

use burn::module::Param;
use burn::tensor::Tensor;
use moe_core::gate::SoftmaxTopKGate;
use moe_core::{CapacityConfig, ExpertConfig, GateConfig, MoeConfig};
use moe_models::{DecoderConfig, ModelError, MoeTransformer, MoeTransformerConfig, PositionKind};

use crate::common::{cpu, random_ids, tokens, values, VOCAB};

fn dense() -> MoeTransformer {
    let moe = MoeConfig::new(16, 1, ExpertConfig::new(32));
    let decoder = DecoderConfig::new(12, 16, 2, 4, 32, moe)
        .with_moe_every(0)
        .with_positions(PositionKind::Rotary);
    MoeTransformerConfig::new(VOCAB, decoder)
        .init(&cpu())
        .unwrap()
}

fn moe(gate: GateConfig, top_k: usize) -> MoeConfig {
    MoeConfig::new(16, 4, ExpertConfig::new(32))
        .with_top_k(top_k)
        .with_gate(gate)
        .with_capacity(CapacityConfig::dropless())
}

#[test]
fn gates_whose_weights_sum_to_one_reproduce_the_dense_model() {
    let device = cpu();
    let dense = dense();
    let ids = tokens(&random_ids(24, VOCAB, 8), 2, &device);
    let expected = values(dense.forward(ids.clone()).logits);
    for (gate, top_k) in [
        (GateConfig::naive(), 2),
        (GateConfig::softmax_top_k(), 2),
        (GateConfig::gshard(), 2),
    ] {
        let upcycled =
            MoeTransformer::upcycle(&dense, moe(gate.clone(), top_k), 1, &device).unwrap();
        assert_eq!(upcycled.config().num_moe_layers(), 2);
        let actual = values(upcycled.forward(ids.clone()).logits);
        moe_kernels::testing::assert_close(gate.name(), &actual, &expected, 1e-5);
    }
}

#[test]
fn switch_with_a_uniform_router_scales_the_ffn_by_one_over_e() {
    let device = cpu();
    let dense = dense();
    for (gate, top_k, scale) in [
        (GateConfig::switch(), 1, 0.25),
        (
            GateConfig::SoftmaxTopK(SoftmaxTopKGate::new().with_renormalize(false)),
            2,
            0.5,
        ),
    ] {
        let mut upcycled =
            MoeTransformer::upcycle(&dense, moe(gate.clone(), top_k), 2, &device).unwrap();
        // Layer 1 is the MoE layer; make its router uniform.
        let layer = upcycled.stack.blocks[1].ffn.moe.as_mut().unwrap();
        layer.router.weight = Param::from_tensor(Tensor::zeros([16, 4], &device));
        let x = Tensor::<3>::from_data(
            burn::tensor::TensorData::new(
                moe_core::reference::random_values(3 * 5 * 16, 6),
                [3, 5, 16],
            ),
            &device,
        );
        let got = values(layer.forward(x.clone()).output);
        let ffn = dense.stack.blocks[1].ffn.dense.as_ref().unwrap();
        let want: Vec<f64> = values(ffn.forward(x.reshape([1, 15, 16])))
            .into_iter()
            .map(|v| v * scale)
            .collect();
        moe_kernels::testing::assert_close(gate.name(), &got, &want, 1e-5);
    }
}

#[test]
fn upcycling_checks_its_inputs() {
    let device = cpu();
    let dense = dense();
    let wrong_width = MoeConfig::new(16, 4, ExpertConfig::new(64));
    assert!(matches!(
        MoeTransformer::upcycle(&dense, wrong_width, 1, &device),
        Err(ModelError::Upcycle(_))
    ));
    let upcycled =
        MoeTransformer::upcycle(&dense, moe(GateConfig::naive(), 2), 1, &device).unwrap();
    assert!(matches!(
        MoeTransformer::upcycle(&upcycled, moe(GateConfig::naive(), 2), 1, &device),
        Err(ModelError::Upcycle(_))
    ));
}
