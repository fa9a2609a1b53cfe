//! `FusedAdamW` against the AdamW formula by hand (f64), against burn-optim's `AdamW` on the
//! same module and gradients, and resuming from a state burn-optim's `AdamW` saved; on the CPU
//! backends built in.

use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use moe_train::training::optimizer::FusedAdamW;

/// A module with one rank-2 and one rank-1 parameter.
#[derive(Module, Debug)]
struct Weights {
    matrix: Param<Tensor<2>>,
    vector: Param<Tensor<1>>,
}

#[allow(deprecated)] // `Device::ndarray`: deprecated in Burn 0.22, still a backend we serve
fn devices() -> Vec<Device> {
    vec![
        Device::ndarray().autodiff(),
        #[cfg(feature = "flex")]
        Device::flex().autodiff(),
    ]
}

const MATRIX: [f32; 6] = [0.5, -1.25, 2.0, 0.0, -0.75, 3.5];
const VECTOR: [f32; 3] = [1.5, -2.5, 0.25];

fn weights(device: &Device) -> Weights {
    Weights {
        matrix: Param::from_tensor(Tensor::from_data(
            TensorData::new(MATRIX.to_vec(), [2, 3]),
            device,
        )),
        vector: Param::from_tensor(Tensor::from_data(
            TensorData::new(VECTOR.to_vec(), [3]),
            device,
        )),
    }
}

/// The loss of step `step`: `Σ c_i w_i² + Σ w_i` for both parameters, with coefficients that
/// change from step to step (so the moments see different gradients).
fn step_grads(model: &Weights, step: usize) -> GradientsParams {
    let scale = 1.0 + step as f64 / 2.0;
    let loss = model.matrix.val().powi_scalar(2).sum().mul_scalar(scale)
        + model.vector.val().sum().mul_scalar(scale - 3.0)
        + model.matrix.val().sum();
    GradientsParams::from_grads(loss.backward(), model)
}

/// The gradient `step_grads` gives each element, by hand: `2 scale w + 1` for the matrix,
/// `scale - 3` for the vector.
fn hand_grad(w: f64, is_matrix: bool, step: usize) -> f64 {
    let scale = 1.0 + step as f64 / 2.0;
    if is_matrix {
        2.0 * scale * w + 1.0
    } else {
        scale - 3.0
    }
}

fn values(model: &Weights) -> Vec<f64> {
    let mut all: Vec<f64> = model.matrix.val().try_into_vec_as::<f64>().unwrap();
    all.extend(model.vector.val().try_into_vec_as::<f64>().unwrap());
    all
}

/// `steps` steps of `optimizer` on `model`, learning rate `0.01 (step + 1)`.
fn run(
    mut optimizer: ModuleOptimizer,
    steps: std::ops::Range<usize>,
    mut model: Weights,
) -> (Weights, ModuleOptimizer) {
    for step in steps {
        let grads = step_grads(&model, step);
        let lr = 0.01 * (step + 1) as f64;
        model = optimizer.step(lr, model, grads);
    }
    (model, optimizer)
}

#[test]
fn three_steps_match_the_formula_by_hand() {
    let (beta_1, beta_2, epsilon, decay) = (0.9f64, 0.999f64, 1e-5f64, 0.1f64);
    let start: Vec<f64> = MATRIX.iter().chain(&VECTOR).map(|&w| w as f64).collect();
    // The formula in f64, element by element.
    let mut expected = start.clone();
    let mut m = vec![0.0; start.len()];
    let mut v = vec![0.0; start.len()];
    for step in 0..3 {
        let t = (step + 1) as i32;
        let lr = 0.01 * (step + 1) as f64;
        for i in 0..expected.len() {
            let g = hand_grad(expected[i], i < MATRIX.len(), step);
            m[i] = beta_1 * m[i] + (1.0 - beta_1) * g;
            v[i] = beta_2 * v[i] + (1.0 - beta_2) * g * g;
            let m_hat = m[i] / (1.0 - beta_1.powi(t));
            let v_hat = v[i] / (1.0 - beta_2.powi(t));
            expected[i] = expected[i] * (1.0 - lr * decay) - lr * m_hat / (v_hat.sqrt() + epsilon);
        }
    }
    for device in devices() {
        let (model, _) = run(FusedAdamW::new(0.1).init(), 0..3, weights(&device));
        for (i, (got, want)) in values(&model).iter().zip(&expected).enumerate() {
            assert!(
                (got - want).abs() < 1e-5,
                "{device:?} element {i}: {got}, expected {want}"
            );
        }
        // The update moved every element (a no-op step would fail above, but say so plainly).
        assert!(values(&model).iter().zip(&start).all(|(a, b)| a != b));
    }
}

#[test]
fn it_matches_burn_optims_adamw() {
    for device in devices() {
        let burn = AdamWConfig::new().with_weight_decay(0.1).init();
        let (ours, _) = run(FusedAdamW::new(0.1).init(), 0..4, weights(&device));
        let (theirs, _) = run(burn, 0..4, weights(&device));
        for (i, (a, b)) in values(&ours).iter().zip(values(&theirs)).enumerate() {
            assert!(
                (a - b).abs() < 1e-6,
                "{device:?} element {i}: {a} against burn-optim's {b}"
            );
        }
    }
}

#[test]
fn it_resumes_from_burn_optims_saved_state() {
    let folder = std::env::temp_dir().join(format!("burn-moe-optimizer-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    for (n, device) in devices().into_iter().enumerate() {
        let path = folder.join(format!("adamw-{n}.bpk"));
        // Two steps with burn-optim's AdamW, saved; two more with ours after loading.
        let burn = AdamWConfig::new().with_weight_decay(0.1).init();
        let (model, burn) = run(burn, 0..2, weights(&device));
        burn.save(&path).expect("save the optimizer state");
        let ours = FusedAdamW::new(0.1)
            .init()
            .load(&path)
            .expect("load burn-optim's state");
        let (resumed, _) = run(ours, 2..4, model);
        // The same four steps with burn-optim's AdamW throughout.
        let burn = AdamWConfig::new().with_weight_decay(0.1).init();
        let (straight, _) = run(burn, 0..4, weights(&device));
        for (i, (a, b)) in values(&resumed).iter().zip(values(&straight)).enumerate() {
            assert!(
                (a - b).abs() < 1e-6,
                "{device:?} element {i}: resumed {a}, straight {b}"
            );
        }
        // Without the state (moments restarted) the result differs: the state mattered.
        let (model, _) = run(
            AdamWConfig::new().with_weight_decay(0.1).init(),
            0..2,
            weights(&device),
        );
        let (fresh, _) = run(FusedAdamW::new(0.1).init(), 2..4, model);
        let gap = values(&fresh)
            .iter()
            .zip(values(&straight))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            gap > 1e-3,
            "{device:?}: restarting the moments changed nothing ({gap})"
        );
    }
    std::fs::remove_dir_all(&folder).ok();
}
