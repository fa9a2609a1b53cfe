//! Mixed precision: activations in 16 bits, parameters kept in f32.
//!
//! Under mixed precision (Micikevicius et al. 2018) a model's parameters stay f32 (the master
//! copy the optimizer updates), and each use casts them to the type of the activations they
//! meet. The cast is differentiable: its backward pass returns the gradient in the parameter's
//! type, so gradients and optimizer state are f32 too. In full precision the cast does
//! nothing.

use burn::module::Param;
use burn::tensor::Tensor;

/// `param` in the type of `activations` (a cast under mixed precision, the parameter itself
/// otherwise).
pub fn param_for<const D: usize, const E: usize>(
    param: &Param<Tensor<D>>,
    activations: &Tensor<E>,
) -> Tensor<D> {
    param.val().cast(activations.dtype())
}
