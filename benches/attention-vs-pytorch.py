#!/usr/bin/env python3
"""PyTorch's causal scaled_dot_product_attention (flash backend, bf16) on the shapes of
crates/ondol-cuda/benches/kernels.rs: 16 heads of 128, 16384 tokens a call, T = 1024 to 8192.
Prints forward and backward TFLOP/s with the same FLOP count (the causal half of 4 T^2 D per
head forward, 2.5x that backward). Run it on the GPU machine beside the ondol bench
(`target/gpu-bundle/run.sh bench` runs both)."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def best_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def main():
    heads, d, tokens = 16, 128, 16384
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    for seq in (1024, 2048, 4096, 8192):
        batch = tokens // seq
        q, k, v = (torch.randn(batch, heads, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fwd = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            bwd = best_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        flops = 2.0 * batch * heads * seq * seq * d
        print(
            f"{'pytorch sdpa (flash)':<22} T {seq:>5}  forward {fwd:>7.3f} ms {flops / fwd / 1e9:>6.1f} TFLOP/s"
            f"   backward {bwd:>7.3f} ms {2.5 * flops / bwd / 1e9:>6.1f} TFLOP/s"
        )


main()
