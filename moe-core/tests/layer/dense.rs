//! One expert with top-1 routing and no capacity limit is a dense FFN.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Tensor;
use moe_core::{CapacityConfig, ExpertConfig, GateConfig, MoeConfig};

use crate::common::{assert_close, cpu, matrix, random_values, values};

#[test]
fn one_expert_top_one_equals_a_dense_ffn_with_the_same_weights() {
    let device = cpu();
    let (tokens, d_model, d_hidden) = (9, 5, 12);
    for gate in [
        GateConfig::softmax_top_k(),
        GateConfig::switch(),
        GateConfig::naive(),
    ] {
        let moe = MoeConfig::new(d_model, 1, ExpertConfig::new(d_hidden))
            .with_top_k(1)
            .with_gate(gate.clone())
            .with_capacity(CapacityConfig::dropless())
            .init(&device)
            .unwrap();
        let experts = &moe.experts;
        let first: Tensor<2> = experts.w_in.val().squeeze_dim(0);
        let second: Tensor<2> = experts.w_out.val().squeeze_dim(0);
        let linear_in = Linear {
            weight: Param::from_tensor(first),
            bias: Some(Param::from_tensor(
                experts.b_in.as_ref().unwrap().val().squeeze_dim(0),
            )),
        };
        let linear_out = Linear {
            weight: Param::from_tensor(second),
            bias: Some(Param::from_tensor(
                experts.b_out.as_ref().unwrap().val().squeeze_dim(0),
            )),
        };

        let x = matrix(
            &random_values(tokens * d_model, 3),
            tokens,
            d_model,
            &device,
        );
        let dense =
            linear_out.forward(burn::tensor::activation::gelu(linear_in.forward(x.clone())));
        let moe_output = moe.forward(x).output;
        assert_close(gate.name(), &values(moe_output), &values(dense), 1e-6);
    }
}
