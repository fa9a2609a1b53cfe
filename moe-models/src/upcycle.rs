//! Sparse upcycling: an MoE model started from a trained dense one.
//!
//! Every expert of a new MoE layer starts as a copy of the dense layer's FFN, the router starts
//! small, and everything else (embeddings, attention, norms, the remaining dense layers) is
//! copied unchanged. Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from
//! Dense Checkpoints" (ICLR 2023); Megatron-Core offers the same.
//!
//! **What is guaranteed at initialisation.** For every token, the MoE layer computes
//! `sum_j g_j(x) * FFN(x)` (all experts are equal), i.e. `(sum_j g_j(x)) * FFN(x)`, plus the
//! shared experts, which start with a zero output projection and so add nothing. Gates whose
//! weights sum to one -- the naive gate, softmax top-k with `renormalize`, GShard without a
//! dropped second choice -- therefore reproduce the dense model exactly, whatever the router
//! says, as long as capacity drops nothing (dropless, or enough capacity). Switch and
//! un-renormalised softmax top-k scale the FFN by the chosen probability, which is `1/E` for
//! each expert when the router is uniform.

use burn::module::Param;
use burn::tensor::{Device, Tensor};
use moe_core::init::normal;
use moe_core::MoeConfig;

use crate::block::FeedForward;
use crate::error::ModelError;
use crate::transformer::MoeTransformer;

/// Standard deviation of the upcycled routers' initial weights.
pub const UPCYCLED_ROUTER_STD: f64 = 0.01;

impl MoeTransformer {
    /// Builds an MoE model from the dense model `dense` (no MoE layer): the blocks chosen by
    /// `moe_every` (and not listed in its `dense_layers`) get the MoE layer `moe`, whose experts
    /// copy that block's FFN.
    pub fn upcycle(
        dense: &MoeTransformer,
        moe: MoeConfig,
        moe_every: usize,
        device: &Device,
    ) -> Result<MoeTransformer, ModelError> {
        let dense_config = &dense.config().decoder;
        let upcycle_error = |message: String| Err(ModelError::Upcycle(message));
        if dense_config.num_moe_layers() != 0 {
            return upcycle_error(
                "the source model already has MoE layers (moe_every != 0)".into(),
            );
        }
        if moe_every == 0 {
            return upcycle_error("`moe_every` is 0, so no layer would become MoE".into());
        }
        if moe.expert.d_hidden != dense_config.d_ff
            || moe.expert.kind != dense_config.moe.expert.kind
        {
            return upcycle_error(format!(
                "the experts ({:?}, d_hidden {}) must have the dense FFN's form ({:?}, d_ff {})",
                moe.expert.kind,
                moe.expert.d_hidden,
                dense_config.moe.expert.kind,
                dense_config.d_ff
            ));
        }
        let mut config = dense.config().clone();
        config.decoder = dense_config.clone().with_moe_every(moe_every);
        config.decoder.moe = moe.clone();
        config.validate()?;

        let mut model = dense.clone();
        for (index, block) in model.stack.blocks.iter_mut().enumerate() {
            if !config.decoder.is_moe_layer(index) {
                continue;
            }
            let ffn = block
                .ffn
                .dense
                .as_ref()
                .expect("a dense model has dense FFNs");
            let mut layer = FeedForward::moe(&moe, device)?;
            let moe_layer = layer.moe.as_mut().expect("just built");
            let copy = |param: &Param<Tensor<3>>| {
                Param::from_tensor(param.val().detach().repeat_dim(0, moe.num_experts))
            };
            let copy_bias = |param: &Param<Tensor<2>>| {
                Param::from_tensor(param.val().detach().repeat_dim(0, moe.num_experts))
            };
            moe_layer.experts.w_in = copy(&ffn.w_in);
            moe_layer.experts.w_out = copy(&ffn.w_out);
            moe_layer.experts.w_gate = ffn.w_gate.as_ref().map(copy);
            moe_layer.experts.b_in = ffn.b_in.as_ref().map(copy_bias);
            moe_layer.experts.b_out = ffn.b_out.as_ref().map(copy_bias);
            moe_layer.router.weight = normal(
                [config.decoder.d_model, moe.num_experts],
                UPCYCLED_ROUTER_STD,
                device,
            );
            if let Some(shared) = moe_layer.shared_experts.as_mut() {
                shared.w_out = Param::from_tensor(shared.w_out.val().zeros_like());
                shared.b_out = shared
                    .b_out
                    .as_ref()
                    .map(|b| Param::from_tensor(b.val().zeros_like()));
            }
            block.ffn = FeedForward {
                dense: None,
                moe: layer.moe,
            };
        }
        model.set_config(config);
        Ok(model)
    }
}
