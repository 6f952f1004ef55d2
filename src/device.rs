//! Picking the compute device: `cpu` (burn's Flex backend), `wgpu` (with the `wgpu` feature) or
//! `auto` (wgpu when an adapter exists, else cpu).

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
        DeviceChoice::Wgpu => wgpu().map(|d| (d, "wgpu")),
        DeviceChoice::Auto => Ok(match wgpu() {
            Ok(d) => (d, "wgpu"),
            Err(_) => (Device::flex().autodiff(), "cpu (flex)"),
        }),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Device, DeviceError> {
    use burn::prelude::Tensor;
    // The adapter is requested lazily; a tiny tensor forces it, and a missing adapter panics
    // inside wgpu, which is caught here and reported as "no adapter".
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = std::panic::catch_unwind(|| {
        let d = Device::wgpu(Default::default());
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
fn wgpu() -> Result<Device, DeviceError> {
    Err(DeviceError::NoWgpu(
        "this runner was built without the wgpu feature; rebuild with `cargo build --release --features wgpu`".into(),
    ))
}
