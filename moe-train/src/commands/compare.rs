//! `burn-moe compare`: an MoE model against its dense twin, trained on the same data.
//!
//! The point of an MoE model is quality per FLOP (Switch Transformer, Fedus et al. 2021: the
//! dense baseline's quality several times sooner at equal compute). `compare` trains the MoE
//! config and its dense twin (the same model with every MoE layer replaced by a feed-forward
//! layer as wide as the experts a token visits, so both do the same work per token) with the
//! same seed, hence the same batches in the same order, and reports when the MoE model reached
//! the dense model's final validation loss: the step and the training seconds (evaluations left
//! out), with one plot of both validation curves against steps and against time.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::cli::TrainArgs;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::store::metrics::{self, Row};
use crate::store::run_dir::{check_claim, Claim};
use crate::training::{train, RunOptions, RunSummary};

/// A validation curve: `(step, training seconds, validation loss)` per evaluation.
pub type Curve = Vec<(usize, f64, f64)>;

/// What `compare` found.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The MoE run.
    pub moe: RunSummary,
    /// The dense twin's run.
    pub dense: RunSummary,
    /// The MoE run's validation curve.
    pub moe_curve: Curve,
    /// The dense run's validation curve.
    pub dense_curve: Curve,
    /// The first evaluation at which the MoE model's loss was at or below the dense model's
    /// final one: `(step, training seconds)`.
    pub reached: Option<(usize, f64)>,
    /// The plot.
    pub plot: Option<PathBuf>,
}

impl Comparison {
    /// The dense model's final validation loss, its step and seconds.
    pub fn dense_final(&self) -> Option<(usize, f64, f64)> {
        self.dense_curve.last().copied()
    }

    /// One line saying when the MoE model reached the dense model's final loss.
    pub fn verdict(&self) -> String {
        let Some((steps, seconds, loss)) = self.dense_final() else {
            return "the dense run has no evaluation".into();
        };
        match self.reached {
            Some((step, at)) => format!(
                "the MoE model reached the dense model's final validation loss {loss:.4} at step {step} of {steps} ({:.0} %) and after {at:.0} s of {seconds:.0} s ({:.0} %)",
                100.0 * step as f64 / steps as f64,
                100.0 * at / seconds.max(1e-9)
            ),
            None => format!(
                "the MoE model did not reach the dense model's final validation loss {loss:.4} (its own final: {})",
                self.moe_curve
                    .last()
                    .map(|point| format!("{:.4}", point.2))
                    .unwrap_or_else(|| "none".into())
            ),
        }
    }
}

/// Trains `config` as it is (MoE) into `out/moe` and its dense twin into `out/dense`, with
/// `options` for both (its `out` is replaced), then draws `out/compare.png`.
///
/// Both configs are checked before either side trains, so that a setting one side refuses
/// (or a Hugging Face model, which has no dense twin here) fails at once, not after the MoE
/// side's training.
pub fn compare(config: &TrainConfig, out: &Path, options: RunOptions) -> Result<Comparison> {
    if config.variant.hf.is_some() {
        return Err(TrainError::Config(
            "`compare` trains an MoE model and its dense twin from scratch; a Hugging Face model (`--init-hf`) has no dense twin here: fine-tune it with `train`".into(),
        ));
    }
    let mut moe_config = config.clone();
    moe_config.variant.dense = false;
    let mut dense_config = config.clone();
    dense_config.variant.dense = true;
    let claim = if options.overwrite {
        Claim::Overwrite
    } else {
        Claim::New
    };
    for (side, config) in [("MoE", &moe_config), ("dense", &dense_config)] {
        config.validate().map_err(|error| match error {
            TrainError::Config(reason) => {
                TrainError::Config(format!("{reason} (in the {side} side of `compare`)"))
            }
            other => other,
        })?;
    }
    for side in ["moe", "dense"] {
        check_claim(&out.join(side), claim)?;
    }
    let moe = train(
        moe_config,
        RunOptions {
            out: out.join("moe"),
            ..options.clone()
        },
    )?;
    let dense = train(
        dense_config,
        RunOptions {
            out: out.join("dense"),
            ..options
        },
    )?;
    let moe_curve = curve(&out.join("moe"))?;
    let dense_curve = curve(&out.join("dense"))?;
    let reached = dense_curve
        .last()
        .and_then(|&(_, _, target)| first_reach(&moe_curve, target));
    let path = out.join("compare.png");
    let plot = match plot(&path, &moe_curve, &dense_curve) {
        Ok(()) => Some(path),
        Err(error) => {
            eprintln!("warning: could not draw {}: {error}", path.display());
            None
        }
    };
    Ok(Comparison {
        moe,
        dense,
        moe_curve,
        dense_curve,
        reached,
        plot,
    })
}

/// The validation curve in a run folder's metrics.
pub fn curve(run_dir: &Path) -> Result<Curve> {
    Ok(metrics::read(&run_dir.join("metrics.jsonl"))?
        .into_iter()
        .filter_map(|row| match row {
            Row::Eval(row) => Some((row.step, row.train_seconds.unwrap_or(0.0), row.val_loss)),
            Row::Train(_) => None,
        })
        .collect())
}

/// The first point of `curve` at or below `target`: `(step, seconds)`. The evaluation interval
/// bounds its precision (the loss may have crossed the target up to one interval earlier).
pub fn first_reach(curve: &[(usize, f64, f64)], target: f64) -> Option<(usize, f64)> {
    curve
        .iter()
        .find(|point| point.2 <= target)
        .map(|point| (point.0, point.1))
}

/// What a plot panel puts on its x axis, from a curve's point.
type Axis = fn(&(usize, f64, f64)) -> f64;

/// Both validation curves against steps (left) and training seconds (right), with the dense
/// model's final loss as a dashed line.
fn plot(path: &Path, moe: &Curve, dense: &Curve) -> std::result::Result<(), String> {
    let labels = crate::store::plots::fonts();
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, 2));
    let all = || moe.iter().chain(dense.iter());
    let low = all().map(|p| p.2).fold(f64::MAX, f64::min);
    let high = all().map(|p| p.2).fold(f64::MIN, f64::max);
    let margin = ((high - low) * 0.05).max(1e-3);
    let losses = (low - margin)..(high + margin);
    let target = dense.last().map(|p| p.2);
    let axes: [(&str, Axis); 2] = [("step", |p| p.0 as f64), ("training seconds", |p| p.1)];
    for (panel, (name, x)) in panels.iter().zip(axes) {
        let end = all().map(x).fold(0.0, f64::max).max(1e-6);
        let mut builder = ChartBuilder::on(panel);
        builder.margin(20);
        if labels {
            builder
                .caption(format!("validation loss by {name}"), ("sans-serif", 22))
                .x_label_area_size(40)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..end, losses.clone())
            .map_err(|e| e.to_string())?;
        if labels {
            chart
                .configure_mesh()
                .x_desc(name)
                .x_label_formatter(&|value| crate::store::plots::whole_number(*value))
                .y_desc("nats per token")
                .draw()
                .map_err(|e| e.to_string())?;
        }
        for (curve, colour, label) in [(moe, BLUE, "MoE"), (dense, RED, "dense twin")] {
            let series = chart
                .draw_series(LineSeries::new(
                    curve.iter().map(|p| (x(p), p.2)),
                    colour.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?;
            if labels {
                series
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            }
        }
        if let Some(target) = target {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, target), (end, target)],
                    6,
                    4,
                    BLACK.mix(0.6).stroke_width(1),
                ))
                .map_err(|e| e.to_string())?;
        }
        if labels {
            crate::store::plots::draw_legend(&mut chart)?;
        }
    }
    root.present().map_err(|e| e.to_string())
}

/// `burn-moe compare`: trains the MoE config and its dense twin and prints both runs and the
/// verdict.
pub fn run(args: TrainArgs) -> Result<()> {
    if args.resume || args.dense || args.stop_after.is_some() {
        return Err(TrainError::Config(
            "`compare` trains two whole new runs, the MoE config and its dense twin: `--resume`, `--dense` and `--stop-after` do not apply".into(),
        ));
    }
    let config = args.resolve()?;
    for warning in args.warnings(&config) {
        eprintln!("warning: {warning}");
    }
    let out = args.compare_dir();
    let options = RunOptions {
        overwrite: args.overwrite,
        show_progress: true,
        interrupt: Some(crate::commands::train::ctrl_c_interrupts()),
        remote_token: crate::cli::token_or_env(&args.token),
        ..RunOptions::new(out.clone())
    };
    let comparison = compare(&config, &out, options)?;
    for (name, run) in [("MoE", &comparison.moe), ("dense", &comparison.dense)] {
        if let Some(accuracy) = run.accuracy {
            println!(
                "{name}: captions right {:.1} % of the validation images (chance: 10 %)",
                100.0 * accuracy
            );
        }
        let last = run
            .val_losses
            .last()
            .map(|(_, loss)| *loss)
            .unwrap_or(f64::NAN);
        println!(
            "{name}: {} parameters, {} active per token; validation loss {last:.4}; {:.0} tokens/s",
            run.parameters.0, run.parameters.1, run.tokens_per_second
        );
    }
    println!("{}", comparison.verdict());
    if let Some(plot) = &comparison.plot {
        println!("plot: {}", plot.display());
    }
    Ok(())
}
