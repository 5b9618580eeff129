#!/usr/bin/env bash
# Compiles every kernels/*.cu for Ampere (sm_80) and Hopper (sm_90a) with nvcc from NVIDIA's
# PyPI wheels, warnings as errors; fails on the first problem. Needs no GPU. CI runs it.
#
#   scripts/check-kernels.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cuda="$("$root/scripts/cuda-toolchain.sh")"
nvcc="$cuda/bin/nvcc"
out="$root/target/kernel-check"
mkdir -p "$out"
status=0
for src in "$root"/kernels/*.cu; do
    name="$(basename "$src" .cu)"
    for arch in 80 90a; do
        # The -gencode form: -arch=sm_90a would also run a plain sm_90 pass.
        if "$nvcc" -std=c++17 --cubin -gencode "arch=compute_${arch},code=sm_${arch}" \
            -Werror all-warnings -Xptxas -warn-spills -I "$root/kernels" \
            -o "$out/$name.sm_$arch.cubin" "$src"; then
            echo "ok   $name sm_$arch ($(stat -c %s "$out/$name.sm_$arch.cubin") bytes)"
        else
            echo "FAIL $name sm_$arch" >&2
            status=1
        fi
    done
done
exit $status
