//! What a cube (wgpu) device compiles its kernels to, and what this crate's kernels ask of it.
//!
//! Burn's wgpu backend compiles CubeCL kernels to SPIR-V on Vulkan adapters when it is built
//! with its `vulkan` feature, to Metal Shading Language on Apple GPUs with its `metal` feature,
//! and to WGSL otherwise (and on a Vulkan adapter that lacks a feature its SPIR-V needs). WGSL
//! has no bf16 type, so bf16 needs one of the native compilers.

use burn::tensor::Device;

/// The most units this crate's kernels put in one cube (the grouped matmul's 16 x 16 tile
/// and the scans' 256; the scans and reductions use fewer where a device allows fewer).
pub const UNITS_PER_CUBE: u32 = 256;

/// The most workgroup (shared) memory one of this crate's kernels declares, in bytes: the
/// grouped matmul's two staged operand blocks in f32 (128 x 16 values each), the WebGPU
/// minimum every adapter offers.
pub const SHARED_MEMORY_BYTES: u32 = 16_384;

/// The shader language `device` compiles CubeCL kernels to: `"wgpu<spirv>"`, `"wgpu<msl>"` or
/// `"wgpu<wgsl>"` (the name of its CubeCL runtime), `None` for a device that is not a cube
/// device. Opens the device.
pub fn compiler(device: &Device) -> Option<&'static str> {
    let device = device.clone().inner();
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(cube) => Some(cube.client().name()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
