use burn::tensor::{Bool, Tensor};

/// Smooth (differentiable) estimate of each expert's load under noisy top-k gating, `[E]`:
///
/// `load_e = sum_x Phi((clean_e(x) - threshold_e(x)) / sigma_e(x))`
///
/// `Phi` is the standard normal CDF and `threshold_e(x)` the score expert `e` must beat to be
/// in the top `k` when only its own noise is redrawn: the `(k+1)`-th largest noisy score if `e`
/// was chosen (`chosen[x, e]`), the `k`-th largest otherwise. Requires `k < E`.
///
/// Shazeer et al., "Outrageously Large Neural Networks" (ICLR 2017), appendix A.
pub fn smooth_load(
    clean_scores: Tensor<2>,
    noisy_scores: Tensor<2>,
    noise_scale: Tensor<2>,
    chosen: Tensor<2, Bool>,
    k: usize,
) -> Tensor<1> {
    let shape = clean_scores.dims();
    let kth = kth_largest(noisy_scores.clone(), k).expand(shape);
    let next = kth_largest(noisy_scores, k + 1).expand(shape);
    let threshold = next.mask_where(chosen.bool_not(), kth);
    normal_cdf((clean_scores - threshold) / noise_scale)
        .sum_dim(0)
        .squeeze_dim(0)
}

/// The `m`-th largest value of each row, `[rows, 1]` (differentiable): the smallest of the `m`
/// largest, which does not depend on the order `argtopk` returns them in.
fn kth_largest(scores: Tensor<2>, m: usize) -> Tensor<2> {
    let [_, columns] = scores.dims();
    if m < columns {
        let indices = scores.clone().argtopk(m, 1);
        scores.gather(1, indices).min_dim(1)
    } else {
        scores.min_dim(1)
    }
}

/// Standard normal CDF `Phi(z) = (1 + erf(z / sqrt(2))) / 2`.
fn normal_cdf(z: Tensor<2>) -> Tensor<2> {
    z.div_scalar(std::f64::consts::SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5)
}
