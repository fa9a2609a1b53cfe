//! A routing function of your own in burn-moe's MoE layer: DeepSeek-V3's sigmoid scoring
//! (Liu et al. 2024), which none of the built-in gates computes, trained on the toy task of
//! `moe_layer.rs` (four linear maps, one per quadrant of the input).
//!
//! The gate scores experts with `sigmoid(x W)` instead of a softmax, keeps the top `k` and
//! renormalises them; the layer's dispatch, capacity limits, auxiliary losses and statistics
//! are the ones every built-in gate uses.
//!
//! ```sh
//! cargo run --release --example custom_gate -- --steps 300
//! ```

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::Device;
use burn_moe::core::gate::{
    assignment_fraction, to_expert_matrix, top_k_indices, Gate, GateInput, GateOutput,
};
use burn_moe::core::losses::load_balancing_loss;
use burn_moe::core::rng::SplitMix64;
use burn_moe::core::{CapacityConfig, ExpertConfig, MoeConfig};
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
}

/// Sigmoid affinities, top-k, renormalised (DeepSeek-V3), with the Switch-style balancing loss
/// computed from the affinities normalised over the experts.
#[derive(Debug)]
struct SigmoidGate;

impl Gate for SigmoidGate {
    fn route(&self, input: GateInput<'_>) -> GateOutput {
        let logits = input.router.logits(input.x);
        let scores = sigmoid(logits.clone());
        let indices = top_k_indices(scores.clone(), input.top_k);
        let chosen = scores.clone().gather(1, indices.clone());
        let chosen = chosen.clone() / chosen.sum_dim(1);
        let (weights, candidates) = to_expert_matrix(indices, chosen, input.router.num_experts());
        let affinity = scores.clone() / scores.sum_dim(1);
        let fraction = assignment_fraction(candidates.clone(), input.top_k);
        GateOutput {
            balance_loss: Some(load_balancing_loss(affinity, fraction)),
            probs: softmax(logits.clone(), 1),
            logits,
            candidates,
            weights,
        }
    }
}

#[path = "common/quadrants.rs"]
mod quadrants;
use quadrants::{batch, maps, Regressor, D};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Device::flex().autodiff();
    device.seed(0);
    let mut rng = SplitMix64(7);
    let maps = maps(&mut rng);
    let moe = MoeConfig::new(D, 4, ExpertConfig::new(32))
        .with_top_k(1)
        .with_capacity(CapacityConfig::dropless())
        .init(&device)?
        .with_gate(SigmoidGate);
    let mut model = Regressor { moe };
    let mut optimizer = AdamWConfig::new().init();
    for step in 1..=args.steps {
        let (x, y) = batch(&mut rng, &maps, &device);
        let out = model.moe.forward(x);
        let mse = (out.output - y).powi_scalar(2).mean();
        let loss = mse.clone() + out.aux_loss;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads);
        if step % 50 == 0 || step == 1 {
            println!(
                "step {step:4}: mean squared error {:.4}, tokens per expert {:?}",
                mse.into_scalar::<f32>(),
                out.stats.summary().tokens_per_expert
            );
        }
    }
    // The gate travels with the layer: a clone routes the same way.
    assert!(model.clone().moe.custom_gate().is_some());
    Ok(())
}
