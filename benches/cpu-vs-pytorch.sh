#!/usr/bin/env bash
# ondol vs PyTorch eager on the CPU benchmark model (configs/bench-cpu.toml), 2 threads each,
# alternating for ROUNDS rounds in one script on the same machine, so that drift in the
# machine's speed hits both sides alike. Prints each run, the medians and the ratio.
# Needs: pip install -r benches/requirements.txt (or PYTHON=path/to/venv/python).
# Run on an idle machine: a build beside it skews the figures several times over.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
steps=${STEPS:-10}
rounds=${ROUNDS:-3}
config=${CONFIG:-configs/bench-cpu.toml}
cargo bench -p ondol --bench train_cpu --no-run -q
results=()
for ((r = 1; r <= rounds; r++)); do
  results+=("$(RAYON_NUM_THREADS=$threads cargo bench -p ondol --bench train_cpu -q -- --config "$config" --steps "$steps" | tail -n 1)")
  echo "${results[-1]}"
  results+=("$("${PYTHON:-python3}" benches/pytorch_llama_cpu.py --threads "$threads" --steps "$steps" | tail -n 1)")
  echo "${results[-1]}"
done
python3 - "${results[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(a) for a in sys.argv[1:]]
ondol = [r["tokens_per_s"] for r in runs if r["impl"] == "ondol"]
torch = [r["tokens_per_s"] for r in runs if r["impl"] == "pytorch-eager"]
ratios = [o / t for o, t in zip(ondol, torch)]
fpt = runs[0]["flops_per_token"]
o, t = statistics.median(ondol), statistics.median(torch)
print(f"median of {len(ondol)}: ondol {o:.0f} tokens/s ({o * fpt / 1e9:.1f} GFLOP/s), "
      f"PyTorch eager {t:.0f} tokens/s ({t * fpt / 1e9:.1f} GFLOP/s); "
      f"ratio per round {', '.join(f'{r:.2f}' for r in ratios)}; median ratio {statistics.median(ratios):.2f}x")
PY
