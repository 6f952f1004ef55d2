#!/usr/bin/env bash
# The GPU comparison, in one call on a machine with a GPU and no Rust (the H200 machine of the
# device tool): runner, built elsewhere and carried xz-compressed, against PyTorch on the same card.
# Builds nothing; makes its own images and weights (bench/gpu_assets.py); checks that both sides
# compute the same thing before timing; writes one markdown table.
#
#   bench/gpu-pack.sh               # here, once: the stripped binaries and the Vulkan loader packages
#   bench/gpu.sh                    # there: 150x150, batch 20 and 64, a 2000-image epoch
#   bench/gpu.sh --small            # a software adapter (lavapipe): 96x96, batch 4 and 16, a
#                                   # 40-image epoch
#
# The device tool's call (carry bench/carry and .gl): `bash bench/gpu.sh` with timeout_s 600.
# Output: $OUT/gpu.md (or bench/out/gpu.md), the log beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
small=0
[ "${1:-}" = "--small" ] && small=1
out="${OUT:-bench/out}"
mkdir -p "$out"
log="$out/gpu.log"
exec > >(tee "$log") 2>&1
started=$(date +%s)

# 1. The Vulkan loader (the GPU machine has the NVIDIA driver and its ICD, not always the loader).
# (No `grep -q`: stopping early would kill ldconfig with SIGPIPE, which pipefail reports.)
if ! ldconfig -p 2>/dev/null | grep 'libvulkan.so.1' >/dev/null; then
  if ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  else
    echo "gpu.sh: no libvulkan.so.1 and no .gl/*.deb to unpack (run bench/gpu-pack.sh here first)" >&2
    exit 2
  fi
fi
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$nvidia_icd" ]; then
  export VK_DRIVER_FILES="$nvidia_icd"
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# 2. runner's variants: $RUNNER (one binary, its wgpu device), or the carried pair: `wgsl` (the
# default build on wgpu) and `spirv` (the vulkan build on wgpu: SPIR-V where the adapter allows).
# $GPU_VARIANTS picks some of them by label.
variants=()
if [ -n "${RUNNER:-}" ]; then
  variants=(--variant "wgpu=$RUNNER:wgpu")
else
  mkdir -p /tmp/runner-gpu-bin
  xz -dc bench/carry/runners.tar.xz | tar -C /tmp/runner-gpu-bin -xf -
  for v in "wgsl=/tmp/runner-gpu-bin/runner:wgpu" "spirv=/tmp/runner-gpu-bin/runner-x:wgpu"; do
    case " ${GPU_VARIANTS:-wgsl spirv} " in *" ${v%%=*} "*) variants+=(--variant "$v") ;; esac
  done
fi

# 3. Images and weights made here, laid out like the asset mirror.
assets=/tmp/runner-gpu-assets
if [ "$small" = 1 ]; then
  size=96; per_class="--train 20 --val 4 --test 2"; sets=(--set "data.image_size=[96,96]" --set data.batch_size=4)
  epoch=40; reps=(--warmup 1 --repeats 1 --large-batch 16)
else
  size=150; per_class="--train 1000 --val 20 --test 2"; sets=()
  epoch=2000; reps=(--warmup 1 --repeats 3 --large-batch 64)
fi
if [ ! -f "$assets/.done-$size" ]; then
  rm -rf "$assets"
  python3 bench/gpu_assets.py --out "$assets" --size "$size" $per_class
  touch "$assets/.done-$size"
fi

# 4. The table. Kernel autotuning happens in each workload's warm-up run; its results are kept
# in RUNNER_KERNEL_CACHE between the workloads' processes.
export RUNNER_ASSETS="$assets" RUNNER_KERNEL_CACHE=/tmp/runner-gpu-kernels PYTHONUNBUFFERED=1
python3 bench/compare.py --gpu "${variants[@]}" --threads "$(nproc)" --images "$epoch" \
  --out "$out" --table "$out/gpu.md" "${sets[@]}" "${reps[@]}" ${GPU_ONLY:+--only "$GPU_ONLY"}
cat "$out/gpu.md"
echo "gpu.sh: done in $(( $(date +%s) - started )) s"
