#!/usr/bin/env python3
"""Writes a Hugging Face model folder with the exact `config.json`, tensor names and shapes of
a real MoE checkpoint and random bf16 weights, to measure loading, memory and speed at real
size without the hub (no network here). Standard library only.

    python3 bench/shaped_folder.py olmoe-1b-7b /tmp/olmoe      # 13.8 GB, 6.92 B parameters
    python3 bench/shaped_folder.py qwen1.5-moe-a2.7b /tmp/qwen  # 28.6 GB, 14.3 B parameters

The weights are N(0, ~0.02)-sized bf16 values with random signs and mantissas (one random
64 MiB pattern, repeated: the values do not matter for memory or speed). The tokenizer is the
committed OLMoE fixture's (its ids fit any vocabulary).
"""

import json
import os
import pathlib
import shutil
import struct
import sys

HERE = pathlib.Path(__file__).resolve().parent
SHARD_BYTES = 4 << 30

CONFIGS = {
    # allenai/OLMoE-1B-7B-0924, config.json as published.
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "clip_qkv": None,
        "eos_token_id": 50279,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 1024,
        "max_position_embeddings": 4096,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 16,
        "num_key_value_heads": 16,
        "output_router_logits": False,
        "pad_token_id": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 50304,
    },
    # Qwen/Qwen1.5-MoE-A2.7B, config.json as published.
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "moe_intermediate_size": 1408,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
}


def tensors(c):
    """(name, shape) of every tensor of config `c`, in the architecture's names."""
    d, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    head = d // c["num_attention_heads"]
    kv = head * c["num_key_value_heads"]
    qwen = c["model_type"] == "qwen2_moe"
    h = c["moe_intermediate_size"] if qwen else c["intermediate_size"]
    out = [("model.embed_tokens.weight", [vocab, d])]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", [d]), (f"{p}.post_attention_layernorm.weight", [d])]
        for name, rows in [("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)]:
            out.append((f"{p}.self_attn.{name}.weight", [rows, d]))
            if qwen and name != "o_proj":
                out.append((f"{p}.self_attn.{name}.bias", [rows]))
        if not qwen:
            out += [(f"{p}.self_attn.q_norm.weight", [d]), (f"{p}.self_attn.k_norm.weight", [kv])]
        out.append((f"{p}.mlp.gate.weight", [c["num_experts"], d]))
        for j in range(c["num_experts"]):
            out += [
                (f"{p}.mlp.experts.{j}.gate_proj.weight", [h, d]),
                (f"{p}.mlp.experts.{j}.up_proj.weight", [h, d]),
                (f"{p}.mlp.experts.{j}.down_proj.weight", [d, h]),
            ]
        if qwen:
            s = c["shared_expert_intermediate_size"]
            out += [
                (f"{p}.mlp.shared_expert.gate_proj.weight", [s, d]),
                (f"{p}.mlp.shared_expert.up_proj.weight", [s, d]),
                (f"{p}.mlp.shared_expert.down_proj.weight", [d, s]),
                (f"{p}.mlp.shared_expert_gate.weight", [1, d]),
            ]
    out += [("model.norm.weight", [d]), ("lm_head.weight", [vocab, d])]
    return out


def pattern():
    """64 MiB of bf16 values of magnitude 2^-7..2^-5 with random signs and mantissas."""
    raw = bytearray(os.urandom(64 << 20))
    # High byte: sign from the random bit 0, exponent 0x79..0x7A (with the low mantissa byte's
    # top bit): values in [2^-7, 2^-5).
    table = bytes((0x3C | ((b & 1) << 7)) for b in range(256))
    raw[1::2] = raw[1::2].translate(table)
    return bytes(raw)


def norm_bytes(n):
    """`n` bf16 ones (norm gains)."""
    return struct.pack("<H", 0x3F80) * n


def write_shard(path, items, fill):
    header, offset = {}, 0
    for name, shape in items:
        size = 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in items:
            count = 1
            for dim in shape:
                count *= dim
            if len(shape) == 1 and "norm" in name:
                f.write(norm_bytes(count))
                continue
            left = 2 * count
            while left:
                chunk = fill[: min(left, len(fill))]
                f.write(chunk)
                left -= len(chunk)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in CONFIGS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(CONFIGS)}}} OUT_DIR")
    config, out = CONFIGS[sys.argv[1]], pathlib.Path(sys.argv[2])
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    items = tensors(config)
    shards, current, size = [], [], 0
    for name, shape in items:
        bytes_ = 2
        for dim in shape:
            bytes_ *= dim
        if current and size + bytes_ > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += bytes_
    shards.append(current)
    fill, weight_map, total = pattern(), {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / file, shard, fill)
        for name, shape in shard:
            weight_map[name] = file
            n = 1
            for dim in shape:
                n *= dim
            total += n
        print(f"{file}: {len(shard)} tensors", file=sys.stderr)
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(HERE.parent / "tests/fixtures/hf/olmoe/tokenizer.json", out / "tokenizer.json")
    print(f"{out}: {total / 1e9:.2f} B parameters, {2 * total / 1e9:.1f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
