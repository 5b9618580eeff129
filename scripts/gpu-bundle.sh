#!/usr/bin/env bash
# Builds the CUDA test binaries and the ondol binary (--features cuda) here, with no GPU or
# CUDA, and packs them with the configs and sample data into target/gpu-bundle, for a GPU
# machine that has the NVIDIA driver, NVRTC and cuBLASLt (system CUDA or Python wheels) but no
# Rust:
#
#   scripts/gpu-bundle.sh                      # here
#   target/gpu-bundle/run.sh [tests|smoke|mfu|cuda-cores|bench|sanitize|all]...   # there (default: all)
#
#   tests  every backend op against the CPU reference, f32 and bf16 (max errors printed)
#   smoke  the smoke models (Llama, Mamba-1, Mamba-2, hybrid) trained on the CPU (fp32) and on
#          the GPU (bf16; the Llama one in fp32 too); the GPU loss curves are compared with the CPU's;
#          eval (cpu and cuda) and greedy generate (cuda) from each bf16 checkpoint
#   mfu    tokens/s and MFU of configs/gpt2-124m.toml and llama-1b.toml beside PyTorch's
#          (transformers, bf16 autocast, fused AdamW, torch.compile), and of mamba2-130m.toml
#          and llama-1b-long.toml (T = 8192, sliding windows, masked documents)
#   cuda-cores  llama-1b and mamba2-130m as in mfu, with training.tensor_cores = false: what
#          flash attention and the SSD's tensor-core forms gain
#   bench  kernel throughput (flash attention, SSD, selective scan), and PyTorch's on the same
#          shapes (flash SDPA; transformers' selective scan and SSD), with the time ratios
#   sanitize  (not part of all) the backend tests under compute-sanitizer's memcheck,
#          racecheck and synccheck, where the machine has it and it supports the device:
#          out-of-bounds accesses, shared-memory races and barrier misuse on the hardware
# run.sh exits non-zero if any part fails. Its output also goes to $OUT/run.log (the device
# tool's folder that comes back, even after a timeout), else to logs/run.log beside it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/gpu-bundle"
rm -rf "$out"
mkdir -p "$out/bin"
cd "$root"
cargo build --release -q --features cuda
cp target/release/ondol "$out/bin/ondol"
# The test and bench executables cargo builds for ondol-cuda (and ondol-comm's NCCL test),
# found from their JSON messages.
{
    cargo test --release -p ondol-cuda --tests --benches --no-run --message-format=json 2>/dev/null
    cargo test --release -p ondol-comm --features nccl --test nccl --no-run --message-format=json 2>/dev/null
} |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    kind = m.get("target", {}).get("kind")
    if m.get("reason") == "compiler-artifact" and m.get("executable") and kind in (["test"], ["bench"]):
        print(kind[0], m["executable"])
' | while read -r kind exe; do
    name="$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
    # The parallel engine on emulated devices needs no GPU, and the NVRTC compile of every
    # kernel for sm_80 and sm_90a (half a minute) gains nothing from one: CI runs both. On
    # the GPU the backend tests compile the kernels through NVRTC for the device itself.
    [[ $name == parallel || $name == nvrtc ]] && continue
    dir="$out/tests"
    [[ $kind == bench ]] && dir="$out/benches"
    mkdir -p "$dir"
    cp "$exe" "$dir/$name"
done
strip --strip-debug "$out"/bin/* "$out"/tests/* "$out"/benches/* 2>/dev/null || true
cp -r configs "$out/configs"
mkdir -p "$out/data"
cp -r data/sample "$out/data/sample"
cp scripts/compare-curves.py benches/kernels-vs-pytorch.py benches/train-vs-pytorch.py "$out/bin/"
# For the Python scripts, which keep the machine's library path (PyTorch finds its own CUDA
# and NCCL through it): bin/ondol with the libraries run.sh found.
cat > "$out/bin/ondol-gpu" <<'WRAP'
#!/usr/bin/env bash
export LD_LIBRARY_PATH="${ONDOL_LD_LIBRARY_PATH:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$(dirname "$0")/ondol" "$@"
WRAP
chmod +x "$out/bin/ondol-gpu"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the GPU bundle (see scripts/gpu-bundle.sh): run.sh [tests|smoke|mfu|cuda-cores|bench|sanitize|all]...
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
parts=" ${*:-all} "
wants() { [[ $parts == *" $1 "* || $parts == *" all "* ]]; }
wants_only() { [[ $parts == *" $1 "* ]]; }
log_dir="${OUT:-$here/logs}"
mkdir -p "$log_dir"
exec > >(tee -a "$log_dir/run.log") 2>&1
# Python (PyTorch) runs with the machine's own library path: ours would put another CUDA or
# NCCL before the ones torch was built with.
machine_ld_path="${LD_LIBRARY_PATH:-}"
py=(env "LD_LIBRARY_PATH=$machine_ld_path" python3)
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
# NCCL: the nvidia-nccl wheel ships libnccl.so.2 only; cudarc opens libnccl.so.
nccl="$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')"
if [[ -z "$nccl" && -n "${py_site:-}" ]]; then nccl="$(find "$py_site/nvidia" -name 'libnccl.so.2' 2>/dev/null | head -1)"; fi
if [[ -n "$nccl" ]]; then
    mkdir -p "$here/lib"
    ln -sf "$nccl" "$here/lib/libnccl.so"
    export LD_LIBRARY_PATH="$here/lib:$(dirname "$nccl")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export ONDOL_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
# Outside the bundle, which the device tool replaces on every call: the kernels compiled by
# one part are loaded by the next.
export ONDOL_KERNEL_CACHE="${ONDOL_KERNEL_CACHE:-/tmp/ondol-kernels}"
# NCCL says what went wrong, when something does.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# On this machine a test that cannot reach the GPU, NVRTC or cuBLASLt fails instead of skipping.
export ONDOL_REQUIRE_GPU=1
# Each test binary and each run stops after this many seconds (a hung kernel must not take the
# whole device call with it): the part goes on with the next, and the run fails.
limit="${ONDOL_STEP_TIMEOUT:-150}"
# Each says how long it took, so that the next device session can plan its minutes.
bounded() {
    local start=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" || rc=$?
    [[ $rc == 124 || $rc == 137 ]] && echo "!! stopped after ${limit}s: $*"
    echo "-- $((SECONDS - start)) s: ${*:1:2}"
    return $rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
cd "$here"
status=0
if wants tests; then
    # Synchronous launches, so that a kernel's fault is reported at that kernel; cuBLASLt logs
    # its errors (a heuristic with no algorithm says why).
    for t in tests/*; do
        echo "== $(basename "$t")"
        CUDA_LAUNCH_BLOCKING=1 CUBLASLT_LOG_LEVEL=1 bounded "$t" --nocapture --test-threads=1 || status=1
    done
fi
if wants smoke; then
    steps=100
    rm -rf runs  # a run directory that holds a run is refused without --resume
    train() {  # CONFIG RUN-DIR [--set ...]
        local config=$1 dir=$2
        shift 2
        bounded bin/ondol train "configs/$config.toml" --set training.steps=$steps --set training.eval_every=50 \
            --run-dir "runs/$dir" "$@" 2>&1 | tail -3 || status=1
    }
    # Every architecture on the CPU (fp32) and the GPU (bf16); the Llama smoke in GPU fp32 too.
    # fp32 differs from the CPU by the order of fp32 sums (atomics, cuBLAS); bf16 by its rounding.
    for c in smoke mamba-smoke mamba2-smoke hybrid-smoke; do
        echo "== smoke: $steps steps of configs/$c.toml on the CPU (fp32), then the GPU"
        train "$c" "$c-cpu"
        precisions=(bf16)
        [[ $c == smoke ]] && precisions=(fp32 bf16)
        for p in "${precisions[@]}"; do
            train "$c" "$c-cuda-$p" --set 'training.device="cuda"' --set "training.precision=\"$p\""
            tol=3e-2
            [[ $p == fp32 ]] && tol=1e-3
            echo "-- $c: cuda $p against the cpu"
            "${py[@]}" bin/compare-curves.py "runs/$c-cpu/metrics.jsonl" "runs/$c-cuda-$p/metrics.jsonl" $tol || status=1
        done
        # Inference from the bf16 run's checkpoint: eval on both devices (the same loss to
        # bf16's rounding), and greedy decoding through the GPU's inference cache.
        ckpt="runs/$c-cuda-bf16/checkpoints/step-$(printf %08d $steps)"
        echo "-- $c: eval on the cpu, then the gpu; generate on the gpu"
        for d in cpu cuda; do bounded bin/ondol eval "$ckpt" --data data/sample/*.txt --batches 4 --device $d || status=1; done
        bounded bin/ondol generate "$ckpt" --prompt "And God said" --max-new-tokens 40 --temperature 0 --device cuda ||
            status=1
    done
    # The launched path at world size 1: rendezvous, NCCL communicators, the same curve, to
    # bf16 and atomics' run-to-run differences (backward sums with atomicAdd in any order).
    echo "== smoke: one launched rank over NCCL against the plain GPU run"
    bounded bin/ondol launch --nproc-per-node 1 --master-port 0 -- train configs/smoke.toml --set training.steps=$steps \
        --set training.eval_every=50 --set 'training.device="cuda"' --run-dir runs/smoke-nccl 2>&1 | tail -3 || status=1
    "${py[@]}" bin/compare-curves.py runs/smoke-cuda-bf16/metrics.jsonl runs/smoke-nccl/metrics.jsonl 1e-2 || status=1
fi
# mamba2-130m trains on token shards; the mfu runs train it on the sample text as bytes.
mamba2=(--set 'data.train=["data/sample/*.txt"]' --set 'data.val=[]' --set 'data.format="text"'
    --set 'data.tokenizer="bytes"' --set data.val_fraction=0.05 --set training.grad_accum=1
    --set training.batch_size=8 --set 'training.device="cuda"' configs/mamba2-130m.toml)
if wants mfu; then
    echo "== training throughput: ondol beside PyTorch (benches/train-vs-pytorch.py)"
    # Two models, each ondol's run then PyTorch's (a first torch.compile takes minutes): twice
    # the step limit.
    limit=$((2 * limit)) bounded "${py[@]}" bin/train-vs-pytorch.py --ondol bin/ondol-gpu configs/gpt2-124m.toml \
        configs/llama-1b.toml || status=1
    echo "== mamba2-130m (bf16)"
    bounded "${py[@]}" bin/train-vs-pytorch.py --ondol bin/ondol-gpu --no-peer "${mamba2[@]}" || status=1
    echo "== llama-1b-long (T = 8192, windows of 1024 keys on 3 layers of 4, documents masked; bf16)"
    bounded "${py[@]}" bin/train-vs-pytorch.py --ondol bin/ondol-gpu --no-peer --steps 10 configs/llama-1b-long.toml ||
        status=1
fi
if wants cuda-cores; then
    echo "== llama-1b and mamba2-130m on the simple attention and the SSD's CUDA-core forms (training.tensor_cores = false)"
    no_tc=(bin/train-vs-pytorch.py --ondol bin/ondol-gpu --no-peer --steps 10 --set training.tensor_cores=false)
    bounded "${py[@]}" "${no_tc[@]}" configs/llama-1b.toml || status=1
    bounded "${py[@]}" "${no_tc[@]}" "${mamba2[@]}" || status=1
fi
if wants bench; then
    echo "== kernel throughput (ondol, then PyTorch on the same shapes, with the ratios)"
    bounded benches/kernels | tee "$log_dir/kernels.txt" || status=1
    bounded "${py[@]}" bin/kernels-vs-pytorch.py --ondol "$log_dir/kernels.txt" || echo "(PyTorch comparison not complete)"
fi
if wants_only sanitize; then
    sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
    if [[ -z "$sanitizer" ]]; then
        echo "== sanitize: compute-sanitizer not found, skipped"
    else
        for tool in memcheck racecheck synccheck; do
            echo "== sanitize: tests/backend under compute-sanitizer --tool $tool"
            bounded "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 20 tests/backend --test-threads=1 ||
                status=1
        done
    fi
fi
# The loss curves come back with the log.
if [[ -n "${OUT:-}" && -d runs ]]; then
    for m in runs/*/metrics.jsonl; do [[ -f $m ]] && mkdir -p "$OUT/$(dirname "$m")" && cp "$m" "$OUT/$m"; done
fi
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out"
ls "$out/bin" "$out/tests"
