//! Dropout where Burn's `Dropout` module would apply it, with the mask of
//! [`moe_kernels::dropout`] (one pass of counter-based draws on flex instead of Burn's
//! per-element sampler). The module stays Burn's `Dropout`, so configs, records and
//! `freeze` behave as before.

use burn::nn::Dropout;
use burn::tensor::Tensor;

/// `dropout.forward(x)`: inverted dropout with probability `dropout.prob` while training (on
/// an autodiff device, with the module not frozen), `x` unchanged otherwise.
pub(crate) fn apply_dropout<const D: usize>(dropout: &Dropout, x: Tensor<D>) -> Tensor<D> {
    if !dropout.training.is_enabled() || !x.device().is_autodiff() || dropout.prob == 0.0 {
        return x;
    }
    moe_kernels::dropout(x, dropout.prob)
}

#[cfg(test)]
mod tests {
    #![allow(deprecated)] // `Device::ndarray`: deprecated in Burn 0.22, still a backend we serve

    use burn::module::Module;
    use burn::nn::DropoutConfig;
    use burn::tensor::{Device, Tensor};

    use super::apply_dropout;

    /// Elements of `y` that are zero where `x` is not.
    fn zeroed(x: &Tensor<1>, y: Tensor<1>) -> usize {
        let x = x.clone().into_data().to_vec::<f32>().unwrap();
        let y = y.into_data().to_vec::<f32>().unwrap();
        x.iter()
            .zip(&y)
            .filter(|(x, y)| **x != 0.0 && **y == 0.0)
            .count()
    }

    #[test]
    fn drops_only_while_training() {
        let dropout = DropoutConfig::new(0.5).init();
        let inference = Device::ndarray();
        let training = inference.clone().autodiff();
        let x = Tensor::<1>::ones([4096], &inference);
        let x_training = Tensor::<1>::ones([4096], &training);

        // Training: about half dropped (2048 +- 5 standard deviations of 32).
        let dropped = zeroed(&x_training, apply_dropout(&dropout, x_training.clone()));
        assert!(
            (1888..=2208).contains(&dropped),
            "dropped {dropped} of 4096"
        );
        // No autodiff: inference, nothing dropped.
        assert_eq!(zeroed(&x, apply_dropout(&dropout, x.clone())), 0);
        // Frozen module on the training device: nothing dropped.
        let frozen = dropout.clone().freeze();
        assert_eq!(
            zeroed(&x_training, apply_dropout(&frozen, x_training.clone())),
            0
        );
        // Probability 0: nothing dropped.
        let none = DropoutConfig::new(0.0).init();
        assert_eq!(
            zeroed(&x_training, apply_dropout(&none, x_training.clone())),
            0
        );
    }
}
