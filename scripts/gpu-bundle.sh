#!/usr/bin/env bash
# Builds the CUDA test binaries and the ondol binary (--features cuda) here, with no GPU or
# CUDA, and packs them with the configs and sample data into target/gpu-bundle, for a GPU
# machine that has the NVIDIA driver, NVRTC and cuBLASLt (system CUDA or Python wheels) but no
# Rust:
#
#   scripts/gpu-bundle.sh                      # here
#   target/gpu-bundle/run.sh [tests|smoke|mfu|all]   # there (default: all)
#
#   tests  every backend op against the CPU reference, f32 and bf16 (max errors printed)
#   smoke  the smoke model trained on the CPU (fp32) and on the GPU (fp32, then bf16); the
#          GPU loss curves are compared with the CPU's
#   mfu    tokens/s and MFU of configs/gpt2-124m.toml and configs/llama-1b.toml
# run.sh exits non-zero if any part fails.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/gpu-bundle"
rm -rf "$out"
mkdir -p "$out/bin"
cd "$root"
cargo build --release -q --features cuda
cp target/release/ondol "$out/bin/ondol"
# The test executables cargo builds for ondol-cuda, found from its JSON messages.
cargo test --release -p ondol-cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] and m["target"]["kind"] == ["test"]:
        print(m["executable"])
' | while read -r exe; do
    name="$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
    mkdir -p "$out/tests"
    cp "$exe" "$out/tests/$name"
done
strip --strip-debug "$out"/bin/* "$out"/tests/* 2>/dev/null || true
cp -r configs "$out/configs"
mkdir -p "$out/data"
cp -r data/sample "$out/data/sample"
cp scripts/compare-curves.py "$out/bin/"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the GPU bundle (see scripts/gpu-bundle.sh): run.sh [tests|smoke|mfu|all].
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
what="${1:-all}"
# libnvrtc and libcublasLt: system CUDA, or the nvidia wheels of the machine's Python.
dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
if py_site="$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)"; then
    while read -r lib; do dirs+=("$(dirname "$lib")"); done < <(find "$py_site/nvidia" -name 'libnvrtc.so.13*' -o -name 'libcublasLt.so.13*' 2>/dev/null)
fi
for lib in libnvrtc.so.13 libcublasLt.so.13; do
    for d in "${dirs[@]}"; do
        if ls "$d/$lib"* >/dev/null 2>&1; then export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
    done
done
export ONDOL_KERNEL_CACHE="${ONDOL_KERNEL_CACHE:-$here/kernel-cache}"
# On this machine a test that cannot reach the GPU, NVRTC or cuBLASLt fails instead of skipping.
export ONDOL_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
cd "$here"
status=0
if [[ "$what" == tests || "$what" == all ]]; then
    for t in tests/*; do
        echo "== $(basename "$t")"
        "$t" --nocapture --test-threads=1 || status=1
    done
fi
if [[ "$what" == smoke || "$what" == all ]]; then
    steps=100
    echo "== smoke: $steps steps of configs/smoke.toml on the CPU (fp32), then the GPU (fp32, bf16)"
    bin/ondol train configs/smoke.toml --set training.steps=$steps --set training.eval_every=50 --run-dir runs/cpu 2>&1 | tail -2 || status=1
    for p in fp32 bf16; do
        bin/ondol train configs/smoke.toml --set training.steps=$steps --set training.eval_every=50 \
            --set 'training.device="cuda"' --set "training.precision=\"$p\"" --run-dir runs/cuda-$p 2>&1 | tail -2 || status=1
    done
    # fp32 differs from the CPU by the order of fp32 sums (atomics, cuBLAS); bf16 by its rounding.
    echo "-- cuda fp32 against the cpu"
    python3 bin/compare-curves.py runs/cpu/metrics.jsonl runs/cuda-fp32/metrics.jsonl 1e-3 || status=1
    echo "-- cuda bf16 against the cpu"
    python3 bin/compare-curves.py runs/cpu/metrics.jsonl runs/cuda-bf16/metrics.jsonl 3e-2 || status=1
fi
if [[ "$what" == mfu || "$what" == all ]]; then
    for c in gpt2-124m llama-1b; do
        echo "== $c (bf16)"
        bin/ondol train configs/$c.toml --run-dir runs/$c 2>&1 | grep -E "^ondol|step|done|device memory|error" || status=1
    done
fi
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out"
ls "$out/bin" "$out/tests"
