//! Products with a frozen weight held in another format than the activations (bf16, or
//! block-quantized in 8 or 4 bits): what fine-tuning with LoRA on a low-bit base (QLoRA,
//! Dettmers et al. 2023) multiplies by.
//!
//! `y[s] = x[s] · read(w)[e]` for the rows `s` of group `e` (the grouped product of
//! [`crate::grouped_matmul()`]; a 2-D weight is one group), where `read` dequantizes and casts
//! the held weight to the activations' type. The weight takes no gradient; the activations'
//! is `grad_x[s] = grad_y[s] · read(w)[e]ᵀ`.
//!
//! Multiplying by `in_dtype(w)` with Burn's autodiff would give the same values, but the
//! product's backward step would keep the converted weight, in f32, from the forward pass to
//! the backward one: every frozen matrix of the model, so a 4-bit model would train holding an
//! f32 copy of itself (8 times its size). Here the backward step keeps the held weight, which
//! the model holds anyway, and reads it again: the converted copy of one weight lives for one
//! product at a time, at the cost of converting each weight twice per step.

// `burn::backend::NdArray` is deprecated in Burn 0.22 but still one of the backends we serve.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::{FloatTensor, IntTensor, QuantizedTensor};
use burn::backend::{Backend, Dispatch, TensorMetadata};
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use moe_macros::moe_extension;

use crate::grouped_matmul::GroupedMatmulBackend;

/// `y = x · read(w)` for `x: [..., K]` and a frozen `w: [K, N]` held in any format, in the
/// type of `x`, giving `[..., N]`: differentiable in `x` only, and under autodiff without
/// keeping a converted copy of `w` for the backward pass (see the [module docs](self)).
///
/// # Panics
///
/// If the last dimension of `x` is not the first of `w`.
pub fn frozen_matmul<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let [inner, columns] = w.dims();
    assert_eq!(
        dims[D - 1],
        inner,
        "frozen_matmul: x is {dims:?} and w is {:?}; expected [..., K] and [K, N]",
        w.dims()
    );
    let rows = dims[..D - 1].iter().product::<usize>();
    let offsets =
        Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, rows as i64], [2]), &x.device());
    let y = frozen_grouped_matmul(x.reshape([rows, inner]), w.unsqueeze_dim(0), offsets);
    let mut out_dims = dims;
    out_dims[D - 1] = columns;
    y.reshape(out_dims)
}

/// [`crate::grouped_matmul()`] with a frozen `w: [E, K, N]` held in any format, read in the type
/// of `x`: differentiable in `x` only, and under autodiff without keeping a converted copy of
/// `w` for the backward pass (see the [module docs](self)). Shapes and panics as
/// [`crate::grouped_matmul()`].
pub fn frozen_grouped_matmul(x: Tensor<2>, w: Tensor<3>, offsets: Tensor<1, Int>) -> Tensor<2> {
    let [_, inner] = x.dims();
    let [experts, w_inner, _] = w.dims();
    let [bounds] = offsets.dims();
    assert!(
        inner == w_inner && bounds == experts + 1,
        "frozen_grouped_matmul: x is {:?}, w is {:?} and offsets is {:?}; expected [S, K], \
         [E, K, N] and [E + 1]",
        x.dims(),
        w.dims(),
        offsets.dims()
    );
    let (x, offsets) = (x.into_dispatch(), offsets.into_dispatch());
    let y = if matches!(w.dtype(), DType::QFloat(_)) {
        <Dispatch as FrozenProductBackend>::frozen_grouped_matmul_quantized(
            x,
            w.into_dispatch(),
            offsets,
            false,
        )
    } else {
        <Dispatch as FrozenProductBackend>::frozen_grouped_matmul(
            x,
            w.into_dispatch(),
            offsets,
            false,
        )
    };
    Tensor::from_dispatch(y)
}

/// `x · w` for `x: [..., K]` and `w: [K, N]` with `w` read in the type of `x` where it is held
/// in another (bf16, or quantized): through [`frozen_matmul`] when `w` is frozen and the
/// product is differentiated (so the backward pass keeps no converted copy), by
/// [`crate::matmul()`] of the converted weight otherwise (a weight that trains gets its
/// gradient through the conversion).
///
/// # Panics
///
/// If the last dimension of `x` is not the first of `w`.
pub fn matmul_held<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    let dtype = x.dtype();
    if w.dtype() == dtype {
        crate::matmul(x, w)
    } else if x.device().is_autodiff() && is_frozen(&w) {
        frozen_matmul(x, w)
    } else {
        crate::matmul(x, crate::in_dtype(w, dtype))
    }
}

/// `y[e] = x[e] · w[e]` for `x: [E, M, K]` and `w: [E, K, N]` ([`crate::batched_matmul()`]) with
/// `w` read in the type of `x` where it is held in another: a frozen weight under autodiff
/// through [`frozen_grouped_matmul`] (the rows of `x` in groups of `M`), so that the backward
/// pass keeps no converted copy; [`crate::batched_matmul()`] of the converted weight otherwise.
///
/// # Panics
///
/// If the batch sizes differ or the inner sizes do not match.
pub fn batched_matmul_held(x: Tensor<3>, w: Tensor<3>) -> Tensor<3> {
    let dtype = x.dtype();
    if w.dtype() == dtype {
        return crate::batched_matmul(x, w);
    }
    if !(x.device().is_autodiff() && is_frozen(&w)) {
        return crate::batched_matmul(x, crate::in_dtype(w, dtype));
    }
    let ([batch, rows, inner], [_, _, columns]) = (x.dims(), w.dims());
    let offsets: Vec<i64> = (0..=batch).map(|e| (e * rows) as i64).collect();
    let offsets = Tensor::<1, Int>::from_data(TensorData::new(offsets, [batch + 1]), &x.device());
    let y = frozen_grouped_matmul(x.reshape([batch * rows, inner]), w, offsets);
    y.reshape([batch, rows, columns])
}

/// Whether `w` takes no gradient: quantized (Burn's autodiff never tracks those), or a float
/// tensor that does not require one.
pub(crate) fn is_frozen<const D: usize>(w: &Tensor<D>) -> bool {
    matches!(w.dtype(), DType::QFloat(_)) || !w.is_require_grad()
}

/// Backends that multiply by a frozen weight held in another format. `transpose` multiplies
/// by each expert's `read(w)[e]ᵀ` instead (the backward step's product). The default bodies
/// convert the whole weight with Burn's ops and call
/// [`GroupedMatmulBackend::grouped_matmul`]; the autodiff wrapper keeps the held weight for its
/// backward step; flex reads a quantized weight one expert at a time, so the converted copy
/// is one expert's matrix.
#[moe_extension]
pub trait FrozenProductBackend: GroupedMatmulBackend {
    /// `[S, K] x read([E, K, N]) -> [S, N]` group by group (`[S, N] x read(..)ᵀ -> [S, K]` when
    /// `transpose`), for a weight held as floats of another type (see
    /// [`frozen_grouped_matmul`]).
    fn frozen_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: IntTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        let w = Self::float_cast(w, float_type(x.dtype()));
        Self::grouped_matmul(x, oriented::<Self>(w, transpose), offsets)
    }

    /// [`frozen_grouped_matmul`](Self::frozen_grouped_matmul) for a quantized weight.
    fn frozen_grouped_matmul_quantized(
        x: FloatTensor<Self>,
        w: QuantizedTensor<Self>,
        offsets: IntTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        let w = Self::dequantize(w, float_type(x.dtype()));
        Self::grouped_matmul(x, oriented::<Self>(w, transpose), offsets)
    }
}

/// `w: [E, K, N]`, or its experts' transposes `[E, N, K]` when `transpose`.
fn oriented<B: Backend>(w: FloatTensor<B>, transpose: bool) -> FloatTensor<B> {
    match transpose {
        true => B::float_swap_dims(w, 1, 2),
        false => w,
    }
}

/// The float type of a float tensor's `dtype`.
fn float_type(dtype: DType) -> FloatDType {
    dtype.into()
}

#[cfg(feature = "ndarray")]
impl FrozenProductBackend for burn::backend::NdArray {}

#[cfg(feature = "wgpu")]
impl FrozenProductBackend for burn::backend::Cube {}

/// Burn's remote backend (`burn-moe serve` devices): the trait's composed default, which
/// the server runs as Burn's own operations.
#[cfg(feature = "remote")]
impl FrozenProductBackend for burn::backend::Remote {}

/// A frozen weight as its product holds it for the backward step.
#[derive(Debug, Clone)]
enum Held<B: Backend> {
    /// Floats of another type than the activations (bf16).
    Float(FloatTensor<B>),
    /// Block-quantized values and their scales.
    Quantized(QuantizedTensor<B>),
}

impl<B: FrozenProductBackend> Held<B> {
    /// The frozen product of `x` by this weight (by its transposes when `transpose`).
    fn product(self, x: FloatTensor<B>, offsets: IntTensor<B>, transpose: bool) -> FloatTensor<B> {
        match self {
            Held::Float(w) => B::frozen_grouped_matmul(x, w, offsets, transpose),
            Held::Quantized(w) => B::frozen_grouped_matmul_quantized(x, w, offsets, transpose),
        }
    }
}

/// The backward step of a frozen product: `grad_x = grad_y · read(w)ᵀ`, group by group, with
/// `w` read again from its held form.
#[derive(Debug)]
struct FrozenProductBackward;

impl<B: FrozenProductBackend> Backward<B, 1> for FrozenProductBackward {
    type State = (Held<B>, IntTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (held, offsets) = ops.state;
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, held.product(grad, offsets, true));
        }
    }
}

/// The frozen product on the inner backend, recorded (when `x` is tracked) with the held
/// weight as the backward step's state.
fn tracked_frozen_product<B: FrozenProductBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    held: Held<B>,
    offsets: IntTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match FrozenProductBackward
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let output = held
                .clone()
                .product(x.into_primitive(), offsets.clone(), false);
            prep.finish((held, offsets), output)
        }
        OpsKind::UnTracked(prep) => prep.finish(held.product(x.into_primitive(), offsets, false)),
    }
}

impl<B: FrozenProductBackend, C: CheckpointStrategy> FrozenProductBackend for Autodiff<B, C> {
    fn frozen_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        offsets: IntTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        assert!(!transpose, "the autodiff wrapper multiplies forward only");
        tracked_frozen_product::<B, C>(x, Held::Float(w.into_primitive()), offsets)
    }

    fn frozen_grouped_matmul_quantized(
        x: FloatTensor<Self>,
        w: QuantizedTensor<Self>,
        offsets: IntTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        assert!(!transpose, "the autodiff wrapper multiplies forward only");
        tracked_frozen_product::<B, C>(x, Held::Quantized(w), offsets)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::testing::assert_close;
    use burn::tensor::quantization::{QuantScheme, QuantValue, ScaleDtype};
    use burn::tensor::{Device, Distribution};

    fn host(t: Tensor<2>) -> Vec<f64> {
        t.into_data().iter::<f64>().collect()
    }

    /// `y[s] = x[s] · w[e]` and `grad_x[s] = r[s] · w[e]ᵀ` (the gradient of `Σ y · r`) by
    /// plain loops over `groups`, rows outside them zero.
    fn loop_reference(
        x: &[f64],
        w: &[f64],
        r: &[f64],
        groups: &[std::ops::Range<usize>],
        [rows, k, n]: [usize; 3],
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut grad) = (vec![0.0; rows * n], vec![0.0; rows * k]);
        for (e, group) in groups.iter().enumerate() {
            for s in group.clone() {
                for i in 0..k {
                    for j in 0..n {
                        let weight = w[(e * k + i) * n + j];
                        y[s * n + j] += x[s * k + i] * weight;
                        grad[s * k + i] += r[s * n + j] * weight;
                    }
                }
            }
        }
        (y, grad)
    }

    /// With the weight held in bf16, 8 or 4 bits (blocks of 8) on the autodiff device, the
    /// frozen grouped product and its input gradient equal plain loops over Burn's own reading
    /// of the weight; the weight takes no gradient. Shapes off every tile, an empty expert,
    /// and padding rows after the last group.
    #[test]
    fn the_frozen_product_and_its_gradient_match_loops_over_the_read_weight() {
        let device = Device::flex().autodiff();
        let [rows, k, n] = [13, 24, 40];
        let offsets_host = vec![0i64, 5, 5, 11];
        let groups = [0..5, 5..5, 5..11];
        let offsets =
            || Tensor::<1, Int>::from_data(TensorData::new(offsets_host.clone(), [4]), &device);
        let weight = Tensor::<3>::random([3, k, n], Distribution::Normal(0.0, 0.2), &device);
        let block = |value| {
            QuantScheme::default()
                .with_value(value)
                .per_block([8], ScaleDtype::F32)
        };
        let held = [
            weight.clone().cast(DType::BF16),
            weight.clone().quantize_dynamic(&block(QuantValue::Q8S)),
            weight.quantize_dynamic(&block(QuantValue::Q4S)),
        ];
        for w in held {
            let read: Vec<f64> = w
                .clone()
                .dequantize()
                .cast(DType::F32)
                .into_data()
                .iter::<f64>()
                .collect();
            let x = Tensor::<2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let r = Tensor::<2>::random([rows, n], Distribution::Normal(0.0, 1.0), &device);
            let y = grouped_matmul_held_for_test(x.clone(), w.clone(), offsets());
            let grads = (y.clone() * r.clone()).sum().backward();
            let (expected_y, expected_grad) =
                loop_reference(&host(x.clone()), &read, &host(r), &groups, [rows, k, n]);
            let what = format!("{:?}", w.dtype());
            assert_close(&format!("y, {what}"), &host(y), &expected_y, 1e-5);
            let grad = x.grad(&grads).expect("x is tracked");
            assert_close(
                &format!("grad x, {what}"),
                &host(grad),
                &expected_grad,
                1e-5,
            );
        }
    }

    /// The entry point the experts use: under autodiff a frozen weight takes the frozen path.
    fn grouped_matmul_held_for_test(
        x: Tensor<2>,
        w: Tensor<3>,
        offsets: Tensor<1, Int>,
    ) -> Tensor<2> {
        assert!(is_frozen(&w));
        crate::grouped_matmul_held(x, w, offsets)
    }

    /// The 2-D product, `x: [2, 3, K]` by a 4-bit `w: [K, N]`, against loops; and a bf16
    /// weight that trains still gets its gradient (through the cast, not the frozen path).
    #[test]
    fn a_frozen_matrix_and_a_training_one() {
        let device = Device::flex().autodiff();
        let [k, n] = [16, 11];
        let weight = Tensor::<2>::random([k, n], Distribution::Normal(0.0, 0.2), &device);
        let scheme = QuantScheme::default()
            .with_value(QuantValue::Q4S)
            .per_tensor(ScaleDtype::F32);
        let q = weight.clone().quantize_dynamic(&scheme);
        let read: Vec<f64> = q.clone().dequantize().into_data().iter::<f64>().collect();
        let x =
            Tensor::<3>::random([2, 3, k], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let r = Tensor::<3>::random([2, 3, n], Distribution::Normal(0.0, 1.0), &device);
        let y = matmul_held(x.clone(), q);
        let grads = (y.clone() * r.clone()).sum().backward();
        let flat = |t: Tensor<3>| {
            let columns = t.dims()[2];
            host(t.reshape([6, columns]))
        };
        let one_group = vec![0..6; 1];
        let (expected_y, expected_grad) = loop_reference(
            &flat(x.clone()),
            &read,
            &flat(r.clone()),
            &one_group,
            [6, k, n],
        );
        assert_close("y", &flat(y), &expected_y, 1e-5);
        let grad = x.grad(&grads).expect("x is tracked");
        assert_close("grad x", &flat(grad), &expected_grad, 1e-5);

        // A bf16 weight that requires a gradient gets one: the sum of r over rows times x.
        let w = weight.cast(DType::BF16).require_grad();
        assert!(!is_frozen(&w));
        let x = x.detach();
        let y = matmul_held(x.clone(), w.clone());
        let grads = (y * r).sum().backward();
        assert!(
            w.grad(&grads).is_some(),
            "a training weight keeps its gradient"
        );
    }
}
