//! Parameter initialisation, done eagerly so that a seed set just before `init` decides the
//! weights, whatever runs afterwards; or not at all, inside [`deferred`], for a model whose
//! weights are about to be read from a file.

use std::cell::Cell;

use burn::module::{Param, ParamId};
use burn::tensor::{Device, Distribution, Shape, Tensor};

thread_local! {
    /// Whether [`deferred`] is running on this thread.
    static DEFERRED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` (a module's `init`) with the parameters of this module's initialisers left
/// unallocated: each is a lazy Burn parameter ([`Param::uninitialized`]) that knows its shape
/// and device and draws its values only if it is read before anything is loaded into it.
///
/// A loader that fills every parameter from a file (`ModuleSnapshot::apply` asks a lazy
/// parameter for its shape, never its values) then never holds a random copy of the model
/// beside the loaded one: for a 7 B-parameter checkpoint that is 28 GB of f32 not allocated.
/// This is the "meta device" of PyTorch's `accelerate.init_empty_weights`. Outside `deferred`
/// the initialisers stay eager, so seeded runs and the equivalence tests draw the same values
/// on the device they were built on, wherever the parameters move next.
pub fn deferred<T>(build: impl FnOnce() -> T) -> T {
    /// Restores the previous setting, also when `build` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEFERRED.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(DEFERRED.with(|flag| flag.replace(true)));
    build()
}

/// A parameter of `shape` on `device` whose values `draw` makes: now, or inside [`deferred`]
/// when first read.
fn param<const D: usize>(
    shape: [usize; D],
    device: &Device,
    draw: impl FnOnce(&Device) -> Tensor<D> + Send + Sync + 'static,
) -> Param<Tensor<D>> {
    if !DEFERRED.with(Cell::get) {
        return Param::from_tensor(draw(device));
    }
    let init = move |device: &Device, require_grad: bool| {
        let value = draw(device);
        if require_grad {
            value.require_grad()
        } else {
            value
        }
    };
    Param::uninitialized(
        ParamId::new(),
        init,
        device.clone(),
        true,
        Shape::from(shape),
    )
}

/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, the distribution Burn's `Linear` uses.
pub fn uniform<const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    device: &Device,
) -> Param<Tensor<D>> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    param(shape, device, move |device| {
        Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
    })
}

/// All zeros.
pub fn zeros<const D: usize>(shape: [usize; D], device: &Device) -> Param<Tensor<D>> {
    param(shape, device, move |device| Tensor::zeros(shape, device))
}

/// `N(0, std^2)`.
pub fn normal<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Param<Tensor<D>> {
    param(shape, device, move |device| {
        Tensor::random(shape, Distribution::Normal(0.0, std), device)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_parameters_allocate_nothing_until_read() {
        let device = Device::flex();
        let eager = uniform([3, 4], 3, &device);
        assert!(eager.is_initialized());
        let lazy = deferred(|| uniform([3, 4], 3, &device));
        assert!(!lazy.is_initialized());
        assert_eq!(lazy.lazy_shape(), Shape::from([3, 4]));
        // Reading it draws the values, within the distribution's bounds.
        let values = lazy.val().into_data().try_to_vec::<f32>().unwrap();
        assert!(values.iter().all(|v| v.abs() <= 1.0 / 3f32.sqrt()));
        // The scope ends with `deferred`.
        assert!(zeros([2], &device).is_initialized());
    }
}
