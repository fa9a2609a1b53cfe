//! Both models over several devices: experts spread over them (expert parallelism) and
//! replicas that share one set of weights (data parallelism).
//!
//! Expert parallelism (GShard, FastMoE) gives each device some of each MoE layer's experts
//! ([`moe_core::placement`]). Data parallelism runs a slice of the batch on each device, on a
//! replica of two kinds: moved to its device *inside the autodiff graph*
//! ([`ExpertParallel::replica_on`]), so the gradient of every replica's loss flows back to the
//! one set of weights and adds up there; or holding weights of its own across steps
//! ([`ExpertParallel::replica_with_own_weights_on`]), whose gradients the training loop sums
//! over the replicas before each applies the same update (as PyTorch's DDP does). Placed experts
//! are not copied: each replica sends its tokens to the experts' devices. Both are data in the
//! model, not branches.

use burn::module::Module;
use burn::tensor::Device;
use moe_core::placement::ShardedParam;

use crate::{DecoderStack, ModelError, MoeTransformer, MultimodalMoeTransformer};

/// A model built on a [`DecoderStack`] that can spread its experts over devices and run as
/// data-parallel replicas.
pub trait ExpertParallel: Module + Sized {
    /// The model's decoder.
    fn stack(&self) -> &DecoderStack;
    /// The model's decoder, to change.
    fn stack_mut(&mut self) -> &mut DecoderStack;

    /// The model with each MoE layer's experts spread evenly over `devices` (expert
    /// parallelism, [`moe_core::placement`]): the embeddings, attention, routers and shared
    /// experts stay on the model's device, the tokens routed to an expert travel to its device
    /// and back. The output and the gradients are the one-device model's. Save the model
    /// [`ExpertParallel::gathered`].
    fn with_expert_placement(mut self, devices: &[Device]) -> Result<Self, ModelError> {
        if devices.is_empty() {
            return Err(
                moe_core::MoeError::Placement("no device to place the experts on".into()).into(),
            );
        }
        self.stack_mut().place_experts(devices)?;
        Ok(self)
    }

    /// The model with every expert back on its own device, in one stack per layer, under the
    /// parameter ids it had before placement: the form that is saved (a record never says
    /// where an expert lived).
    fn gathered(mut self) -> Self {
        self.stack_mut().gather_experts();
        self
    }

    /// The placed experts' parameters, each with its shards ([`ShardedParam`]).
    fn sharded_params(&self) -> Vec<ShardedParam> {
        self.stack().sharded_params()
    }

    /// The model as a data-parallel replica on `device`: every parameter moved there in the
    /// autodiff graph (gradients flow back to `self`'s parameters and add up there), except
    /// placed experts, which stay on their devices and serve every replica.
    fn replica_on(&self, device: &Device) -> Self {
        let mut model = self.clone();
        let layers = model.stack_mut().take_moe_layers();
        let mut replica = model.to_device(device);
        replica.stack_mut().put_moe_layers(layers, device);
        replica
    }

    /// The model as a data-parallel replica on `device` that keeps weights of its own across
    /// steps: every parameter copied there as a new leaf of the autodiff graph
    /// ([`Module::fork`]: the same ids, gradients of its own, which the training loop reduces
    /// over the replicas), except placed experts, which stay on their devices and serve every
    /// replica. After each update of the placed experts, [`ExpertParallel::share_placed_experts`].
    fn replica_with_own_weights_on(&self, device: &Device) -> Self {
        let mut model = self.clone();
        let layers = model.stack_mut().take_moe_layers();
        let mut replica = model.fork(device);
        replica
            .stack_mut()
            .put_moe_layers_with_own_weights(layers, device);
        replica
    }

    /// Takes `from`'s placed experts (the same tensors) in place of this replica's.
    fn share_placed_experts(&mut self, from: &Self) {
        self.stack_mut().share_placed_experts(from.stack());
    }
}

impl ExpertParallel for MoeTransformer {
    fn stack(&self) -> &DecoderStack {
        &self.stack
    }

    fn stack_mut(&mut self) -> &mut DecoderStack {
        &mut self.stack
    }
}

impl ExpertParallel for MultimodalMoeTransformer {
    fn stack(&self) -> &DecoderStack {
        &self.stack
    }

    fn stack_mut(&mut self) -> &mut DecoderStack {
        &mut self.stack
    }
}
