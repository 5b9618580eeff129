#!/usr/bin/env bash
# Builds the CUDA test binaries here (no GPU or CUDA needed) and packs them with a run.sh
# into target/gpu-bundle, for a GPU machine that has the NVIDIA driver and NVRTC but no Rust:
#
#   scripts/gpu-bundle.sh                      # here
#   target/gpu-bundle/run.sh                   # there: every kernel against the CPU reference
#
# run.sh finds libnvrtc.so.13 (system CUDA, or the nvidia-cuda-nvrtc wheel of the machine's
# Python), runs each binary and exits non-zero if any fails.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/gpu-bundle"
rm -rf "$out"
mkdir -p "$out/bin"
cd "$root"
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
    cp "$exe" "$out/bin/$name"
    strip --strip-debug "$out/bin/$name" 2>/dev/null || true
done
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs every CUDA test of the bundle; prints each kernel's error against the CPU reference.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvrtc_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
if py_site="$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)"; then
    while read -r lib; do nvrtc_dirs+=("$(dirname "$lib")"); done < <(find "$py_site/nvidia" -name 'libnvrtc.so.13*' 2>/dev/null)
fi
for d in "${nvrtc_dirs[@]}"; do
    if ls "$d"/libnvrtc.so.13* >/dev/null 2>&1; then export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break; fi
done
export ONDOL_KERNEL_CACHE="${ONDOL_KERNEL_CACHE:-$here/kernel-cache}"
# On this machine a test that cannot reach the GPU or NVRTC fails instead of skipping.
export ONDOL_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
status=0
for t in "$here"/bin/*; do
    echo "== $(basename "$t")"
    "$t" --nocapture --test-threads=1 || status=1
done
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out"
ls "$out/bin"
