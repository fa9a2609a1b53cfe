//! The text model with its experts spread over an ndarray and a flex device against the same
//! model on one device: same loss, same gradients, same cached decoding; gathered back, the
//! same weights.

#![cfg(feature = "flex")]

use burn::module::Module;
use burn::tensor::Device;
use moe_core::CapacityConfig;
use moe_models::{ExpertParallel, KvCache, MoeTransformer, PositionKind};

use crate::common::{cpu, random_ids, tiny, tokens, values, VOCAB};

/// The first MoE layer's router weight.
fn first_router(model: &MoeTransformer) -> &burn::module::Param<burn::tensor::Tensor<2>> {
    let block = &model.stack.blocks[0];
    &block
        .ffn
        .moe
        .as_ref()
        .expect("block 0 is MoE")
        .router
        .weight
}

/// Loss, the gradient of the embedding and of the first MoE layer's router, for one batch.
fn loss_and_gradients(model: &MoeTransformer, device: &Device) -> Vec<Vec<f64>> {
    let ids = random_ids(2 * 12, VOCAB, 5);
    let targets = random_ids(2 * 12, VOCAB, 6);
    let targets = tokens(&targets, 2, device);
    let mask = targets.clone().greater_equal_elem(0);
    let out = model.loss(tokens(&ids, 2, device), targets, mask);
    let grads = out.loss.backward();
    let router = first_router(model);
    vec![
        values(out.loss),
        values(model.token_embedding.weight.val().grad(&grads).unwrap()),
        values(router.val().grad(&grads).unwrap()),
    ]
}

#[test]
fn a_placed_model_trains_and_decodes_as_on_one_device() {
    let home = cpu().autodiff();
    let flex = Device::flex().autodiff();
    for capacity in [CapacityConfig::dropless(), CapacityConfig::new()] {
        home.seed(4);
        let single = tiny(PositionKind::Rotary, capacity).init(&home).unwrap();
        let placed = single
            .clone()
            .with_expert_placement(&[flex.clone(), home.clone()])
            .unwrap();
        let moe = placed.stack.blocks[1].ffn.moe.as_ref().unwrap();
        assert_eq!(moe.placement().unwrap().ranges(), &[0..2, 2..4]);
        for (want, got) in loss_and_gradients(&single, &home)
            .iter()
            .zip(loss_and_gradients(&placed, &home))
        {
            moe_kernels::testing::assert_close("placed model", &got, want, 1e-5);
        }

        // Decoding with the cache, in evaluation form.
        let (single, placed) = (single.valid(), placed.valid());
        let prompt = tokens(&random_ids(7, VOCAB, 8), 1, &cpu());
        let decode = |model: &MoeTransformer| {
            let mut cache = KvCache::new();
            let _ = model.forward_cached(prompt.clone(), &mut cache);
            values(
                model
                    .forward_cached(tokens(&[3], 1, &cpu()), &mut cache)
                    .logits,
            )
        };
        moe_kernels::testing::assert_close("cache", &decode(&placed), &decode(&single), 1e-5);

        let gathered = placed.gathered();
        let experts = |model: &MoeTransformer| {
            let moe = model.stack.blocks[1].ffn.moe.as_ref().unwrap();
            assert!(moe.placed_experts.is_empty() && moe.placement().is_none());
            values(moe.experts.w_out.val())
        };
        assert_eq!(experts(&gathered), experts(&single));
    }
}

/// The cross-entropy of `ids` (the inputs, then the targets; rows of 12 tokens) run by `model`
/// on `device`, brought to `home` and scaled by `share`.
fn slice_loss(
    model: &MoeTransformer,
    ids: &[usize],
    device: &Device,
    home: &Device,
    share: f64,
) -> burn::tensor::Tensor<1> {
    let rows = ids.len() / 24;
    let (inputs, targets) = ids.split_at(ids.len() / 2);
    let targets = tokens(targets, rows, device);
    let mask = targets.clone().greater_equal_elem(0);
    let out = model.loss(tokens(inputs, rows, device), targets, mask);
    out.cross_entropy.to_device(home).mul_scalar(share)
}

/// The set-up of the replica tests: the model on the CPU, the flex device, and 24 rows of
/// token ids (inputs then targets) to split in halves.
struct Halves {
    home: Device,
    flex: Device,
    model: MoeTransformer,
    inputs: Vec<usize>,
    targets: Vec<usize>,
}

impl Halves {
    fn new() -> Self {
        let home = cpu().autodiff();
        home.seed(9);
        let model = tiny(PositionKind::Rotary, CapacityConfig::dropless())
            .init(&home)
            .unwrap();
        Self {
            flex: Device::flex().autodiff(),
            model,
            home,
            inputs: random_ids(2 * 12, VOCAB, 11),
            targets: random_ids(2 * 12, VOCAB, 12),
        }
    }

    /// Rows `range`: their inputs, then their targets.
    fn rows(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        let mut ids = self.inputs[range.clone()].to_vec();
        ids.extend_from_slice(&self.targets[range]);
        ids
    }

    /// The model in one stack and with its experts placed over both devices.
    fn models(&self) -> [(&'static str, MoeTransformer); 2] {
        let placed = self
            .model
            .clone()
            .with_expert_placement(&[self.flex.clone(), self.home.clone()])
            .unwrap();
        [
            ("one stack", self.model.clone()),
            ("placed experts", placed),
        ]
    }
}

/// Two data-parallel replicas, each on half the batch (one in place, one on flex), with their
/// losses averaged: one backward pass gives the model's weights the gradient of the whole
/// batch on one device (so the replicas' gradients are averaged, not summed), with the
/// experts in one stack and placed over both devices.
#[test]
fn replicas_average_their_gradients_into_the_model() {
    let halves = Halves::new();
    let (home, flex) = (&halves.home, &halves.flex);
    let gradients = |model: &MoeTransformer, loss: burn::tensor::Tensor<1>| {
        let grads = loss.backward();
        let router = first_router(model);
        vec![
            values(model.token_embedding.weight.val().grad(&grads).unwrap()),
            values(router.val().grad(&grads).unwrap()),
        ]
    };
    let single = &halves.model;
    let whole = gradients(
        single,
        slice_loss(single, &halves.rows(0..24), home, home, 1.0),
    );
    for (name, model) in halves.models() {
        let replica = model.replica_on(flex);
        let loss = slice_loss(&model, &halves.rows(0..12), home, home, 0.5)
            + slice_loss(&replica, &halves.rows(12..24), flex, home, 0.5);
        for (want, got) in whole.iter().zip(gradients(&model, loss)) {
            moe_kernels::testing::assert_close(name, &got, want, 1e-5);
        }
    }
}

/// A replica that keeps weights of its own: one backward pass gives the model's weights the
/// gradient of its own half of the batch and the replica's weights that of the other half
/// (their sum is the whole batch's gradient, which neither holds alone), with the experts in
/// one stack and placed over both devices (then shared by the two).
#[test]
fn a_replica_with_its_own_weights_takes_its_own_gradient() {
    let halves = Halves::new();
    let (home, flex) = (&halves.home, &halves.flex);
    let embedding_grad = |model: &MoeTransformer, grads: &burn::tensor::Gradients| {
        values(model.token_embedding.weight.val().grad(grads).unwrap())
    };
    let single = &halves.model;
    let whole_loss = slice_loss(single, &halves.rows(0..24), home, home, 1.0);
    let whole = embedding_grad(single, &whole_loss.backward());
    for (name, model) in halves.models() {
        let replica = model.replica_with_own_weights_on(flex);
        let loss = slice_loss(&model, &halves.rows(0..12), home, home, 0.5)
            + slice_loss(&replica, &halves.rows(12..24), flex, home, 0.5);
        let grads = loss.backward();
        let (own, theirs) = (
            embedding_grad(&model, &grads),
            embedding_grad(&replica, &grads),
        );
        let sum: Vec<f64> = own.iter().zip(&theirs).map(|(a, b)| a + b).collect();
        moe_kernels::testing::assert_close(name, &sum, &whole, 1e-5);
        let apart = own
            .iter()
            .zip(&whole)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            apart > 1e-4,
            "{name}: the model took the replica's gradient too"
        );
    }
}
