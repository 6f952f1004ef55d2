//! Picking the compute device: `cpu` (burn's Flex backend), `wgpu` (with the `wgpu` feature) or
//! `auto` (wgpu on a discrete or integrated GPU when there is one, else cpu: a software Vulkan
//! adapter such as lavapipe is only used when asked for with `--device wgpu`).

use burn::prelude::Device;

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// burn's Flex CPU backend.
    Cpu,
    /// burn's wgpu backend (Vulkan, Metal, DX12); needs the `wgpu` cargo feature.
    Wgpu,
    /// wgpu when built with it and an adapter exists, else cpu.
    Auto,
}

/// Errors selecting a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// wgpu was asked for but is not there.
    #[error("--device wgpu: {0}")]
    NoWgpu(String),
}

/// The selected device (with autodiff) and a name for logs.
pub fn select(choice: DeviceChoice) -> Result<(Device, &'static str), DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::flex().autodiff(), "cpu (flex)")),
        DeviceChoice::Wgpu => wgpu(Kind::Any).map(|d| (d, "wgpu")),
        DeviceChoice::Auto => Ok(
            match wgpu(Kind::Discrete).or_else(|_| wgpu(Kind::Integrated)) {
                Ok(d) => (d, "wgpu"),
                Err(_) => (Device::flex().autodiff(), "cpu (flex)"),
            },
        ),
    }
}

/// Which wgpu adapters to accept.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
enum Kind {
    Any,
    Discrete,
    Integrated,
}

#[cfg(feature = "wgpu")]
fn wgpu(kind: Kind) -> Result<Device, DeviceError> {
    use burn::prelude::Tensor;
    use burn::tensor::DeviceKind;
    let kind = match kind {
        Kind::Any => DeviceKind::DefaultDevice,
        Kind::Discrete => DeviceKind::DiscreteGpu(0),
        Kind::Integrated => DeviceKind::IntegratedGpu(0),
    };
    // The adapter is requested lazily; a tiny tensor forces it, and a missing adapter panics
    // inside wgpu, which is caught here and reported as "no adapter".
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let d = Device::wgpu(kind.clone());
        let t = Tensor::<1>::from_floats([1.0, 2.0], &d);
        let _ = t.sum().into_scalar::<f32>();
        d
    });
    std::panic::set_hook(hook);
    probe
        .map(|d| d.autodiff())
        .map_err(|_| DeviceError::NoWgpu("no wgpu adapter found on this machine".into()))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_: Kind) -> Result<Device, DeviceError> {
    Err(DeviceError::NoWgpu(
        "this runner was built without the wgpu feature; rebuild with `cargo build --release --features wgpu`".into(),
    ))
}
