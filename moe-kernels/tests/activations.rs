//! `moe_kernels::{gelu, silu}` on every CPU backend built in, in f32 and f64, against their
//! formulas evaluated on the host with libm (forward and gradient) and against central finite
//! differences of their own forward (gradient), for contiguous and transposed inputs.

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use moe_kernels::{gelu, silu};

mod common;
use common::devices;

/// An activation under test.
type Activation = fn(Tensor<2>) -> Tensor<2>;

/// A host reference `x -> (f(x), f'(x))` in f64.
type Reference = fn(f64) -> (f64, f64);

/// The activations with their host references.
const ACTIVATIONS: [(&str, Activation, Reference); 2] = [
    ("gelu", gelu, gelu_reference),
    ("silu", silu, silu_reference),
];

/// `rows x cols` inputs from -8 to 8 in steps of 1/64 (exact in f32), wrapping around.
fn inputs(rows: usize, cols: usize) -> Vec<f64> {
    (0..rows * cols)
        .map(|i| ((i * 37) % 1025) as f64 / 64.0 - 8.0)
        .collect()
}

/// `(gelu(x), gelu'(x))` in f64: `x Φ(x)` and `Φ(x) + x φ(x)`.
fn gelu_reference(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
    let density = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (x * cdf, cdf + x * density)
}

/// `(silu(x), silu'(x))` in f64: `x σ(x)` and `σ(x) (1 + x (1 - σ(x)))`.
fn silu_reference(x: f64) -> (f64, f64) {
    let sigmoid = 1.0 / (1.0 + (-x).exp());
    (x * sigmoid, sigmoid * (1.0 + x * (1.0 - sigmoid)))
}

fn tensor(values: &[f64], shape: [usize; 2], dtype: FloatDType, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(values.to_vec(), shape), device).cast(dtype)
}

fn host(t: Tensor<2>) -> Vec<f64> {
    t.try_into_vec_as::<f64>().unwrap()
}

/// Checks forward and gradient of `op` on `x` (possibly a transposed view, hence the
/// reference values are read back from `x` itself) with the loss `sum(op(x) * w)`.
fn check(
    name: &str,
    (op, reference): (Activation, Reference),
    x: Tensor<2>,
    w: Tensor<2>,
    tolerance: f64,
) {
    let x = x.require_grad();
    let output = op(x.clone());
    let grads = (output.clone() * w.clone()).sum().backward();
    let gradient = host(x.grad(&grads).expect("x has a gradient"));
    let x_host = host(x.inner());
    let w_host = host(w.inner());
    let output = host(output.inner());
    for (i, &value) in x_host.iter().enumerate() {
        let (value_ref, slope_ref) = reference(value);
        let out_err = (output[i] - value_ref).abs() / (1.0 + value_ref.abs());
        let grad_err = (gradient[i] - w_host[i] * slope_ref).abs() / (1.0 + w_host[i].abs());
        assert!(
            out_err < tolerance,
            "{name}: f({value}) = {} vs {value_ref}",
            output[i]
        );
        assert!(
            grad_err < tolerance,
            "{name}: gradient at {value} = {} vs {}",
            gradient[i],
            w_host[i] * slope_ref
        );
    }
}

#[test]
fn forward_and_gradient_match_the_formula() {
    // 3 x 40,000 spans several parallel chunks and leaves a remainder.
    let (rows, cols) = (3, 40_000);
    let x = inputs(rows, cols);
    let w: Vec<f64> = (0..rows * cols)
        .map(|i| ((i % 7) as f64 - 3.0) / 4.0)
        .collect();
    for (backend, device) in devices() {
        for (activation, op, reference) in ACTIVATIONS {
            for (dtype, tolerance) in [(FloatDType::F32, 1e-6), (FloatDType::F64, 1e-12)] {
                let name = format!("{activation} on {backend} {dtype:?}");
                let xt = tensor(&x, [rows, cols], dtype, &device);
                let wt = tensor(&w, [rows, cols], dtype, &device);
                check(&name, (op, reference), xt.clone(), wt.clone(), tolerance);
                // A transposed view: not contiguous in memory.
                let name = format!("{name} transposed");
                check(
                    &name,
                    (op, reference),
                    xt.transpose(),
                    wt.transpose(),
                    tolerance,
                );
            }
        }
    }
}

#[test]
fn gradient_matches_finite_differences_in_f64() {
    let x = inputs(4, 257);
    for (backend, device) in devices() {
        for (activation, op, _) in ACTIVATIONS {
            let xt = tensor(&x, [4, 257], FloatDType::F64, &device);
            assert_eq!(xt.dtype(), DType::F64);
            let x_ad = xt.clone().require_grad();
            let grads = op(x_ad.clone()).sum().backward();
            let gradient = host(x_ad.grad(&grads).unwrap());
            let step = 1e-6;
            let plus = host(op(xt.clone().add_scalar(step)));
            let minus = host(op(xt.sub_scalar(step)));
            for i in 0..x.len() {
                let finite_difference = (plus[i] - minus[i]) / (2.0 * step);
                assert!(
                    (gradient[i] - finite_difference).abs() < 1e-7,
                    "{activation} on {backend}: at {} autodiff {} vs finite differences {finite_difference}",
                    x[i],
                    gradient[i]
                );
            }
        }
    }
}

#[test]
fn non_finite_inputs_propagate() {
    for (backend, device) in devices() {
        for (activation, op, _) in ACTIVATIONS {
            let x = Tensor::<1>::from_floats([f32::NAN, f32::INFINITY, f32::NEG_INFINITY], &device);
            let out = host(op(x.reshape([1, 3])));
            assert!(
                out[0].is_nan(),
                "{activation} on {backend}: f(NaN) = {}",
                out[0]
            );
            assert_eq!(out[1], f64::INFINITY, "{activation} on {backend}: f(inf)");
            // The limit is 0; `-inf * 0` is NaN, which the composed ops give too.
            let far_left = out[2];
            assert!(
                far_left == 0.0 || far_left.is_nan(),
                "{activation} on {backend}: f(-inf) = {far_left}"
            );
        }
    }
}
