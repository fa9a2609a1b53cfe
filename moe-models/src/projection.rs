//! The forward pass of Burn's `Linear` through [`moe_kernels::matmul`]: the same module, the
//! same parameters and records, `y = x W + b`, with the product as one operation whose flex
//! kernel writes its output once.

use burn::nn::Linear;
use burn::tensor::Tensor;

/// `x W + b` for `x: [..., d_input]`, as `Linear::forward` computes it.
pub(crate) fn apply<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let product = moe_kernels::matmul(x, linear.weight.val());
    match &linear.bias {
        Some(bias) => product + bias.val().unsqueeze(),
        None => product,
    }
}
