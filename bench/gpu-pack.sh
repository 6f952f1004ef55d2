#!/usr/bin/env bash
# Prepares what bench/gpu.sh needs on a machine without Rust: the release binary, stripped and
# xz-compressed (bench/carry/runner.xz), and the Vulkan loader packages (.gl/*.deb), as the device
# tool's README describes. Both folders are ignored by git; name them in the call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked
mkdir -p bench/carry
strip -o bench/carry/runner "$target/release/runner"
xz -T0 -9 -f bench/carry/runner
ls -la bench/carry/runner.xz
if ! ls .gl/*.deb >/dev/null 2>&1; then
  mkdir -p .gl /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  apt-get $o update -qq
  (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi
du -sh bench/carry .gl
