#!/usr/bin/env python3
"""Training throughput of ondol beside PyTorch on the same machine: same model shape, batch and
sequence length, one after the other in one script.

    python3 benches/train-vs-pytorch.py --ondol target/release/ondol configs/gpt2-124m.toml configs/llama-1b.toml

PyTorch trains the transformers model of the config's architecture (GPT2LMHeadModel,
LlamaForCausalLM, MambaForCausalLM or Mamba2ForCausalLM, randomly initialised from the
config's shape, SDPA attention; the Mamba scans in PyTorch, as transformers runs them without
the mamba_ssm kernels) on random
tokens: bf16 autocast on a GPU, fused AdamW, torch.compile (--no-compile to skip it). ondol
runs `ondol train CONFIG` for the same steps. Both skip their first --warmup steps (compiles,
allocator warm-up) and report the median tokens/s of the rest. MFU is on ondol's FLOP count
and peak for both (its metrics give tokens/s and MFU per step, so FLOPs/token / peak =
MFU / tokens/s). Prints one line per config and a JSON object per config last. `--set
KEY=VALUE` passes overrides to ondol, and `--no-peer` runs ondol alone: `--no-peer --set
training.tensor_cores=false` measures ondol on its CUDA-core attention and SSD.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path


def ondol_run(ondol, config, steps, warmup, sets):
    """Median tokens/s and MFU of ondol's steps after the warm-up (and its device-memory line);
    `sets` are more `--set` overrides."""
    with tempfile.TemporaryDirectory() as run_dir:
        # The learning-rate warm-up must fit the shorter run; it does not change the speed.
        cmd = [ondol, "train", str(config), "--run-dir", run_dir, "--set", f"training.steps={steps}",
               "--set", "metrics.log_every=1", "--set", "training.eval_every=0",
               "--set", f"lr_scheduler.warmup_steps={steps // 2}", "--set", "checkpoint.at_end=false"]
        cmd += [a for kv in sets for a in ("--set", kv)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"ondol failed on {config}:\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    rows = [r for r in rows if "tokens_per_s" in r and r.get("step", 0) > warmup]
    if not rows:
        sys.exit(f"ondol logged no step after the first {warmup} of {config}")
    memory = [line for line in done.stderr.splitlines() if line.startswith("device memory")]
    tps, mfu = (statistics.median(r[k] for r in rows) for k in ("tokens_per_s", "mfu"))
    return tps, mfu, (memory or [""])[-1]


def hf_model(model):
    """The transformers model of ondol's [model] table, randomly initialised."""
    import transformers

    arch, d, heads = model["arch"], model["d_model"], model.get("n_heads", 0)
    # The vocabulary padded to a multiple of 64 rows, as ondol's training pads its head (and
    # nanoGPT its GPT-2, to 50304): both sides run the same aligned head GEMMs.
    vocab = -(-model["vocab_size"] // 64) * 64
    common = dict(vocab_size=vocab, tie_word_embeddings=model.get("tie_embeddings", arch == "gpt2"))
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=d, n_layer=model["n_layers"], n_head=heads,
                                      n_positions=model["max_seq_len"], n_inner=model.get("ffn_hidden"), **common)
        cls = transformers.GPT2LMHeadModel
    elif arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=d, num_hidden_layers=model["n_layers"], num_attention_heads=heads,
                                       num_key_value_heads=model.get("n_kv_heads", heads),
                                       intermediate_size=model["ffn_hidden"],
                                       max_position_embeddings=model["max_seq_len"],
                                       rope_theta=model.get("rope_theta", 10000.0),
                                       rms_norm_eps=model.get("norm_eps", 1e-5), **common)
        cls = transformers.LlamaForCausalLM
    elif arch in ("mamba", "mamba2"):
        # Without the mamba_ssm / causal_conv1d CUDA packages, transformers scans in PyTorch:
        # MambaMixer.slow_forward (sequential over time), Mamba2Mixer.torch_forward (chunked).
        ssm = model.get("ssm", {})
        expand, conv = ssm.get("expand", 2), ssm.get("conv_kernel", 4)
        shared = dict(hidden_size=d, num_hidden_layers=model["n_layers"], expand=expand, conv_kernel=conv,
                      layer_norm_epsilon=model.get("norm_eps", 1e-5), use_bias=False, use_conv_bias=True, **common)
        if arch == "mamba":
            cfg = transformers.MambaConfig(state_size=ssm.get("state_size", 16),
                                           time_step_rank=ssm.get("time_step_rank", -(-d // 16)), **shared)
            cls = transformers.MambaForCausalLM
        else:
            head_dim = ssm.get("head_dim", 64)
            cfg = transformers.Mamba2Config(state_size=ssm.get("state_size", 128), head_dim=head_dim,
                                            num_heads=expand * d // head_dim, n_groups=ssm.get("n_groups", 1),
                                            chunk_size=ssm.get("chunk_size", 256), **shared)
            cls = transformers.Mamba2ForCausalLM
        return cls(cfg)
    else:
        sys.exit(f"no PyTorch peer for arch = {arch!r} (gpt2, llama, mamba and mamba2 have one)")
    cfg._attn_implementation = "sdpa"
    return cls(cfg)


def pytorch_run(cfg, steps, warmup, compile_model):
    """Median tokens/s of PyTorch's training steps after the warm-up."""
    import torch  # here, so that ondol's figures come even where PyTorch is missing

    train = cfg["training"]
    cuda = train.get("device", "cpu") == "cuda"
    device = "cuda" if cuda else "cpu"
    batch, seq, accum = train["batch_size"], train["seq_len"], train.get("grad_accum", 1)
    torch.manual_seed(train.get("seed", 0))
    model = hf_model(cfg["model"]).to(device)
    model.train()
    opt_cfg = cfg.get("optimizer", {})
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg.get("lr", 3e-4), weight_decay=opt_cfg.get("weight_decay", 0.1),
                            betas=(0.9, 0.95), fused=cuda)
    step_model = torch.compile(model) if compile_model else model
    vocab = cfg["model"]["vocab_size"]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times = []
    for step in range(steps):
        sync()
        start = time.perf_counter()
        for _ in range(accum):
            ids = torch.randint(0, vocab, (batch, seq), device=device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
                loss = step_model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.get("grad_clip", 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return batch * seq * accum / statistics.median(times[warmup:]), memory


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--ondol", default="target/release/ondol")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for ondol")
    p.add_argument("--no-peer", action="store_true", help="ondol alone (e.g. to compare two of its settings)")
    args = p.parse_args()
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    results = []
    for config in args.configs:
        with open(config, "rb") as f:
            cfg = tomllib.load(f)
        ondol_tps, ondol_mfu, ondol_memory = ondol_run(args.ondol, config, args.steps, args.warmup, args.set)
        settings = "".join(f" {kv}" for kv in args.set)
        print(f"{config.stem:<14} ondol{settings} {ondol_tps:>9.0f} tok/s (MFU {100 * ondol_mfu:5.1f} %)  {ondol_memory}",
              flush=True)
        result = {"config": str(config), "ondol_sets": args.set, "ondol_tokens_per_s": ondol_tps, "ondol_mfu": ondol_mfu}
        if args.no_peer:
            results.append(result)
            continue
        compiled = not args.no_compile
        try:
            try:
                torch_tps, memory = pytorch_run(cfg, args.steps, args.warmup, compiled)
            except ImportError:
                raise
            except Exception as e:  # torch.compile failing here (no compiler, Triton) still leaves eager
                if not compiled:
                    raise
                print(f"{config.stem:<14} torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager instead",
                      flush=True)
                compiled = False
                torch_tps, memory = pytorch_run(cfg, args.steps, args.warmup, compiled)
        except Exception as e:
            print(f"{config.stem:<14} no PyTorch peer: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append(result)
            continue
        torch_mfu = torch_tps * ondol_mfu / ondol_tps
        peer = "pytorch" + ("+compile" if compiled else "")
        print(f"{config.stem:<14} {peer} {torch_tps:>9.0f} tok/s (MFU {100 * torch_mfu:5.1f} %)   "
              f"ondol / pytorch {ondol_tps / torch_tps:.2f}", flush=True)
        result.update({"peer": peer, "peer_tokens_per_s": torch_tps, "peer_mfu": torch_mfu,
                       "peer_max_memory_gib": memory, "ratio": ondol_tps / torch_tps})
        results.append(result)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
