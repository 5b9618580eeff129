#!/usr/bin/env bash
# Encode throughput: ondol (the `tokenizers` crate through ondol-data, documents encoded in
# parallel) vs the Python binding of the same library (`Tokenizer.encode_batch`), on the same
# tokenizer.json and the same ~20 MB of text (data/sample repeated, paragraphs as documents),
# alternating for ROUNDS rounds in one script so that machine drift hits both alike. Both wall
# time and CPU time (all threads) are reported: on a shared machine the CPU time is the steadier.
# Needs a Python with `tokenizers`: python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokenizers
# (then PYTHON=/tmp/tokvenv/bin/python). Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-/tmp/tokvenv/bin/python}
rounds=${ROUNDS:-3}
vocab=${VOCAB:-8192}
work=$PWD/target/bench-tokenizer
mkdir -p "$work"
cargo build --release -q
cargo bench -p ondol-data --bench data_prepare --no-run -q
./target/release/ondol tokenizer train --input 'data/sample/*.txt' --doc-split blank-line \
  --vocab-size "$vocab" --out "$work/tokenizer.json" --overwrite 2>/dev/null
# 16 copies of the sample, each paragraph prefixed by its copy number so that no copy is
# byte-identical (neither side may profit from caching whole documents).
for i in $(seq -w 1 16); do
  for f in data/sample/*.txt; do sed -e "s/^\(.\)/$i \1/" "$f"; printf '\n\n'; done
done > "$work/corpus.txt"
results=()
for ((r = 1; r <= rounds; r++)); do
  results+=("$(cargo bench -p ondol-data --bench data_prepare -q -- encode "$work/corpus.txt" "$work/tokenizer.json" | tail -n 1)")
  echo "${results[-1]}"
  results+=("$("$python" - "$work/corpus.txt" "$work/tokenizer.json" <<'PY'
import json, sys, time
from tokenizers import Tokenizer
text = open(sys.argv[1], encoding="utf-8").read()
docs = [d for d in text.split("\n\n") if d.strip()]
tok = Tokenizer.from_file(sys.argv[2])
best, best_cpu, tokens = float("inf"), float("inf"), 0
for _ in range(3):
    t, c = time.perf_counter(), time.process_time()
    out = tok.encode_batch(docs, add_special_tokens=False)
    best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    tokens = sum(len(e.ids) for e in out)
mb = len(text.encode()) / 1e6
print(json.dumps({"impl": "python-tokenizers", "docs": len(docs), "mb": round(mb, 2), "tokens": tokens,
                  "seconds": round(best, 3), "mb_per_s": round(mb / best, 2),
                  "cpu_seconds": round(best_cpu, 2), "mb_per_cpu_s": round(mb / best_cpu, 2)}))
PY
)")
  echo "${results[-1]}"
done
python3 - "${results[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(a) for a in sys.argv[1:]]
assert runs[0]["tokens"] == runs[1]["tokens"], "the two sides produced different token counts"
for key, unit in [("mb_per_s", "MB/s (wall)"), ("mb_per_cpu_s", "MB per CPU-second")]:
    o = statistics.median(r[key] for r in runs if r["impl"] == "ondol")
    p = statistics.median(r[key] for r in runs if r["impl"] == "python-tokenizers")
    print(f"median of {len(runs) // 2}: ondol {o:.2f}, Python tokenizers encode_batch {p:.2f} {unit}; ratio {o / p:.2f}x")
PY
