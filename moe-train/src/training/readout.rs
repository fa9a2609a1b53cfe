//! What a logged training step reports, read from the device in one transaction.
//!
//! A training step itself reads nothing back: the losses, the gradient norm and the routing
//! statistics stay on the device as tensors (the statistics are not even computed) unless the
//! step is logged. A logged step registers all of them in one Burn `Transaction` and waits
//! once, instead of once per scalar. [`host_reads`] counts these reads, so that a test can
//! check that the loop reads nothing on the steps it does not log.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Tensor, TensorData, Transaction};
use moe_core::RoutingSummary;

use crate::data::tasks::StepOutput;
use crate::training::divergence::{NonFiniteReport, NonFiniteWatch};
use crate::training::loss_scale::LossScaler;

/// Reads made by [`StepReadout::read`] in this process.
static HOST_READS: AtomicUsize = AtomicUsize::new(0);

/// How many times this process has read a training step back to the host.
pub fn host_reads() -> usize {
    HOST_READS.load(Ordering::SeqCst)
}

/// A logged step's values on the host.
#[derive(Debug, Clone)]
pub struct StepReadout {
    /// Cross-entropy plus auxiliary losses.
    pub loss: f64,
    /// Cross-entropy alone.
    pub cross_entropy: f64,
    /// Auxiliary losses.
    pub aux_loss: f64,
    /// Global gradient norm before clipping, when it was computed.
    pub grad_norm: Option<f64>,
    /// Each MoE layer's routing.
    pub layers: Vec<RoutingSummary>,
    /// Each MoE layer's load from image positions (multimodal tasks), per expert.
    pub image_loads: Vec<Vec<i64>>,
    /// Each MoE layer's load from text positions (multimodal tasks), per expert.
    pub text_loads: Vec<Vec<i64>>,
    /// The loss scale and the steps skipped so far (mixed precision).
    pub loss_scale: Option<(f64, u64)>,
    /// What the non-finite watch has seen, when it was read.
    pub non_finite: Option<NonFiniteReport>,
}

impl StepReadout {
    /// Reads `output` (and the gradient norm, the loss scaler's state and the non-finite
    /// watch) with one synchronisation.
    pub fn read(
        output: &StepOutput,
        grad_norm: Option<&Tensor<1>>,
        scaler: Option<&LossScaler>,
        watch: Option<&NonFiniteWatch>,
    ) -> Self {
        // All without autodiff: Burn reads a transaction on its first tensor's backend, and the
        // gradient norm has none.
        let mut transaction = Transaction::default()
            .register(output.loss.clone().without_autodiff())
            .register(output.cross_entropy.clone().without_autodiff())
            .register(output.aux_loss.clone().without_autodiff());
        if let Some(norm) = grad_norm {
            transaction = transaction.register(norm.clone().without_autodiff());
        }
        for stats in &output.layer_stats {
            transaction = stats.register(transaction);
        }
        for split in &output.modality {
            transaction = transaction
                .register(split.image().without_autodiff())
                .register(split.text().without_autodiff());
        }
        if let Some(scaler) = scaler {
            transaction = transaction
                .register(scaler.scale())
                .register(scaler.skipped());
        }
        if let Some(watch) = watch {
            transaction = watch.register(transaction);
        }
        HOST_READS.fetch_add(1, Ordering::SeqCst);
        let mut data = transaction.execute().into_iter();
        let mut scalar = || first_float(data.next().expect("registered above"));
        let (loss, cross_entropy, aux_loss) = (scalar(), scalar(), scalar());
        let grad_norm = grad_norm.map(|_| scalar());
        let layers = output
            .layer_stats
            .iter()
            .map(|stats| stats.summary_from(&mut data))
            .collect();
        let (mut image_loads, mut text_loads) = (Vec::new(), Vec::new());
        for _ in &output.modality {
            image_loads.push(ints(data.next().expect("registered above")));
            text_loads.push(ints(data.next().expect("registered above")));
        }
        let loss_scale = scaler.map(|_| {
            let scale = first_float(data.next().expect("registered above"));
            let skipped = first_float(data.next().expect("registered above"));
            (scale, skipped.max(0.0) as u64)
        });
        let non_finite = watch.map(|_| NonFiniteWatch::report_from(&mut data));
        Self {
            loss,
            cross_entropy,
            aux_loss,
            grad_norm,
            layers,
            image_loads,
            text_loads,
            loss_scale,
            non_finite,
        }
    }
}

fn first_float(data: TensorData) -> f64 {
    data.iter::<f64>().next().unwrap_or(f64::NAN)
}

fn ints(data: TensorData) -> Vec<i64> {
    data.iter::<i64>().collect()
}
