#!/usr/bin/env python3
"""Compares two runs' metrics.jsonl: the training loss at every logged step and the validation
losses, as the largest relative difference; exits 1 if it exceeds the tolerance.

    compare-curves.py REFERENCE.jsonl RUN.jsonl TOLERANCE
"""
import json
import sys


def losses(path):
    train, val = {}, {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                train[row["step"]] = row["loss"]
            elif "val_loss" in row:
                val[row["step"]] = row["val_loss"]
    return train, val


def main():
    ref_path, run_path, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
    (ref_train, ref_val), (run_train, run_val) = losses(ref_path), losses(run_path)
    worst = 0.0
    for kind, ref, run in (("train", ref_train, run_train), ("val", ref_val, run_val)):
        if sorted(ref) != sorted(run):
            print(f"{kind} losses logged at different steps: {sorted(ref)} vs {sorted(run)}")
            sys.exit(1)
        for step in sorted(ref):
            rel = abs(run[step] - ref[step]) / abs(ref[step])
            worst = max(worst, rel)
            print(f"  {kind:5} step {step:5}  reference {ref[step]:.5f}  run {run[step]:.5f}  relative {rel:.2e}")
    verdict = "ok" if worst <= tol else "FAIL"
    print(f"{verdict}: largest relative difference {worst:.2e} (tolerance {tol:.0e})")
    sys.exit(0 if worst <= tol else 1)


main()
