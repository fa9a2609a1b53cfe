use burn::tensor::Tensor;

/// Squared coefficient of variation `Var(v) / Mean(v)^2` of a per-expert quantity, with the
/// population variance (divide by `E`), so one expert gives 0 rather than NaN.
///
/// Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
/// Layer" (2017), section 4: applied to the experts' importance and load.
pub fn cv_squared(values: Tensor<1>) -> Tensor<1> {
    let mean = values.clone().mean();
    let variance = (values - mean.clone()).square().mean();
    variance / (mean.square() + 1e-10)
}
