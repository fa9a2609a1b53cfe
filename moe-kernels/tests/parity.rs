//! `moe_kernels::parity`, the battery `moe-bench gpu-check` runs against flex: every operation
//! on flex and on wgpu (where a device opens) against ndarray (the composed defaults, an
//! independent implementation of each operation) at small sizes, in f32, and in f16 where the
//! device computes in it.

use burn::tensor::{Device, FloatDType};
use moe_kernels::parity::{compare, Outcome, Sizes};

mod common;
use common::devices_with_wgpu;

fn failures(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter(|outcome| !outcome.passed())
        .map(|outcome| {
            format!(
                "{} {}: {:.2e} {}",
                outcome.name,
                outcome.dtype,
                outcome.difference,
                outcome.error.clone().unwrap_or_default()
            )
        })
        .collect()
}

#[test]
fn every_operation_matches_the_composed_defaults() {
    #[allow(deprecated)]
    let reference = Device::ndarray();
    for (backend, device) in devices_with_wgpu() {
        if backend == "ndarray" {
            continue;
        }
        let device = device.inner();
        let mut dtypes = vec![FloatDType::F32];
        if device.supports_dtype(FloatDType::F16) && backend == "wgpu" {
            dtypes.push(FloatDType::F16);
        }
        for dtype in dtypes {
            let outcomes = compare(&reference, &device, &Sizes::small(), dtype);
            assert_eq!(outcomes.len(), 17, "{backend}: every operation is compared");
            let failed = failures(&outcomes);
            assert!(failed.is_empty(), "{backend} {dtype:?}: {failed:?}");
        }
    }
}
