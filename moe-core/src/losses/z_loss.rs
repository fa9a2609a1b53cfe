use burn::tensor::Tensor;

/// Router z-loss `mean_tokens(logsumexp(logits)^2)`: keeps router logits small, which stabilises
/// training (especially in low precision) without changing which experts win.
///
/// Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models" (2022), eq. 5.
pub fn router_z_loss(logits: Tensor<2>) -> Tensor<1> {
    let max = logits.clone().max_dim(1).detach();
    let log_sum_exp = (logits - max.clone()).exp().sum_dim(1).log() + max;
    log_sum_exp.square().mean()
}
