//! Drop the MoE layer into your own Burn model and train it.
//!
//! A toy regression where the right answer depends on which quadrant the input lies in: four
//! different linear maps, one per quadrant of `(x0, x1)`. A layer of four experts learns it;
//! the router learns to send each quadrant to its own expert.
//!
//! ```sh
//! cargo run --release --example moe_layer -- --backend auto --steps 1000
//! ```

use burn::optim::{AdamWConfig, GradientsParams};
use burn_moe::core::rng::SplitMix64;
use burn_moe::core::{CapacityConfig, ExpertConfig, GateConfig, MoeConfig};
use burn_moe::train::runtime::backend::{select_and_report, BackendChoice, Precision};
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// Where to run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
}

#[path = "common/quadrants.rs"]
mod quadrants;
use quadrants::{batch, maps, Regressor, D};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let selected = select_and_report(args.backend, Precision::F32)?;
    let device = selected.device.autodiff();
    device.seed(0);

    let mut rng = SplitMix64(42);
    let maps = maps(&mut rng);
    let mut model = Regressor {
        moe: MoeConfig::new(D, 4, ExpertConfig::new(32))
            .with_top_k(1)
            .with_gate(GateConfig::switch())
            .with_capacity(CapacityConfig::dropless())
            .init(&device)?,
    };
    let mut optim = AdamWConfig::new().init();

    for step in 1..=args.steps {
        let (x, y) = batch(&mut rng, &maps, &device);
        let out = model.moe.forward(x);
        let mse = (out.output - y).powi_scalar(2).mean();
        let loss = mse.clone() + out.aux_loss;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
        if step % 50 == 0 || step == 1 {
            let summary = out.stats.summary();
            println!(
                "step {step:4}  mse {:.4}  tokens per expert {:?}",
                mse.into_scalar::<f32>(),
                summary.tokens_per_expert
            );
        }
    }
    Ok(())
}
