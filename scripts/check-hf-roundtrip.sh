#!/usr/bin/env bash
# transformers loads ondol checkpoints as they are and reproduces ondol's loss.
# Trains the smoke configs of every architecture briefly, and the smoke Llama as each of its
# transformers relatives (Qwen2, Qwen3, EXAONE 4, HyperCLOVA X with and without Peri-LN,
# SmolLM3 with sliding windows and layers without positions, EXAONE 4 with them too, Qwen3
# with windows on its last layers) and as Gemma 3 (with linear rope scaling too),
# evaluates one 128-token row of sample text with `ondol eval`, then loads the checkpoint with
# AutoModelForCausalLM and compares (scripts/make-hf-fixtures.py check, tolerance 1e-4 relative);
# then the same row with a loss mask beside it (fine-tuning on completions) against
# transformers' loss with the unlearned labels at -100.
# Needs a Python with torch and transformers: PYTHON=path/to/python (default python3);
# CONFIGS="smoke hybrid-smoke qwen3" checks some of them.
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
# The same row, learning runs of 11 targets out of every 29 (the first token is never a target).
import os
os.mkdir(f"{sys.argv[1]}/masked")
open(f"{sys.argv[1]}/masked/row.bin", "wb").write(header + struct.pack(f"<{len(toks)}H", *toks))
learned = [int(i % 29 < 11) for i in range(len(toks))]
bits = bytes(sum(learned[i + b] << b for b in range(8) if i + b < len(toks)) for i in range(0, len(toks), 8))
open(f"{sys.argv[1]}/masked/row.mask", "wb").write(struct.pack("<256i", 20261208, 1, len(toks), *([0] * 253)) + bits)
json.dump([learned], open(f"{sys.argv[1]}/learned.json", "w"))
PY
# A name: its config file and the settings that make it (the Llama relatives are the smoke Llama).
variant() {
  case $1 in
    qwen2) echo "smoke model.qkv_bias=true" ;;
    qwen3) echo "smoke model.qk_norm=true model.head_dim=48" ;;
    exaone4) echo "smoke model.qk_norm=true model.block_norms=\"post\"" ;;
    peri-ln) echo "smoke model.block_norms=\"both\" model.mup.residual_multiplier=0.5" ;;
    mup) echo "smoke model.mup.embedding_multiplier=2.0 model.mup.logits_multiplier=0.5 model.mup.attention_multiplier=0.1" ;;
    smollm3) echo "smoke model.sliding_window=48 model.attention_pattern=\"LGLN\"" ;;
    qwen3-window) echo "smoke model.qk_norm=true model.sliding_window=48 model.attention_pattern=\"GGLL\"" ;;
    gemma3) echo "smoke model.arch=\"gemma3\" model.tie_embeddings=true model.sliding_window=48 model.attention_pattern=\"LLLG\" model.rope_theta=1000000.0 model.rope_theta_local=10000.0 model.mup.attention_multiplier=0.25" ;;
    gemma3-linear) echo "smoke model.arch=\"gemma3\" model.sliding_window=48 model.attention_pattern=\"LG\" model.rope_scaling={type=\"linear\",factor=4.0}" ;;
    exaone4-window) echo "smoke model.qk_norm=true model.block_norms=\"post\" model.sliding_window=48 model.attention_pattern=\"LLLN\"" ;;
    *) echo "$1" ;;
  esac
}
for name in ${CONFIGS:-smoke smoke-gpt2 mamba-smoke mamba2-smoke hybrid-smoke qwen2 qwen3 exaone4 peri-ln mup smollm3 exaone4-window qwen3-window gemma3 gemma3-linear}; do
  read -r config sets <<<"$(variant "$name")"
  args=()
  for s in $sets; do args+=(--set "$s"); done
  target/release/ondol train "configs/$config.toml" --run-dir "$work/$name" --set training.steps=60 \
    --set training.eval_every=0 "${args[@]}" 2>/dev/null
  ckpt="$work/$name/checkpoints/step-00000060"
  loss=$(target/release/ondol eval "$ckpt" --data "$work/row.bin" --seq-len 127 --batch-size 1 --json |
    "$py" -c 'import json, sys; print(json.load(sys.stdin)["loss"])')
  echo "$name ($(grep -o '"model_type": "[a-z0-9_]*"' "$ckpt/config.json")): ondol loss $loss"
  "$py" scripts/make-hf-fixtures.py check "$ckpt" --tokens "$work/row.json" --expected-loss "$loss"
  masked=$(target/release/ondol eval "$ckpt" --data "$work/masked/row.bin" --seq-len 127 --batch-size 1 --json |
    "$py" -c 'import json, sys; print(json.load(sys.stdin)["loss"])')
  echo "$name with a loss mask: ondol loss $masked"
  "$py" scripts/make-hf-fixtures.py check "$ckpt" --tokens "$work/row.json" --learned "$work/learned.json" \
    --expected-loss "$masked"
done
