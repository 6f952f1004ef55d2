//! runner's own CPU kernels, in one room: Winograd 3x3 convolutions and their gradients, 2x2
//! max pooling and its gradient, the gemm wrappers of the hand-written training step, the fused
//! RMSprop update, the allocator setting, and [`is_cpu`], the one test of whether they apply.
//! Slices in, slices out: imports nothing of runner (burn only for the device type).

pub mod gemm;
pub mod pool;
pub mod rmsprop;
pub mod winograd;

use burn::prelude::Device;

/// Whether `device` is burn's Flex CPU device (with or without autodiff): where runner's own CPU
/// kernels (Winograd convolutions, the hand-written step, the fused optimizer update) run.
pub fn is_cpu(device: &Device) -> bool {
    device.clone().without_autodiff() == Device::flex()
}

/// Tells glibc's allocator to serve large buffers from the heap and keep freed memory for reuse,
/// instead of mapping fresh pages for every tensor above 128 KiB and unmapping them when it is
/// dropped: burn allocates a new buffer for almost every operation, and the page faults on those
/// fresh pages took a quarter of a dense-head training step (perf, `runner bench-workload
/// dense_head_epoch`). Resident memory then stays at its high-water mark, which is what the peak
/// already was. Does nothing on other platforms. Call before any thread starts.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit targets.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
