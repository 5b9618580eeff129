#!/usr/bin/env python3
"""PyTorch's peers of crates/ondol-cuda/benches/kernels.rs, on the same shapes and with the same
FLOP and byte counts, bf16:

- attention: causal scaled_dot_product_attention, flash backend; 16 heads of 128, 16384 tokens
  a call, T = 1024 to 8192; TFLOP/s of the causal half of 4 T^2 D per head forward, 2.5x that
  backward.
- the selective scan of one Mamba 130M layer and the SSD of one Mamba-2 130M layer: transformers'
  `mamba_selective_scan` and `mamba2_chunk_scan`, which are mamba_ssm's kernels where that is
  installed and else transformers' own PyTorch implementation (the line says which); GB/s of
  the bytes the op must move, as ondol's bench counts them.

With `--ondol FILE` (the ondol bench's output), each PyTorch line is followed by the ratio of
the two on the same op: PyTorch's time over ondol's, so above 1 means ondol is faster.
`target/gpu-bundle/run.sh bench` runs both on the GPU. `--device cpu --small` runs every op on
small shapes on the CPU: a check that the script works with the installed transformers."""
import argparse
import importlib
import math
import re
import sys
import time

import torch
import torch.nn.functional as F

# The ondol bench's lines (kernels.rs) and the times they carry, keyed as the ops below are.
ONDOL_LINES = {
    "attention": re.compile(r"^flash attention\s+T\s+(\d+)\s+forward\s+([\d.]+) ms .*backward\s+([\d.]+) ms"),
    "scan": re.compile(r"^selective scan .*forward ([\d.]+) ms .*backward ([\d.]+) ms"),
    "ssd": re.compile(r"^ssd \(mamba2-130m layer, tensor cores\)\s+forward ([\d.]+) ms .*backward ([\d.]+) ms"),
}


def ondol_times(path):
    """(op, T or None) -> (forward ms, backward ms), from the ondol bench's output."""
    times = {}
    for line in open(path):
        line = line.strip()
        if m := ONDOL_LINES["attention"].match(line):
            times[("attention", int(m[1]))] = (float(m[2]), float(m[3]))
        elif m := ONDOL_LINES["scan"].match(line):
            times[("scan", None)] = (float(m[1]), float(m[2]))
        elif m := ONDOL_LINES["ssd"].match(line):
            times[("ssd", None)] = (float(m[1]), float(m[2]))
    return times


def best_ms(fn, device, reps):
    """Milliseconds per call of `fn`: one warm-up call, then the best of `reps`."""
    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def fwd_bwd_ms(op, inputs, device, reps):
    """Forward and backward milliseconds of `op(*inputs)`; backward is the gradient of every
    input that requires one, from a given output gradient."""
    fwd = best_ms(lambda: op(*inputs), device, reps)
    out = op(*inputs)
    dout = torch.randn_like(out)
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    bwd = best_ms(lambda: torch.autograd.grad(out, wrt, dout, retain_graph=True), device, reps)
    return fwd, bwd


def implementation(package):
    """Which implementation transformers' wrapper calls: the package's where it imports."""
    try:
        importlib.import_module(package)
        return f"{package}'s kernel"
    except Exception:
        return "transformers' PyTorch path"


def attention(args, ondol):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, d, tokens = (16, 128, 16384) if not args.small else (2, 64, 256)
    lengths = (1024, 2048, 4096, 8192) if not args.small else (64, 128)
    backend = SDPBackend.FLASH_ATTENTION if args.device == "cuda" else SDPBackend.MATH
    for seq in lengths:
        batch = tokens // seq
        q, k, v = (new(args, batch, heads, seq, d) for _ in range(3))
        with sdpa_kernel(backend):
            fwd, bwd = fwd_bwd_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), args.device, args.reps)
        flops = 2.0 * batch * heads * seq * seq * d
        print(
            f"{'pytorch sdpa (' + backend.name.lower() + ')':<26} T {seq:>5}  forward {fwd:>7.3f} ms {flops / fwd / 1e9:>6.1f} TFLOP/s"
            f"   backward {bwd:>7.3f} ms {2.5 * flops / bwd / 1e9:>6.1f} TFLOP/s"
        )
        ratio(ondol, ("attention", seq), fwd, bwd)


def selective_scan(args, ondol):
    """One Mamba 130M layer's scan: 8 x 2048 tokens, 1536 channels, 16 states."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    batch, length, channels, state = (8, 2048, 1536, 16) if not args.small else (2, 64, 32, 16)
    u, delta, z = (new(args, batch, channels, length) for _ in range(3))
    b, c = (new(args, batch, state, length) for _ in range(2))
    a = (-torch.rand(channels, state, device=args.device)).requires_grad_()
    d_skip, delta_bias = (new(args, channels, dtype=torch.float32) for _ in range(2))

    def scan(u, delta, a, b, c, d_skip, z, delta_bias):
        return mamba_selective_scan(u, delta, a, b, c, d_skip, z, delta_bias=delta_bias, delta_softplus=True)

    fwd, bwd = fwd_bwd_ms(scan, (u, delta, a, b, c, d_skip, z, delta_bias), args.device, args.reps)
    rows = batch * length
    fwd_bytes, bwd_bytes = 2.0 * 4 * rows * channels, 2.0 * 8 * rows * channels
    print(
        f"pytorch selective scan (mamba-130m layer, {implementation('mamba_ssm')}) forward {fwd:.3f} ms"
        f" {fwd_bytes / fwd / 1e6:.0f} GB/s   backward {bwd:.3f} ms {bwd_bytes / bwd / 1e6:.0f} GB/s"
    )
    ratio(ondol, ("scan", None), fwd, bwd)


def ssd(args, ondol):
    """One Mamba-2 130M layer's SSD: 8 x 2048 tokens, 24 heads of 64, one group, N 128, chunks
    of 256."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    batch, length, heads, head_dim, state, chunk = (8, 2048, 24, 64, 128, 256) if not args.small else (2, 96, 4, 16, 32, 32)
    x = new(args, batch, length, heads, head_dim)
    dt = new(args, batch, length, heads)
    b, c = (new(args, batch, length, 1, state) for _ in range(2))
    a = (-torch.rand(heads, device=args.device)).requires_grad_()
    d_skip, dt_bias = (new(args, heads, dtype=torch.float32) for _ in range(2))

    def scan(x, dt, a, b, c, d_skip, dt_bias):
        return mamba2_chunk_scan(x, dt, a, b, c, chunk, D=d_skip, dt_bias=dt_bias, dt_softplus=True)

    fwd, bwd = fwd_bwd_ms(scan, (x, dt, a, b, c, d_skip, dt_bias), args.device, args.reps)
    rows, inner = batch * length, heads * head_dim
    saved_states = batch * (math.ceil(length / chunk) + 1) * inner * state
    fwd_bytes = 2.0 * rows * (inner + 2 * state + inner) + 4.0 * saved_states
    macs = rows * heads * (chunk // 2 * (state + head_dim) + 2 * head_dim * state)
    print(
        f"pytorch ssd (mamba2-130m layer, {implementation('mamba_ssm')}) forward {fwd:.3f} ms"
        f" {2.0 * macs / fwd / 1e9:.1f} TFLOP/s {fwd_bytes / fwd / 1e6:.0f} GB/s   backward {bwd:.3f} ms"
    )
    ratio(ondol, ("ssd", None), fwd, bwd)


def new(args, *shape, dtype=torch.bfloat16):
    return (0.5 * torch.randn(*shape, device=args.device)).to(dtype).requires_grad_()


def ratio(ondol, key, fwd, bwd):
    if ondol is None:
        return
    if key not in ondol:
        print("  (no ondol figure for this op in the given output)")
        return
    o_fwd, o_bwd = ondol[key]
    print(f"  pytorch / ondol time: forward {fwd / o_fwd:.2f}x   backward {bwd / o_bwd:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ondol", help="the output of ondol's kernel bench, for the ratios")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="small shapes (a check that the script runs)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    ondol = ondol_times(args.ondol) if args.ondol else None
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}; torch {torch.__version__}")
    failed = False
    for op in (attention, selective_scan, ssd):
        try:
            op(args, ondol)
        except Exception as e:  # one op's failure (memory, a missing function) keeps the others
            print(f"pytorch {op.__name__}: failed: {type(e).__name__}: {e}")
            failed = True
    sys.exit(1 if failed else 0)


main()
