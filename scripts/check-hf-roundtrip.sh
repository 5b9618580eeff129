#!/usr/bin/env bash
# transformers loads ondol checkpoints as they are and reproduces ondol's loss.
# Trains the smoke configs of every architecture briefly, evaluates one 128-token row of sample
# text with `ondol eval`, then loads the checkpoint with AutoModelForCausalLM and compares
# (scripts/make-hf-fixtures.py check, tolerance 1e-4 relative).
# Needs a Python with torch and transformers: PYTHON=path/to/python (default python3);
# CONFIGS="smoke hybrid-smoke" checks some of them.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release -q
"$py" - "$work" <<'PY'
import json, struct, sys
toks = list(open("data/sample/en-web-john.txt", "rb").read()[:128])
header = struct.pack("<256i", 20240520, 1, len(toks), *([0] * 253))
open(f"{sys.argv[1]}/row.bin", "wb").write(header + struct.pack(f"<{len(toks)}H", *toks))
json.dump([toks], open(f"{sys.argv[1]}/row.json", "w"))
PY
for config in ${CONFIGS:-smoke smoke-gpt2 mamba-smoke mamba2-smoke hybrid-smoke}; do
  target/release/ondol train "configs/$config.toml" --run-dir "$work/$config" --set training.steps=60 \
    --set training.eval_every=0 2>/dev/null
  ckpt="$work/$config/checkpoints/step-00000060"
  loss=$(target/release/ondol eval "$ckpt" --data "$work/row.bin" --seq-len 127 --batch-size 1 --json |
    "$py" -c 'import json, sys; print(json.load(sys.stdin)["loss"])')
  echo "$config: ondol loss $loss"
  "$py" scripts/make-hf-fixtures.py check "$ckpt" --tokens "$work/row.json" --expected-loss "$loss"
done
