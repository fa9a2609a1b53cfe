use burn::tensor::Tensor;

/// Load-balancing loss of GShard and Switch Transformer: `E * sum_e f_e * P_e`.
///
/// `probs` is the router's softmax `[tokens, experts]`; `fraction` is `f_e`, the fraction of
/// tokens (or assignments) routed to expert `e` (a constant: no gradient flows through the
/// discrete choice). `P_e` is the mean router probability of expert `e`. The loss is 1 when
/// both are uniform and grows as routing concentrates.
///
/// Fedus, Zoph, Shazeer, "Switch Transformers" (2021), eq. 4; Lepikhin et al., "GShard" (2020).
pub fn load_balancing_loss(probs: Tensor<2>, fraction: Tensor<1>) -> Tensor<1> {
    let [_, num_experts] = probs.dims();
    let mean_prob: Tensor<1> = probs.mean_dim(0).squeeze_dim(0);
    (mean_prob * fraction.detach())
        .sum()
        .mul_scalar(num_experts as f64)
}
