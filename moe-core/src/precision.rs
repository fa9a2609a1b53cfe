//! Mixed precision: activations in 16 bits, parameters kept in f32.
//!
//! Under mixed precision (Micikevicius et al. 2018) a model's parameters stay f32 (the master
//! copy the optimizer updates), and each use casts them to the type of the activations they
//! meet. The cast is differentiable: its backward pass returns the gradient in the parameter's
//! type, so gradients and optimizer state are f32 too. In full precision nothing is cast.
//!
//! The same rule serves frozen weights held in fewer bits (a Hugging Face model loaded in
//! bf16, 8 or 4 bits, `moe_models::hf::Storage`): each use reads the weight in the
//! activations' type, dequantizing a block-quantized one first (QLoRA, Dettmers et al. 2023,
//! computes the same way: 4-bit storage, 16- or 32-bit products).

use burn::module::Param;
use burn::tensor::{DType, Tensor};

/// `tensor` in `dtype`: a cast where the types differ, the tensor itself where they do not
/// (a cast to its own type would still add a node to the autodiff graph and an operation to
/// fusion's queue). A quantized tensor is dequantized (to the device's float type), then cast
/// ([`moe_kernels::in_dtype`]).
pub fn to_dtype<const D: usize>(tensor: Tensor<D>, dtype: DType) -> Tensor<D> {
    moe_kernels::in_dtype(tensor, dtype)
}

/// `param` in the type of `activations` (a cast under mixed precision, the parameter itself
/// otherwise).
pub fn param_for<const D: usize, const E: usize>(
    param: &Param<Tensor<D>>,
    activations: &Tensor<E>,
) -> Tensor<D> {
    to_dtype(param.val(), activations.dtype())
}
