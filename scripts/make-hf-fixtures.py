#!/usr/bin/env python3
# Generates tiny random Hugging Face models (Llama, Llama 3 rope scaling, Mistral, Qwen2, SmolLM3, Gemma 3, GPT-2, Mamba, Mamba-2, Nemotron-H; + expected logits/loss) under crates/ondol-ckpt/tests/fixtures/ so Rust tests can check ondol's forward pass against transformers.
"""
Usage:
  python scripts/make-hf-fixtures.py [OUT_DIR] [--only NAME...]
      Write the fixtures (default OUT_DIR: crates/ondol-ckpt/tests/fixtures), or the named ones.
      Each fixture directory holds config.json + model.safetensors (from
      save_pretrained) and expected.safetensors with input_ids (int64 [2, 13]),
      logits (float32 [2, 13, 97]) and loss (float32 [1], labels = input_ids).

  python scripts/make-hf-fixtures.py check CKPT_DIR --tokens IDS_JSON --expected-loss X
      Load CKPT_DIR with transformers (eager attention, fp32), run the token ids
      (a JSON list of lists, or a path to a file containing one) with
      labels = input_ids, print the loss and its relative difference to X, and
      exit 1 if it exceeds --tol (default 1e-4).

  python scripts/make-hf-fixtures.py expect FIXTURE_DIR...
      Recompute each fixture's expected.safetensors (logits and loss of its saved
      input_ids) with the installed transformers, keeping its weights: for when
      transformers changes a model's forward (as it dropped Nemotron-H's step floor
      at time_step_min).

Requires torch, transformers and safetensors (CPU is enough).
"""

import argparse
import json
import os
import re
import sys

import torch

VOCAB = 97
BATCH = 2
SEQ = 13
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "crates", "ondol-ckpt", "tests", "fixtures")


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(**llama_sizes(), tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None)


def mistral_window_config():
    from transformers import MistralConfig

    # Mistral 7B v0.1's attention: a sliding window (5 keys) on every layer, shorter than the
    # fixture's 13 tokens.
    return MistralConfig(**llama_sizes(), tie_word_embeddings=False, rope_theta=10000.0, sliding_window=5)


def smollm3_config():
    from transformers import SmolLM3Config

    # SmolLM3's layers without rotary positions (its every 4th), and windows of 4 keys on two
    # of the others: "LGLN".
    sizes = dict(llama_sizes(), num_hidden_layers=4)
    # (Its default special tokens lie past the tiny vocabulary.)
    return SmolLM3Config(**sizes, tie_word_embeddings=True, rope_theta=10000.0, no_rope_layers=[1, 1, 1, 0],
                         pad_token_id=None, bos_token_id=None, eos_token_id=None,
                         use_sliding_window=True, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


def exaone4_window_config():
    from transformers import Exaone4Config

    # As EXAONE 4.0 32B: windowed layers (4 keys) with rotary positions, every 4th layer global
    # without them ("LLLG").
    sizes = dict(llama_sizes(), num_hidden_layers=4)
    return Exaone4Config(**sizes, tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=4,
                         sliding_window_pattern="LLLG",
                         layer_types=["sliding_attention"] * 3 + ["full_attention"])


def gemma3_config():
    from transformers import Gemma3TextConfig

    # Gemma 3's text model: windows of 4 keys with their own rotary theta on three of four
    # layers ("LLGL"), scores scaled by query_pre_attn_scalar = 6 (not head_dim 8), GeGLU.
    sizes = {k: v for k, v in llama_sizes().items() if k != "hidden_act"}
    sizes["num_hidden_layers"] = 4
    return Gemma3TextConfig(**sizes, head_dim=8, tie_word_embeddings=True, query_pre_attn_scalar=6,
                            sliding_window=4,
                            layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
                            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                            pad_token_id=None, bos_token_id=None, eos_token_id=None)


def gemma3_image_text_config():
    from transformers import Gemma3Config, SiglipVisionConfig

    # Gemma 3 4B and larger: the text model inside an image-text one (its tensors under
    # language_model., an image model beside it), its global layers' rotary embeddings scaled
    # linearly (factor 8), the windowed layers' not. (The image tokens' ids are transformers'
    # defaults, past the tiny vocabulary: the fixture's tokens are all text.)
    text = gemma3_config().to_dict()
    text["rope_parameters"]["full_attention"] = {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(**llama_sizes(), tie_word_embeddings=True, rope_theta=1000000.0)


def qwen3_config():
    from transformers import Qwen3Config

    # Heads of 12 where hidden_size / heads is 8, as Qwen3's are 128 wide at any width.
    return Qwen3Config(**llama_sizes(), head_dim=12, tie_word_embeddings=True, rope_theta=1000000.0)


def exaone_config():
    from transformers import ExaoneConfig

    # Llama's sizes under EXAONE's names, a longer context.
    sizes = llama_sizes()
    for llama, exaone in (("num_hidden_layers", "num_layers"), ("rms_norm_eps", "layer_norm_epsilon"),
                          ("hidden_act", "activation_function")):
        sizes[exaone] = sizes.pop(llama)
    sizes["max_position_embeddings"] = 256
    # As EXAONE 3.5 2.4B: a tied head and Llama 3.1's rotary scaling.
    rope = {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return ExaoneConfig(**sizes, tie_word_embeddings=True, rope_parameters=rope,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)


def as_exaone_checkpoint(d):
    """Rewrites a saved ExaoneConfig model as EXAONE 3.5's repositories hold it, with their
    field names in config.json and their tensor names (transformers renames both on loading)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for llama, exaone in (("num_hidden_layers", "num_layers"), ("rms_norm_eps", "layer_norm_epsilon"),
                          ("hidden_act", "activation_function")):
        cfg[exaone] = cfg.pop(llama)
    # transformers 4's rotary fields, and none EXAONE's files lack.
    cfg["rope_scaling"] = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = cfg["rope_scaling"].pop("rope_theta")
    for absent in ("attention_bias", "mlp_bias"):
        cfg.pop(absent)
    cfg["architectures"] = ["ExaoneForCausalLM"]
    cfg["embed_dropout"] = 0.0
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    renames = [(r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.layers\.", "transformer.h."),
               (r"^model\.norm\.", "transformer.ln_f."), (r"\.self_attn\.o_proj\.", ".attn.attention.out_proj."),
               (r"\.self_attn\.", ".attn.attention."), (r"\.input_layernorm\.", ".ln_1."),
               (r"\.post_attention_layernorm\.", ".ln_2."), (r"\.mlp\.gate_proj\.", ".mlp.c_fc_0."),
               (r"\.mlp\.up_proj\.", ".mlp.c_fc_1."), (r"\.mlp\.down_proj\.", ".mlp.c_proj.")]
    weights = os.path.join(d, "model.safetensors")
    tensors = {}
    for name, t in load_file(weights).items():
        for pattern, to in renames:
            name = re.sub(pattern, to, name)
        tensors[name] = t
    save_file(tensors, weights, metadata={"format": "pt"})


def exaone4_config():
    from transformers import Exaone4Config

    # As EXAONE 4.0 1.2B: full attention in every layer, a tied head.
    return Exaone4Config(**llama_sizes(), tie_word_embeddings=True, rope_theta=1000000.0,
                         sliding_window=None, layer_types=["full_attention"] * 2)


def hyperclovax_config():
    from transformers import HyperCLOVAXConfig

    # Peri-LN and muP: every multiplier away from 1, the attention's from 1 / sqrt(head_dim).
    return HyperCLOVAXConfig(**llama_sizes(), use_post_norm=True, embedding_multiplier=2.0,
                             residual_multiplier=0.5, logits_scaling=0.5, attention_multiplier=0.2)


def granite_config():
    from transformers import GraniteConfig

    # muP as Granite 3 has it: logits divided by logits_scaling, a tied head.
    return GraniteConfig(**llama_sizes(), tie_word_embeddings=True, embedding_multiplier=4.0,
                         residual_multiplier=0.3, logits_scaling=2.0, attention_multiplier=0.25)


def llama_sizes():
    """The sizes and numerics of llama_config(), for the configs of Llama's relatives."""
    kw = llama_config().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "initializer_range")
    return {k: kw[k] for k in keep}


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.2,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        initializer_range=0.2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT2Config defaults these to 50256, outside the 97-token vocab
        # (transformers warns); use the last id, as real GPT-2 does.
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )


def mamba_config():
    from transformers import MambaConfig

    return MambaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        layer_norm_epsilon=1e-5,
        initializer_range=0.2,
        pad_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )


def mamba2_config():
    from transformers import Mamba2Config

    # 8 heads x 8 = expand * hidden; chunks of 4 over 13 tokens exercise state passing and padding.
    return Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_heads=8,
        head_dim=8,
        state_size=8,
        n_groups=2,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        chunk_size=4,
        layer_norm_epsilon=1e-5,
        initializer_range=0.2,
        tie_word_embeddings=False,
        pad_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )


def nemotron_h_config():
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        intermediate_size=48,
        ssm_state_size=8,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        expand=2,
        conv_kernel=4,
        chunk_size=4,
        layer_norm_epsilon=1e-5,
        initializer_range=0.2,
        use_mamba_kernels=False,
        tie_word_embeddings=False,
        pad_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )


def perturb_mamba(model, gen):
    """Norm weights and D := 1 + N(0, 0.1); conv biases := N(0, 0.1); A_log += N(0, 0.1), so
    that no parameter sits at a value that hides a wrong index."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name and name.endswith(".weight")) or name.endswith(".D"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("conv1d.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def perturb_llama(model, gen):
    """RMSNorm weights := 1 + N(0, 0.1) (HF inits them to exactly 1, Gemma's to 0; Qwen3's q_norm
    and k_norm included); biases (Qwen2's q, k and v) := N(0, 0.1) (HF inits them to 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def perturb_gpt2(model, gen):
    """Every bias := N(0, 0.1); LayerNorm weights := 1 + N(0, 0.1)."""
    ln_weights = {
        f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name in ln_weights:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def build(name, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    if config.model_type in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "exaone", "exaone4", "hyperclovax",
                             "granite", "gemma3_text", "gemma3"):
        perturb_llama(model, gen)
    elif config.model_type == "gpt2":
        perturb_gpt2(model, gen)
    elif config.model_type in ("mamba", "mamba2", "nemotron_h"):
        perturb_mamba(model, gen)
    model.eval()
    return model


def fixed_input_ids():
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen, dtype=torch.int64)


def describe_safetensors(path):
    from safetensors import safe_open

    lines = []
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            lines.append(f"    {k:50s} {str(sl.get_shape()):16s} {sl.get_dtype()}")
    return lines


def make(out_dir, only=None):
    from safetensors.torch import save_file

    fixtures = [
        ("tiny-llama-gqa", llama_config()),
        (
            "tiny-llama-tied",
            llama_config(
                num_key_value_heads=4,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                rms_norm_eps=1e-6,
            ),
        ),
        # Llama 3.1's rotary scaling: of head dim 8's four frequencies, one is kept, one
        # blended and two divided by the factor.
        (
            "tiny-llama3-rope",
            llama_config(
                max_position_embeddings=256,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        # Mistral without a sliding window: Llama under another name.
        ("tiny-mistral", mistral_config()),
        # Mistral 7B v0.1's sliding window on every layer.
        ("tiny-mistral-window", mistral_window_config()),
        # SmolLM3: layers without positions, windows on some of the others.
        ("tiny-smollm3", smollm3_config()),
        # EXAONE 4.0 32B: windowed layers, global ones without positions.
        ("tiny-exaone4-window", exaone4_window_config()),
        # Gemma 3: norms on both sides, q and k norms, GeGLU, a local rotary theta.
        ("tiny-gemma3", gemma3_config()),
        # Gemma 3 4B's kind: the text model of an image-text checkpoint, linear rope scaling.
        ("tiny-gemma3-image-text", gemma3_image_text_config()),
        # Qwen2: Llama with biases on q, k and v (and here a tied head).
        ("tiny-qwen2", qwen2_config()),
        # Qwen3: an RMSNorm on each q and k head, heads wider than hidden_size / heads.
        ("tiny-qwen3", qwen3_config()),
        # EXAONE 3.5: Llama under other field and tensor names.
        ("tiny-exaone", exaone_config()),
        # EXAONE 4: Qwen3's attention and norms after the mixers alone.
        ("tiny-exaone4", exaone4_config()),
        # HyperCLOVA X: norms before and after the mixers (Peri-LN), muP's multipliers.
        ("tiny-hyperclovax", hyperclovax_config()),
        # Granite: muP's multipliers, the logits divided.
        ("tiny-granite", granite_config()),
        ("tiny-gpt2", gpt2_config()),
        ("tiny-mamba", mamba_config()),
        ("tiny-mamba2", mamba2_config()),
        ("tiny-nemotron-h", nemotron_h_config()),
    ]
    if only:
        fixtures = [(name, config) for name, config in fixtures if name in only]
    input_ids = fixed_input_ids()
    os.makedirs(out_dir, exist_ok=True)
    summary = []
    for name, config in fixtures:
        model = build(name, config)
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        if config.model_type == "exaone":
            as_exaone_checkpoint(d)
        with torch.no_grad():
            out = model(input_ids=input_ids, labels=input_ids)
        logits = out.logits.detach().to(torch.float32).contiguous()
        loss = out.loss.detach().to(torch.float32).reshape(1).contiguous()
        assert logits.shape == (BATCH, SEQ, VOCAB), logits.shape
        save_file(
            {"input_ids": input_ids.contiguous(), "logits": logits, "loss": loss},
            os.path.join(d, "expected.safetensors"),
        )
        # Reload round trip: the saved checkpoint must reproduce the logits.
        from transformers import AutoModelForCausalLM

        re = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            re_logits = re(input_ids=input_ids).logits
        max_diff = (re_logits - logits).abs().max().item()
        assert max_diff == 0.0, f"{name}: reload mismatch {max_diff}"

        files = sorted(os.listdir(d))
        total = sum(os.path.getsize(os.path.join(d, f)) for f in files)
        summary.append(f"== {name}  loss={loss.item():.8f}  total={total} bytes")
        for f in files:
            summary.append(f"  {f:24s} {os.path.getsize(os.path.join(d, f)):8d} bytes")
        summary.append("  model.safetensors tensors:")
        summary.extend(describe_safetensors(os.path.join(d, "model.safetensors")))
    print("input_ids =", json.dumps(input_ids.tolist()))
    print("\n".join(summary))


def expect(dirs):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    for d in dirs:
        path = os.path.join(d, "expected.safetensors")
        input_ids = load_file(path)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(input_ids=input_ids, labels=input_ids)
        logits = out.logits.detach().to(torch.float32).contiguous()
        loss = out.loss.detach().to(torch.float32).reshape(1).contiguous()
        save_file({"input_ids": input_ids.contiguous(), "logits": logits, "loss": loss}, path)
        print(f"{d}: loss={loss.item():.8f}")


def check(argv):
    p = argparse.ArgumentParser(prog="make-hf-fixtures.py check")
    p.add_argument("ckpt_dir")
    p.add_argument("--tokens", required=True, help="JSON list of lists of token ids, or a file containing it")
    p.add_argument("--expected-loss", required=True, type=float)
    p.add_argument("--learned", help="JSON list of 0/1, one per token: whether it is learned as a target "
                   "(the others are labelled -100, as ondol's loss masks leave them out)")
    p.add_argument("--tol", type=float, default=1e-4)
    a = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    tokens = a.tokens
    if os.path.isfile(tokens):
        with open(tokens) as f:
            tokens = f.read()
    ids = torch.tensor(json.loads(tokens), dtype=torch.int64)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    model = AutoModelForCausalLM.from_pretrained(
        a.ckpt_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    labels = ids.clone()
    if a.learned:
        with open(a.learned) as f:
            learned = torch.tensor(json.load(f), dtype=torch.bool).reshape(ids.shape)
        labels[~learned] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    rel = abs(loss - a.expected_loss) / max(abs(a.expected_loss), 1e-12)
    print(f"loss={loss:.8f} expected={a.expected_loss:.8f} rel_diff={rel:.3e} tol={a.tol:.1e}")
    if rel > a.tol:
        print("FAIL: relative loss difference exceeds tolerance")
        return 1
    print("OK")
    return 0


def main():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    if len(sys.argv) > 1 and sys.argv[1] == "check":
        sys.exit(check(sys.argv[2:]))
    if len(sys.argv) > 2 and sys.argv[1] == "expect":
        sys.exit(expect(sys.argv[2:]))
    p = argparse.ArgumentParser(prog="make-hf-fixtures.py")
    p.add_argument("out_dir", nargs="?", default=DEFAULT_OUT)
    p.add_argument("--only", nargs="+", help="make these fixtures only (by directory name)")
    a = p.parse_args()
    make(a.out_dir, a.only)


if __name__ == "__main__":
    main()
