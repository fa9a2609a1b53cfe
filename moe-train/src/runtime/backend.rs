//! Choosing the device a program runs on: `--backend auto|wgpu|ndarray|flex`.
//!
//! This is the one place in burn-moe where a backend is named; everything else takes the
//! [`Device`] chosen here. `auto` takes a real GPU adapter when wgpu finds one (discrete, then
//! integrated, then virtual) and the CPU otherwise. On the CPU it uses flex, Burn's pure-Rust
//! CPU backend, which measured fastest of the CPU backends on our machines (see
//! BENCHMARKS.md). A software Vulkan device such as Mesa's llvmpipe is never chosen by `auto`:
//! it is a CPU in disguise and slower than flex; ask for it with `--backend wgpu`.

use std::fmt;

use burn::tensor::{Device, FloatDType};
use thiserror::Error;

/// Gives the process a private `XDG_RUNTIME_DIR` when it has none (a server, CI, a container).
///
/// Vulkan drivers probe the window system when wgpu lists adapters; without a desktop session
/// Mesa's Wayland support prints `error: XDG_RUNTIME_DIR is invalid or not set` at every probe,
/// several times per run, though burn-moe never opens a window. A folder of our own (mode
/// 0700, as the variable requires) silences it. Call it before other threads start: it sets an
/// environment variable.
pub fn quiet_display_probes() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let set = std::env::var_os("XDG_RUNTIME_DIR")
            .is_some_and(|dir| std::path::Path::new(&dir).is_dir());
        if set {
            return;
        }
        let Ok(uid) = std::fs::metadata("/proc/self").map(|meta| meta.uid()) else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("burn-moe-runtime-{uid}"));
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        let private = std::fs::metadata(&dir).is_ok_and(|meta| {
            meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0
        });
        if private {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

/// Makes Burn's default device the CPU backend a command will run on, when it names one and
/// `BURN_DEVICE` is not set.
///
/// Burn materialises some state on its default device before moving it where it belongs: an
/// optimizer record loaded for `--resume` goes there first. With the wgpu feature compiled in,
/// the default device is wgpu's, so a run on the CPU would start wgpu (and, on a machine with a
/// GPU, put the optimizer state there and copy it back) only to load a checkpoint. Call it
/// before other threads start: it sets an environment variable.
pub fn prefer_default_device(backend: Option<BackendChoice>) {
    if std::env::var_os("BURN_DEVICE").is_some() {
        return;
    }
    let name = match backend {
        Some(BackendChoice::Flex) => "flex",
        Some(BackendChoice::Ndarray) => "ndarray",
        _ => return,
    };
    std::env::set_var("BURN_DEVICE", name);
}

/// Which backend to run on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// A real GPU through wgpu if there is one, otherwise the CPU (flex).
    #[default]
    Auto,
    /// wgpu (Vulkan, Metal, DX12), on its default adapter.
    Wgpu,
    /// The ndarray CPU backend.
    Ndarray,
    /// The flex CPU backend.
    Flex,
}

/// The precision a model computes in.
///
/// The half precisions are *mixed* precision (Micikevicius et al. 2018): the parameters, their
/// gradients and the optimizer's state stay in f32 (the master weights), the activations and
/// the products are computed in 16 bits, the router, the normalisations, the loss and every
/// sum a kernel accumulates in f32, and the loss is scaled so that small gradients survive the
/// 16-bit backward pass (see `moe_train::training::loss_scale`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats throughout.
    #[default]
    F32,
    /// Mixed: computes in f16 (wgpu adapters with the `shader-f16` feature).
    F16,
    /// Mixed: computes in bf16 (adapters that have it).
    Bf16,
}

impl Precision {
    /// The float type the model computes in.
    pub fn compute_dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::F16 => FloatDType::F16,
            Precision::Bf16 => FloatDType::BF16,
        }
    }

    /// The name `--precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Why no device could be set up.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The backend was left out of this build.
    #[error("the {backend} backend is not compiled into this build; rebuild with `--features {backend}`")]
    NotCompiled {
        /// The backend's name, which is also its Cargo feature.
        backend: &'static str,
    },
    /// wgpu found no usable adapter.
    #[error("wgpu found no usable adapter: {0}. Install your GPU's Vulkan/Metal/DX12 driver (on Debian without a GPU: `apt-get install mesa-vulkan-drivers` for software Vulkan), or use `--backend flex`")]
    NoAdapter(String),
    /// A half precision was asked for where it is not supported.
    #[error("{device} cannot compute in {precision} ({why}); use `--precision f32`")]
    NoHalfPrecision {
        /// The device, in words.
        device: String,
        /// `f16` or `bf16`.
        precision: &'static str,
        /// What is missing.
        why: String,
    },
    /// The adapter's limits are below what burn-moe's kernels need.
    #[error("the wgpu adapter {adapter} is too small for burn-moe's kernels: {what}; use `--backend flex`")]
    AdapterTooSmall {
        /// The adapter, in words.
        adapter: String,
        /// Which limit, with the figures.
        what: String,
    },
}

/// What a wgpu adapter offers, read when it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterLimits {
    /// What CubeCL kernels compile to on it: `wgpu<spirv>` (Burn's vulkan compiler),
    /// `wgpu<msl>` (its metal compiler) or `wgpu<wgsl>`.
    pub compiler: String,
    /// The driver and its version, as the adapter reports them.
    pub driver: String,
    /// Workgroup (shared) memory one workgroup may declare, bytes.
    pub workgroup_memory: u64,
    /// Invocations one workgroup may have.
    pub invocations_per_workgroup: u64,
    /// The largest storage buffer one binding may cover, bytes.
    pub storage_binding: u64,
    /// The largest buffer, bytes.
    pub buffer: u64,
    /// Whether shaders may compute in f16 (wgpu's `SHADER_F16`).
    pub shader_f16: bool,
    /// Whether wgpu says the adapter is a CPU (a software rasteriser such as llvmpipe).
    pub is_cpu: bool,
}

impl AdapterLimits {
    /// Refuses an adapter whose workgroups cannot hold burn-moe's kernels (a WebGPU adapter
    /// always can: the standard's minimums are 256 invocations and 16 KiB).
    pub fn check_kernels(&self, adapter: &str) -> Result<(), BackendError> {
        let units = moe_kernels::adapter::UNITS_PER_CUBE as u64;
        let shared = moe_kernels::adapter::SHARED_MEMORY_BYTES as u64;
        let what = if self.invocations_per_workgroup < units {
            format!(
                "it allows {} invocations per workgroup, the grouped matmul launches {units}",
                self.invocations_per_workgroup
            )
        } else if self.workgroup_memory < shared {
            format!(
                "it allows {} bytes of workgroup memory, the grouped matmul declares {shared}",
                self.workgroup_memory
            )
        } else {
            return Ok(());
        };
        Err(BackendError::AdapterTooSmall {
            adapter: adapter.to_string(),
            what,
        })
    }

    /// The largest buffer a tensor can have here: the smaller of the buffer and binding limits.
    pub fn largest_tensor_bytes(&self) -> u64 {
        self.buffer.min(self.storage_binding)
    }
}

/// A device ready to use, and what it is.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    /// The device (without autodiff; call `.autodiff()` to train).
    pub device: Device,
    /// The backend it runs on (never [`BackendChoice::Auto`]).
    pub backend: BackendChoice,
    /// The adapter's name and kind, for wgpu; "CPU" otherwise.
    pub adapter: String,
    /// The precision models compute in (tensors are created in f32 either way).
    pub precision: Precision,
    /// What the adapter offers, for wgpu; `None` otherwise.
    pub limits: Option<AdapterLimits>,
}

impl BackendChoice {
    /// The backend's name, as `--backend` takes it.
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Wgpu => "wgpu",
            BackendChoice::Ndarray => "ndarray",
            BackendChoice::Flex => "flex",
        }
    }
}

impl fmt::Display for SelectedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = self.backend.name();
        let precision = match self.precision {
            Precision::F32 => "f32",
            Precision::F16 => "mixed f16",
            Precision::Bf16 => "mixed bf16",
        };
        write!(f, "{backend} on {} ({precision})", self.adapter)
    }
}

/// Sets up the device for `backend` in `precision`. Call it once, before any tensor is made.
pub fn select(
    backend: BackendChoice,
    precision: Precision,
) -> Result<SelectedDevice, BackendError> {
    let mut selected = match backend {
        BackendChoice::Auto => match first_gpu() {
            Some(gpu) => gpu,
            None => cpu(BackendChoice::Flex)?,
        },
        BackendChoice::Wgpu => wgpu_default()?,
        BackendChoice::Ndarray | BackendChoice::Flex => cpu(backend)?,
    };
    if let Some(limits) = &selected.limits {
        limits.check_kernels(&selected.adapter)?;
    }
    if precision != Precision::F32 {
        let supported = selected.backend == BackendChoice::Wgpu
            && selected.device.supports_dtype(precision.compute_dtype());
        if !supported {
            return Err(BackendError::NoHalfPrecision {
                device: selected.to_string(),
                precision: precision.name(),
                why: missing_for(precision, selected.limits.as_ref()),
            });
        }
        selected.precision = precision;
    }
    Ok(selected)
}

/// What a device lacks to compute in the half `precision`, in words.
fn missing_for(precision: Precision, limits: Option<&AdapterLimits>) -> String {
    let native = cfg!(any(feature = "vulkan", feature = "metal"));
    match (precision, limits) {
        (Precision::Bf16, Some(limits)) if limits.compiler.contains("wgsl") && native => {
            "bf16 needs Burn's vulkan or metal compiler, and this adapter runs WGSL: it is not a Vulkan or Apple GPU adapter, or lacks a Vulkan feature Burn's SPIR-V needs".into()
        }
        (Precision::Bf16, Some(limits)) if limits.compiler.contains("wgsl") && limits.is_cpu => {
            "bf16 needs Burn's vulkan or metal compiler, and this build compiles WGSL only; on a GPU rebuild with `--features vulkan` (Linux, Windows) or `--features metal` (macOS), but not for llvmpipe, whose Vulkan driver cannot run Burn's SPIR-V".into()
        }
        (Precision::Bf16, Some(limits)) if limits.compiler.contains("wgsl") => {
            "bf16 needs Burn's vulkan or metal compiler, and this build compiles WGSL only: rebuild with `--features vulkan` (Linux, Windows) or `--features metal` (macOS)".into()
        }
        (Precision::Bf16, Some(_)) => "this adapter has no bf16 arithmetic".into(),
        (Precision::F16, Some(_)) => "this adapter has no shader f16".into(),
        (_, None) => "half precision needs a wgpu adapter; the CPU backends compute in f32".into(),
        (Precision::F32, Some(_)) => String::new(),
    }
}

/// Like [`select`], and prints what was chosen on standard error.
pub fn select_and_report(
    backend: BackendChoice,
    precision: Precision,
) -> Result<SelectedDevice, BackendError> {
    let selected = select(backend, precision)?;
    eprintln!("device: {selected}");
    Ok(selected)
}

/// The CPU device `--offload-experts` keeps the experts on: flex, the fastest CPU backend
/// here (ndarray in a build without flex).
pub fn offload_device() -> Device {
    #[cfg(feature = "flex")]
    let device = Device::flex();
    #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
    #[allow(deprecated)]
    let device = Device::ndarray();
    #[cfg(not(any(feature = "flex", feature = "ndarray")))]
    let device = Device::default();
    device
}

fn cpu(backend: BackendChoice) -> Result<SelectedDevice, BackendError> {
    let device = match backend {
        #[cfg(feature = "flex")]
        BackendChoice::Flex => Device::flex(),
        #[cfg(not(feature = "flex"))]
        BackendChoice::Flex => return Err(BackendError::NotCompiled { backend: "flex" }),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        BackendChoice::Ndarray => Device::ndarray(),
        #[cfg(not(feature = "ndarray"))]
        BackendChoice::Ndarray => return Err(BackendError::NotCompiled { backend: "ndarray" }),
        BackendChoice::Auto | BackendChoice::Wgpu => {
            unreachable!("cpu() is called with a CPU backend")
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(SelectedDevice {
        device,
        backend,
        adapter: format!("CPU ({threads} threads)"),
        precision: Precision::F32,
        limits: None,
    })
}

/// The first real (non-software) GPU adapter wgpu can open, if any.
#[cfg(feature = "wgpu")]
fn first_gpu() -> Option<SelectedDevice> {
    use burn::tensor::DeviceKind;
    [
        DeviceKind::DiscreteGpu(0),
        DeviceKind::IntegratedGpu(0),
        DeviceKind::VirtualGpu(0),
    ]
    .into_iter()
    .find_map(|kind| open_wgpu(kind).ok())
}

#[cfg(not(feature = "wgpu"))]
fn first_gpu() -> Option<SelectedDevice> {
    None
}

/// wgpu's default adapter (which may be a software one).
#[cfg(feature = "wgpu")]
fn wgpu_default() -> Result<SelectedDevice, BackendError> {
    open_wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_default() -> Result<SelectedDevice, BackendError> {
    Err(BackendError::NotCompiled { backend: "wgpu" })
}

/// The wgpu device of `kind`. wgpu's runtime for a device is set up once per process (a
/// second setup is refused), so the first one that opens is kept and handed out again.
#[cfg(feature = "wgpu")]
fn open_wgpu(kind: burn::tensor::DeviceKind) -> Result<SelectedDevice, BackendError> {
    static OPENED: std::sync::Mutex<Vec<(String, SelectedDevice)>> =
        std::sync::Mutex::new(Vec::new());
    let key = format!("{kind:?}");
    let mut opened = OPENED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, selected)) = opened.iter().find(|(opened, _)| *opened == key) {
        return Ok(selected.clone());
    }
    let (device, setup) = Device::wgpu_options()
        .device_kind(kind)
        .init_with_setup()
        .map_err(|error| BackendError::NoAdapter(error.to_string()))?;
    let info = setup.adapter.get_info();
    let adapter_limits = setup.adapter.limits();
    let limits = AdapterLimits {
        compiler: moe_kernels::adapter::compiler(&device)
            .unwrap_or("wgpu")
            .to_string(),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        workgroup_memory: adapter_limits.max_compute_workgroup_storage_size as u64,
        invocations_per_workgroup: adapter_limits.max_compute_invocations_per_workgroup as u64,
        storage_binding: adapter_limits.max_storage_buffer_binding_size,
        buffer: adapter_limits.max_buffer_size,
        shader_f16: setup
            .adapter
            .features()
            .contains(burn::backend::wgpu::wgpu::Features::SHADER_F16),
        is_cpu: info.device_type == burn::backend::wgpu::wgpu::DeviceType::Cpu,
    };
    let selected = SelectedDevice {
        device,
        backend: BackendChoice::Wgpu,
        adapter: format!(
            "{} ({:?}, {:?}, {})",
            info.name, info.device_type, info.backend, limits.compiler
        ),
        precision: Precision::F32,
        limits: Some(limits),
    };
    opened.push((key, selected.clone()));
    Ok(selected)
}

/// A wgpu device on whatever adapter wgpu offers (software ones included), or why there is
/// none. For tests that compare backends: they run wherever any Vulkan/Metal/DX12 device exists.
#[cfg(feature = "wgpu")]
pub fn any_wgpu() -> Result<SelectedDevice, BackendError> {
    wgpu_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_backends_are_what_was_asked_for() {
        let selected = select(BackendChoice::Ndarray, Precision::F32).unwrap();
        assert_eq!(selected.backend, BackendChoice::Ndarray);
        assert!(
            selected.to_string().starts_with("ndarray on CPU"),
            "{selected}"
        );
        let selected = select(BackendChoice::Flex, Precision::F32).unwrap();
        assert_eq!(selected.backend, BackendChoice::Flex);
    }

    #[test]
    fn auto_never_picks_a_software_adapter() {
        let selected = select(BackendChoice::Auto, Precision::F32).unwrap();
        match selected.backend {
            BackendChoice::Flex => assert!(selected.adapter.starts_with("CPU")),
            BackendChoice::Wgpu => {
                assert!(!selected.adapter.contains("(Cpu,"), "{}", selected.adapter)
            }
            other => panic!("auto chose {other:?}"),
        }
    }

    #[test]
    fn f16_on_the_cpu_is_refused_with_a_clear_message() {
        let error = select(BackendChoice::Flex, Precision::F16).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, BackendError::NoHalfPrecision { .. }));
        assert!(
            message.contains("half precision needs a wgpu adapter"),
            "{message}"
        );
        assert!(message.contains("--precision f32"), "{message}");
        assert!(message.contains("flex on CPU"), "{message}");
    }
}
