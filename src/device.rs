//! Picking the compute device: `cpu` (burn's Flex backend), `wgpu` (burn's wgpu backend: Vulkan,
//! Metal, DX12 or GL) or `auto` (wgpu on a hardware GPU when there is one, else cpu).
//!
//! A software adapter (Mesa's lavapipe, SwiftShader, WARP: what wgpu reports as a `Cpu` device) is
//! only used when asked for with `--device wgpu` and no hardware GPU is there; `--device auto`
//! never picks one. The chosen adapter, graphics API and shader compiler are logged.
//!
//! The wgpu runtime is initialised once per process (cubecl keeps one per adapter): the first
//! selection is remembered and every later one (a sweep's runs, tests) gets the same device.

use std::sync::{Mutex, OnceLock};

use burn::prelude::Device;

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum DeviceChoice {
    /// burn's Flex CPU backend.
    Cpu,
    /// burn's wgpu backend on the best adapter: a hardware GPU, else a software (CPU) adapter.
    Wgpu,
    /// wgpu on a hardware GPU when there is one, else cpu.
    Auto,
}

/// Errors selecting a device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    /// wgpu was asked for but is not there.
    #[error("--device wgpu: {0}")]
    NoWgpu(String),
}

/// What kind of device a run computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// burn's Flex CPU backend (runner's own CPU kernels apply).
    Cpu,
    /// A hardware GPU through wgpu.
    Gpu,
    /// A software adapter through wgpu (lavapipe and the like: correct, slow).
    SoftwareGpu,
}

/// A selected device.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The device, with autodiff.
    pub device: Device,
    /// For logs: `cpu (flex)` or `wgpu: <adapter> (<API>, <compiler>)`.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// The most bytes one tensor may take on it (a GPU binds each tensor as one storage buffer,
    /// of at most the adapter's `max_storage_buffer_binding_size`); `None`: no such limit.
    pub max_tensor_bytes: Option<u64>,
}

/// How many images of `per_image` bytes (their largest activation) one tensor on `device` holds
/// (at least 1).
pub fn batch_that_fits(device: &Device, per_image: u64) -> usize {
    usize::try_from(max_tensor_bytes(device) / per_image.max(1))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// The largest wgpu storage-buffer binding of the device initialised in this process.
static MAX_BINDING: OnceLock<(Device, u64)> = OnceLock::new();

/// The most bytes one tensor may take on `device`: unlimited on the CPU; on a GPU its adapter's
/// storage-buffer binding limit (128 MiB on lavapipe, 2 to 4 GiB on desktop GPUs).
pub fn max_tensor_bytes(device: &Device) -> u64 {
    if crate::cpu::is_cpu(device) {
        return u64::MAX;
    }
    match MAX_BINDING.get() {
        Some((wgpu, bytes)) if *wgpu == device.clone().without_autodiff() => *bytes,
        _ => u64::MAX,
    }
}

/// Seeds the host's random stream, which every random draw of a run comes from (initial head
/// weights, dropout masks) whatever device computes: the same seed gives the same run on every
/// device, and what differs between devices is arithmetic alone.
pub fn seed_host(seed: u64) {
    Device::flex().seed(seed);
}

/// The device whose random stream [`seed_host`] seeds: parameters are drawn there (with autodiff,
/// so that they are trainable) and then moved to the computing device.
pub fn host() -> Device {
    Device::flex().autodiff()
}

/// A tensor of shape `dims` drawn from the host's random stream, placed on `device`.
pub fn host_random<const D: usize>(
    dims: [usize; D],
    distribution: burn::tensor::Distribution,
    device: &Device,
) -> burn::prelude::Tensor<D> {
    let t = burn::prelude::Tensor::<D>::random(dims, distribution, &Device::flex());
    if *device == Device::flex() && !device.is_autodiff() {
        t
    } else {
        burn::prelude::Tensor::from_data(t.into_data(), device)
    }
}

/// The CPU device, with autodiff.
pub fn cpu() -> Selected {
    Selected {
        device: Device::flex().autodiff(),
        name: "cpu (flex)".into(),
        kind: Kind::Cpu,
        max_tensor_bytes: None,
    }
}

/// Selects the device for `choice`.
pub fn select(choice: DeviceChoice) -> Result<Selected, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(cpu()),
        DeviceChoice::Wgpu => wgpu(true),
        DeviceChoice::Auto => Ok(wgpu(false).unwrap_or_else(|e| {
            tracing::debug!(reason = %e, "No hardware GPU: computing on the CPU.");
            cpu()
        })),
    }
}

/// What this process knows about wgpu: nothing yet, the adapters it has, or the device it
/// initialised (cubecl initialises each adapter once per process).
enum State {
    Unknown,
    Found(imp::Adapters),
    Ready(Result<Selected, DeviceError>),
}

/// The wgpu device: initialised on first use, then the same one. A software adapter is taken only
/// when `software` allows it and there is no hardware GPU; each outcome is remembered, so a
/// sweep's runs neither enumerate the adapters again nor initialise a second device.
fn wgpu(software: bool) -> Result<Selected, DeviceError> {
    static WGPU: Mutex<State> = Mutex::new(State::Unknown);
    let mut state = WGPU.lock().unwrap_or_else(|e| e.into_inner());
    if let State::Unknown = *state {
        *state = State::Found(imp::adapters());
    }
    if let State::Found(found) = &*state {
        let kind = found.choose(software)?;
        *state = State::Ready(imp::init(kind));
    }
    match &*state {
        State::Ready(Ok(s)) if s.kind == Kind::SoftwareGpu && !software => Err(
            DeviceError::NoWgpu("only a software adapter is there".into()),
        ),
        State::Ready(r) => r.clone(),
        State::Unknown | State::Found(_) => unreachable!("initialised above"),
    }
}

/// Where cubecl keeps its autotune results and compiled kernels between runs:
/// `$RUNNER_KERNEL_CACHE`, else `$XDG_CACHE_HOME/runner/kernels` or `~/.cache/runner/kernels`.
pub fn kernel_cache_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("RUNNER_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("runner").join("kernels")
}

#[cfg(feature = "wgpu")]
mod imp {
    use burn::backend::Device as _;
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    use burn::cubecl::wgpu::{WgpuDevice, WgpuDeviceKind, WgpuRuntime};
    use burn::prelude::{Device, Tensor};
    use burn::tensor::DeviceKind;
    use burn::tensor::wgpu::wgpu as wgpu_crate;
    use cubecl_runtime::runtime::Runtime;
    use tracing::{debug, warn};

    use super::{DeviceError, Kind, Selected};

    /// cubecl's settings, before its first use: autotune results and compiled kernels kept in
    /// [`super::kernel_cache_dir`] (not the `target/` of whatever Cargo project the current folder
    /// is in, cubecl's default). On a software adapter each autotune candidate is timed once
    /// instead of up to ten times: there the timing is what takes minutes, and the choice only
    /// matters for speed. A `cubecl.toml` and `CUBECL_AUTOTUNE_*` variables still apply on top.
    fn configure(software: bool) {
        let mut config = CubeClRuntimeConfig::default();
        if software {
            config.autotune.bench.min_samples = 1;
            config.autotune.bench.max_samples = 1;
            config.autotune.bench.adaptive = false;
        }
        config.environment.path =
            burn::cubecl::config::cache::CacheConfig::Directory(super::kernel_cache_dir());
        // A cubecl.toml (or burn.toml) in the current folder or above replaces these defaults, as
        // cubecl reads it; the environment overrides either.
        let config = if config_file_present() {
            CubeClRuntimeConfig::from_current_dir()
        } else {
            config
        };
        if !CubeClRuntimeConfig::try_set(config.override_from_env()) {
            warn!(
                "cubecl's configuration was read before runner could set it: runner's kernel cache folder and autotune settings do not apply."
            );
        }
        // One stream for every thread, whatever a configuration says. With cubecl's default (a
        // stream per thread) a model updated by steps queued from a thread-pool worker was read
        // stale from the main thread: the first validation after an epoch saw the weights from
        // before its last update.
        cubecl_environment::stream::set_policy(cubecl_environment::stream::StreamPolicy::Single);
    }

    /// Whether cubecl would find a configuration file from the current folder up.
    fn config_file_present() -> bool {
        let Ok(dir) = std::env::current_dir() else {
            return false;
        };
        dir.ancestors().any(|d| {
            ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"]
                .iter()
                .any(|f| d.join(f).is_file())
        })
    }

    /// The adapters wgpu finds on its automatic graphics API, hardware first; or why there are
    /// none.
    pub(super) struct Adapters(Result<Vec<WgpuDeviceKind>, DeviceError>);

    impl Adapters {
        /// The adapter to initialise: the first hardware one, else (when `software`) the
        /// software one.
        pub(super) fn choose(&self, software: bool) -> Result<WgpuDeviceKind, DeviceError> {
            let kinds = self.0.as_ref().map_err(Clone::clone)?;
            let hardware = kinds.iter().find(|k| !matches!(k, WgpuDeviceKind::Cpu));
            match (hardware, software) {
                (Some(k), _) => Ok(k.clone()),
                (None, true) if kinds.contains(&WgpuDeviceKind::Cpu) => Ok(WgpuDeviceKind::Cpu),
                (None, true) => Err(DeviceError::NoWgpu(
                    "no wgpu adapter found on this machine (no Vulkan, Metal, DX12 or GL driver answered); on Linux without a GPU, Mesa's lavapipe (package mesa-vulkan-drivers, 24.2 or newer) is a software adapter".into(),
                )),
                (None, false) if kinds.is_empty() => {
                    Err(DeviceError::NoWgpu("no wgpu adapter".into()))
                }
                (None, false) => Err(DeviceError::NoWgpu(
                    "no hardware GPU adapter (only a software one, which --device wgpu takes)"
                        .into(),
                )),
            }
        }
    }

    pub(super) fn adapters() -> Adapters {
        // Enumerating creates a wgpu instance; a broken driver may panic in it.
        let found = catch(|| {
            let mut kinds: Vec<WgpuDeviceKind> = <WgpuRuntime as Runtime>::enumerate_all_devices()
                .into_iter()
                .map(|id| WgpuDevice::from_id(id).kind)
                .collect();
            kinds.sort_by_key(|k| match *k {
                WgpuDeviceKind::DiscreteGpu(i) => (0, i),
                WgpuDeviceKind::IntegratedGpu(i) => (1, i),
                WgpuDeviceKind::VirtualGpu(i) => (2, i),
                WgpuDeviceKind::Other(i) => (3, i),
                _ => (4, 0),
            });
            kinds
        });
        debug!(adapters = ?found, "wgpu adapters.");
        Adapters(
            found
                .map_err(|m| DeviceError::NoWgpu(format!("enumerating wgpu adapters failed: {m}"))),
        )
    }

    fn burn_kind(k: &WgpuDeviceKind) -> DeviceKind {
        match *k {
            WgpuDeviceKind::DiscreteGpu(i) => DeviceKind::DiscreteGpu(i),
            WgpuDeviceKind::IntegratedGpu(i) => DeviceKind::IntegratedGpu(i),
            WgpuDeviceKind::VirtualGpu(i) => DeviceKind::VirtualGpu(i),
            WgpuDeviceKind::Cpu => DeviceKind::Cpu,
            _ => DeviceKind::DefaultDevice,
        }
    }

    /// Initialises adapter `kind` (once per process), checks that it computes, and describes it.
    pub(super) fn init(kind: WgpuDeviceKind) -> Result<Selected, DeviceError> {
        let none = |why: &str| DeviceError::NoWgpu(why.to_string());
        configure(kind == WgpuDeviceKind::Cpu);
        let (device, setup) = catch(|| {
            Device::wgpu_options()
                .device_kind(burn_kind(&kind))
                .init_with_setup()
        })
        .map_err(|m| none(&format!("initialising the adapter failed: {m}")))?
        .map_err(|e| none(&format!("initialising the adapter failed: {e}")))?;
        let info = setup.adapter.get_info();
        let limits = setup.device.limits();
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let _ = super::MAX_BINDING.set((device.clone(), max_binding));
        // One tiny read: a driver that cannot run compute shaders fails here, not mid-run.
        let probe = catch(|| {
            Tensor::<1>::from_floats([1.0, 2.0], &device)
                .sum()
                .into_scalar::<f32>()
        })
        .map_err(|m| {
            none(&format!(
                "{} ({:?}) cannot run a kernel: {m}",
                info.name, info.backend
            ))
        })?;
        if probe != 3.0 {
            return Err(none(&format!(
                "{} ({:?}) computed 1 + 2 = {probe}",
                info.name, info.backend
            )));
        }
        // The runtime's name says which compiler serves the adapter: `wgpu<spirv>` (a `vulkan`
        // build on an adapter with the features cubecl's SPIR-V compiler needs) or `wgpu<wgsl>`.
        let compiler =
            catch(|| <WgpuRuntime as Runtime>::client(&WgpuDevice::new(kind.clone())).name())
                .unwrap_or("wgpu");
        let kind = if info.device_type == wgpu_crate::DeviceType::Cpu {
            Kind::SoftwareGpu
        } else {
            Kind::Gpu
        };
        let name = format!(
            "wgpu: {} ({:?}, {}{}{})",
            info.name,
            info.backend,
            compiler,
            if info.driver_info.is_empty() {
                ""
            } else {
                ", "
            },
            info.driver_info
        );
        if kind == Kind::SoftwareGpu {
            warn!(adapter = %info.name, backend = ?info.backend, "Only a software adapter is there: it computes on the CPU, far slower than --device cpu; use it to test the GPU path.");
        }
        debug!(adapter = %info.name, max_binding, "wgpu device limits.");
        Ok(Selected {
            device: device.autodiff(),
            name,
            kind,
            max_tensor_bytes: Some(max_binding),
        })
    }

    /// A panic's message.
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub(super) struct Panic(String);

    /// Runs `f`, turning a panic into its message (wgpu reports some driver failures by panicking).
    fn catch<T>(f: impl FnOnce() -> T) -> Result<T, Panic> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        std::panic::set_hook(hook);
        r.map_err(|p| {
            Panic(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into()),
            )
        })
    }
}

#[cfg(not(feature = "wgpu"))]
mod imp {
    use super::{DeviceError, Selected};

    /// No adapter kinds in a build without wgpu.
    pub(super) enum Kind {}

    pub(super) struct Adapters;

    impl Adapters {
        pub(super) fn choose(&self, _software: bool) -> Result<Kind, DeviceError> {
            Err(DeviceError::NoWgpu(
                "this runner was built without the wgpu feature (cargo build --release --no-default-features); rebuild with the default features".into(),
            ))
        }
    }

    pub(super) fn adapters() -> Adapters {
        Adapters
    }

    pub(super) fn init(kind: Kind) -> Result<Selected, DeviceError> {
        match kind {}
    }
}
