#!/usr/bin/env python3
"""ondol's conversations against transformers': the same tokens and the same learned tokens.
Also its prompt-completion pairs against TRL's tokenization of a pair (the whole text encoded as
transformers encodes it, the prompt's tokens not learned).

For chat templates in the layouts of ChatML (Qwen2.5), Llama 3 and Gemma 3, each marking the
assistant's turns with transformers' {% generation %} tags, `ondol data prepare
--messages-field` writes shards and loss masks, and transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` tokenizes the same conversations: every conversation's
tokens and learned tokens must agree exactly. The tokenizer is trained by `ondol tokenizer
train` on the sample text, with the templates' special tokens.

Needs a Python with transformers (torch not required): python3 scripts/check-chat-templates.py
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONDOL = os.path.join(ROOT, "target", "release", "ondol")

CHATML = """{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{ message.content + '<|im_end|>' + '\\n' }}{% endgeneration %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Cutting Knowledge Date: December 2023" %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

GEMMA3 = """{%- macro text_of(message) -%}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = text_of(messages[0]) + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if role == 'model' -%}
        {% generation %}{{ text_of(message) + '<end_of_turn>\\n' }}{% endgeneration %}
    {%- else -%}
        {{ text_of(message) + '<end_of_turn>\\n' }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}"""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
TEMPLATES = {"chatml": (CHATML, {}), "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>"}),
             "gemma3": (GEMMA3, {"bos_token": "<bos>"})}


def conversations(texts):
    """Multi-turn conversations over paragraphs of the sample text (English and Korean),
    some with a system message, some contents with spaces around them or as a list of parts."""
    paras = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 30]
    out = []
    for i in range(0, len(paras) - 3, 4):
        a, b, c, d = paras[i:i + 4]
        messages = [{"role": "user", "content": a[:80] + "?"}, {"role": "assistant", "content": " " + b + " "},
                    {"role": "user", "content": c[:60]}, {"role": "assistant", "content": d}]
        if i % 8 == 0:
            messages.insert(0, {"role": "system", "content": "Answer in full."})
        out.append(messages)
    return out


def read_shard(path):
    data = open(path, "rb").read()
    magic, version, n = struct.unpack("<3i", data[:12])
    assert magic == 20240520, path
    width = 2 if version == 1 else 4
    return list(struct.unpack(f"<{n}{'H' if width == 2 else 'I'}", data[1024:1024 + n * width]))


def read_mask(path, n):
    data = open(path, "rb").read()
    assert struct.unpack("<3i", data[:12]) == (20261208, 1, n), path
    bits = data[1024:]
    return [bool(bits[i // 8] >> (i % 8) & 1) for i in range(n)]


def main():
    from transformers import PreTrainedTokenizerFast

    work = tempfile.mkdtemp()
    texts = [open(os.path.join(ROOT, "data/sample", f), encoding="utf-8").read()
             for f in ["en-web-john.txt", "ko-constitution.txt"]]
    corpus = os.path.join(work, "corpus.txt")
    open(corpus, "w", encoding="utf-8").write("\n\n".join(texts))
    tok = os.path.join(work, "tokenizer.json")
    subprocess.run([ONDOL, "tokenizer", "train", "--input", corpus, "--vocab-size", "1000", "--out", tok,
                    "--special-tokens", ",".join(SPECIALS)], check=True, capture_output=True)
    convs = conversations(texts)
    failures = 0
    for name, (template, specials) in TEMPLATES.items():
        d = os.path.join(work, name)
        os.makedirs(d)
        os.link(tok, os.path.join(d, "tokenizer.json"))
        config = {"chat_template": template, "eos_token": "<|endoftext|>", **specials}
        json.dump(config, open(os.path.join(d, "tokenizer_config.json"), "w"))
        rows = os.path.join(d, "chats.jsonl")
        with open(rows, "w", encoding="utf-8") as f:
            for m in convs:
                if name == "gemma3" and m[1]["role"] == "assistant":  # a list of parts, as Gemma's take
                    m = [m[0], {"role": "assistant", "content": [{"type": "text", "text": m[1]["content"]}]}, *m[2:]]
                f.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
        r = subprocess.run([ONDOL, "data", "prepare", "--input", rows, "--tokenizer", os.path.join(d, "tokenizer.json"),
                            "--out", os.path.join(d, "shards"), "--messages-field", "messages", "--val-fraction", "0",
                            "--no-exact-dedup", "--no-near-dedup"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAIL {name}: ondol data prepare: {r.stderr.strip()}")
            failures += 1
            continue
        tokens = read_shard(os.path.join(d, "shards", "train_000000.bin"))
        learned = read_mask(os.path.join(d, "shards", "train_000000.mask"), len(tokens))
        hf = PreTrainedTokenizerFast(tokenizer_file=tok, chat_template=template, **specials)
        eot = hf.convert_tokens_to_ids("<|endoftext|>")
        starts = [i for i, t in enumerate(tokens) if t == eot] + [len(tokens)]
        docs = [(tokens[a + 1:b], learned[a + 1:b]) for a, b in zip(starts, starts[1:])]
        assert len(docs) == len(convs), (name, len(docs), len(convs))
        worst = 0
        for k, ((ids, mask), m) in enumerate(zip(docs, convs)):
            if name == "gemma3" and m[1]["role"] == "assistant":
                m = [m[0], {"role": "assistant", "content": [{"type": "text", "text": m[1]["content"]}]}, *m[2:]]
            out = hf.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            want_ids, want_mask = out["input_ids"], [bool(x) for x in out["assistant_masks"]]
            if ids != want_ids or mask != want_mask:
                worst += 1
                if worst == 1:
                    at = next((i for i, (a, b) in enumerate(zip(ids, want_ids)) if a != b), None)
                    print(f"  {name} conversation {k}: tokens {'equal' if ids == want_ids else f'differ at {at}'}, "
                          f"learned {sum(mask)} vs {sum(want_mask)}")
        learned_total = sum(sum(mask) for _, mask in docs)
        status = "ok  " if worst == 0 else "FAIL"
        print(f"{status} {name}: {len(docs)} conversations, {len(tokens)} tokens, {learned_total} learned; "
              f"{worst} differ from transformers")
        failures += worst > 0
    failures += check_pairs(work, tok, convs)
    sys.exit(1 if failures else 0)


def check_pairs(work, tok, convs):
    """Pairs from the conversations' first exchange: ondol's tokens and learned tokens against
    TRL's (prompt + completion encoded whole; the first len(encode(prompt)) tokens are the
    prompt's)."""
    from transformers import PreTrainedTokenizerFast

    d = os.path.join(work, "pairs")
    os.makedirs(d)
    pairs = [(m[-4]["content"] + "\n", m[-3]["content"].strip()) for m in convs]
    rows = os.path.join(d, "pairs.jsonl")
    with open(rows, "w", encoding="utf-8") as f:
        for p, c in pairs:
            f.write(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n")
    subprocess.run([ONDOL, "data", "prepare", "--input", rows, "--tokenizer", tok, "--out", os.path.join(d, "shards"),
                    "--text-field", "prompt", "--completion-field", "completion", "--val-fraction", "0",
                    "--no-exact-dedup", "--no-near-dedup"], check=True, capture_output=True)
    tokens = read_shard(os.path.join(d, "shards", "train_000000.bin"))
    learned = read_mask(os.path.join(d, "shards", "train_000000.mask"), len(tokens))
    hf = PreTrainedTokenizerFast(tokenizer_file=tok)
    eot = hf.convert_tokens_to_ids("<|endoftext|>")
    starts = [i for i, t in enumerate(tokens) if t == eot] + [len(tokens)]
    differ = 0
    for (a, b), (p, c) in zip(zip(starts, starts[1:]), pairs):
        want = hf(p + c)["input_ids"]
        n = len(hf(p)["input_ids"])
        if tokens[a + 1:b] != want or learned[a + 1:b] != [i >= n for i in range(len(want))]:
            differ += 1
    print(f"{'ok  ' if differ == 0 else 'FAIL'} pairs: {len(pairs)} pairs, {len(tokens)} tokens, {sum(learned)} learned; "
          f"{differ} differ from TRL's tokenization")
    return differ > 0


if __name__ == "__main__":
    main()
