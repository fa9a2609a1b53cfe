//! The forward pass of Burn's `Linear` through [`moe_kernels::matmul`]: the same module, the
//! same parameters and records, `y = x W + b`, with the product as one operation whose flex
//! kernel writes its output once. Under mixed precision the parameters meet `x` in its type
//! ([`moe_core::precision::param_for`]), a weight held in fewer bits is read in the type of `x`
//! ([`moe_kernels::matmul_held`], which keeps no converted copy of a frozen weight for the
//! backward pass); a weight with a LoRA adapter adds its low-rank update
//! ([`moe_core::lora::project`]).

use burn::nn::Linear;
use burn::tensor::Tensor;
use moe_core::precision::param_for;

/// `x W + b` for `x: [..., d_input]`, as `Linear::forward` computes it.
pub(crate) fn apply<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let product = moe_core::lora::project(x, &linear.weight, moe_kernels::matmul_held);
    match &linear.bias {
        Some(bias) => {
            let bias = param_for(bias, &product);
            product + bias.unsqueeze()
        }
        None => product,
    }
}
