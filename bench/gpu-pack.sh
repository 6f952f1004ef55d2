#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on a machine without Rust, as the device tool's README describes:
# - bench/carry/runners.tar.xz: two stripped release binaries, `runner` (the default build: wgpu
#   with WGSL kernels) and `runner-x` (feature vulkan: SPIR-V kernels on Vulkan), in one xz stream
#   with a dictionary larger than one binary, so that what the two share is stored once;
# - .gl/*.deb: the Vulkan loader packages.
# Both folders are ignored by git; name them in the call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
mkdir -p bench/carry/pack
cargo build --release --locked --features vulkan
strip -o bench/carry/pack/runner-x "$target/release/runner"
cargo build --release --locked  # last, so that target/release/runner is the default build again
strip -o bench/carry/pack/runner "$target/release/runner"
tar -C bench/carry/pack -cf - runner runner-x | xz -T1 --lzma2=preset=9,dict=384MiB > bench/carry/runners.tar.xz
rm -rf bench/carry/pack bench/carry/runner.xz
ls -la bench/carry/runners.tar.xz
if ! ls .gl/*.deb >/dev/null 2>&1; then
  mkdir -p .gl /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  apt-get $o update -qq
  (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi
du -sh bench/carry .gl
