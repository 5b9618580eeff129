#!/usr/bin/env python3
"""PyTorch-eager peer for ondol's CPU training benchmark.

What it measures: fp32 training throughput of Hugging Face transformers'
`LlamaForCausalLM` on the CPU, with the same model and optimiser as ondol's
configs/bench-cpu.toml:

    vocab 8192, d_model 256, 4 layers, 4 heads (4 KV heads), FFN 688 (SwiGLU),
    RMSNorm eps 1e-5, RoPE theta 10000, untied lm_head, no biases,
    seq_len 256, batch 8, AdamW(lr 3e-4, wd 0.1, betas (0.9, 0.95), eps 1e-8),
    gradient clipping to global norm 1.0.

One timed step is a whole training step: zero_grad(set_to_none=True), forward
with labels -> loss, backward, clip_grad_norm_, optimizer.step(). `--warmup`
steps run first and are not timed; then `--steps` steps are timed with
time.perf_counter(). Batches are drawn before timing starts, from seeded random
token ids or from an llm.c token shard (`--tokens FILE`). HF shifts the labels
itself, so the loss covers T-1 targets per row; the forward/backward still runs
over all B*T tokens, which is what tokens/s counts.

FLOPs per token follow the PaLM convention that ondol uses (DESIGN.md section
7): 6*N + 12*L*d_model*T, where N is every parameter except the input
embedding (the untied lm_head and all norms are counted). GFLOP/s is that
times tokens/s.

ondol's side is measured by its own bench binary (`cargo bench`) on the same
config; a driver script runs both and compares their JSON lines. The LAST line
printed here is one JSON object:

    {"impl": "pytorch-eager", "torch": ..., "transformers": ..., "threads": n,
     "tokens_per_s": x, "gflops": y, "step_ms": z,
     "params_non_embedding": N, "flops_per_token": f,
     "loss_first": ..., "loss_last": ...}

loss_first is the loss of the very first step (warm-up included), loss_last
that of the last timed step. Setup: pip install -r benches/requirements.txt.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, D_MODEL, LAYERS, HEADS, FFN, MAX_POS = 8192, 256, 4, 4, 688, 256


def load_shard(path):
    """Tokens of an llm.c shard: 256 int32 header (magic 20240520, version, count), then tokens."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.size != 256 or header[0] != 20240520:
        raise SystemExit(f"{path}: not an llm.c shard (bad magic)")
    dtype = {1: np.uint16, 2: np.uint32}.get(int(header[1]))
    if dtype is None:
        raise SystemExit(f"{path}: unknown shard version {header[1]}")
    tokens = np.fromfile(path, dtype=dtype, count=int(header[2]), offset=256 * 4)
    if tokens.size < int(header[2]):
        raise SystemExit(f"{path}: truncated ({tokens.size} of {header[2]} tokens)")
    if tokens.size and int(tokens.max()) >= VOCAB:
        raise SystemExit(f"{path}: token id {tokens.max()} >= vocab {VOCAB}")
    return torch.from_numpy(tokens.astype(np.int64))


def make_batches(args, n):
    """n batches of shape (batch, seq): consecutive windows of the shard, or seeded random ids."""
    if args.tokens:
        tokens = load_shard(args.tokens)
        per_batch = args.batch * args.seq
        if tokens.numel() < per_batch:
            raise SystemExit(f"{args.tokens}: {tokens.numel()} tokens < one batch ({per_batch})")
        usable = tokens.numel() // per_batch
        return [tokens[(i % usable) * per_batch:(i % usable + 1) * per_batch].view(args.batch, args.seq)
                for i in range(n)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen) for _ in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokens", help="llm.c token shard (default: random token ids)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.seq > MAX_POS:
        raise SystemExit("need --steps >= 1, --warmup >= 0, --seq <= 256")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=FFN,
        max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        use_cache=False, attn_implementation=args.attn,
    )
    model = LlamaForCausalLM(config).to(torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                            betas=(0.9, 0.95), eps=1e-8)

    n_total = sum(p.numel() for p in model.parameters())
    n_flop = n_total - model.get_input_embeddings().weight.numel()
    flops_per_token = 6 * n_flop + 12 * LAYERS * D_MODEL * args.seq
    tokens_per_step = args.batch * args.seq

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, attn {model.config._attn_implementation}")
    print(f"params: total {n_total:,}, non-embedding N {n_flop:,}")
    print(f"FLOPs/token (6N + 12*L*d*T): {flops_per_token:,}")
    print(f"batch {args.batch} x seq {args.seq} = {tokens_per_step} tokens/step, "
          f"data: {args.tokens or f'random ids (seed {args.seed})'}")

    def train_step(x):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    batches = make_batches(args, args.warmup + args.steps)
    losses = []
    for i in range(args.warmup):
        losses.append(train_step(batches[i]))
        print(f"warmup {i + 1}/{args.warmup}: loss {losses[-1]:.4f}")

    step_times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(batches[args.warmup + i]))
        step_times.append(time.perf_counter() - t0)
        print(f"step {i + 1}/{args.steps}: loss {losses[-1]:.4f}, {step_times[-1] * 1e3:.1f} ms")

    elapsed = sum(step_times)
    tokens_per_s = args.steps * tokens_per_step / elapsed
    gflops = flops_per_token * tokens_per_s / 1e9
    step_ms = elapsed / args.steps * 1e3
    print(f"mean step {step_ms:.1f} ms, {tokens_per_s:,.0f} tokens/s, {gflops:.2f} GFLOP/s")
    print(json.dumps({
        "impl": "pytorch-eager", "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "tokens_per_s": round(tokens_per_s, 1), "gflops": round(gflops, 3),
        "step_ms": round(step_ms, 2), "params_non_embedding": n_flop,
        "flops_per_token": flops_per_token,
        "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
    }))


if __name__ == "__main__":
    main()
