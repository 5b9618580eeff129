#!/usr/bin/env bash
# ondol vs PyTorch eager on the CPU benchmark model (configs/bench-cpu.toml), one after the
# other in one script on the same machine, 2 threads each; prints both and the ratio.
# Needs: pip install -r benches/requirements.txt (or PYTHON=path/to/venv/python). Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
steps=${STEPS:-10}
cargo bench -p ondol --bench train_cpu --no-run -q
ondol_json=$(RAYON_NUM_THREADS=$threads cargo bench -p ondol --bench train_cpu -q -- --steps "$steps" | tee /dev/stderr | tail -n 1)
torch_json=$("${PYTHON:-python3}" benches/pytorch_llama_cpu.py --threads "$threads" --steps "$steps" | tee /dev/stderr | tail -n 1)
python3 - "$ondol_json" "$torch_json" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"ondol {o['tokens_per_s']:.0f} tokens/s ({o['gflops']:.1f} GFLOP/s), "
      f"PyTorch eager {t['tokens_per_s']:.0f} tokens/s ({t['gflops']:.1f} GFLOP/s): "
      f"ratio {o['tokens_per_s'] / t['tokens_per_s']:.2f}x")
PY
