#!/usr/bin/env bash
# Installs NVIDIA's compiler, NVRTC and CUDA headers from their PyPI wheels into
# target/cuda-toolchain (once; later calls reuse it) and prints the directory that holds
# bin/nvcc, lib/libnvrtc.so.13 and include/. No GPU or system CUDA is needed.
#
#   dir=$(scripts/cuda-toolchain.sh)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="$root/target/cuda-toolchain"
wheels=(
    nvidia-cuda-nvcc==13.5.37
    nvidia-cuda-nvrtc==13.5.37
    nvidia-cuda-runtime==13.5.37
    nvidia-cuda-crt==13.5.37
    nvidia-cuda-cccl==13.3.5.0.6
)
stamp="$target/.installed"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "${wheels[*]}" ]]; then
    rm -rf "$target"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --target "$target" "${wheels[@]}" >&2
    echo "${wheels[*]}" > "$stamp"
fi
echo "$target/nvidia/cu13"
