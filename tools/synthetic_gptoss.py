"""A synthetic gpt-oss checkpoint (``GptOssForCausalLM``) with MXFP4 experts, as openai/gpt-oss-20b ships.

    python -m tools.synthetic_gptoss OUT_DIR                         # 8 experts, 2 active, 2 layers
    python -m tools.synthetic_gptoss OUT_DIR --experts 32 --hidden 256 --ff 256 --layers 4

The HF layout of the published checkpoints (config.json in transformers 4 style with
``quantization_config.quant_method = "mxfp4"``, yarn rope, ``layer_types`` alternating sliding /
full attention, ``sliding_window``): per layer ``self_attn.{q,k,v,o}_proj.{weight,bias}`` and
``self_attn.sinks`` (BF16), ``mlp.router.{weight,bias}`` (BF16), ``mlp.experts.gate_up_proj_blocks``
``[X, 2 ff, hidden / 32, 16]`` + ``_scales`` ``[X, 2 ff, hidden / 32]`` (U8; gate and up rows
interleaved: gate = even rows), ``gate_up_proj_bias`` ``[X, 2 ff]``, ``down_proj_blocks`` / ``_scales``
/ ``_bias`` likewise, ``input_layernorm`` / ``post_attention_layernorm``; several shards with an index,
a layer's tensors in one shard, sorted by name as safetensors writes them. The expert weights are
seeded Gaussians encoded with ggml's MXFP4 rounding (``ggufq.quant.mxfp4``) and stored in HF's nibble
order, so blocks use the whole E2M1 range. The tokenizer is llama.cpp's Qwen2 BPE vocabulary
(gpt-oss's o200k is not in the source tree; llama.cpp's gpt-oss graph does not care which BPE).
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

from ggufq.quant.mxfp4 import encode_mxfp4
from ggufq.source_mxfp4 import dequantize, ggml_to_hf_blocks
from tools.common import f32_to_bf16_bits as _bf16_bits
from tools.synthetic_archs import write_bpe_tokenizer


def config_for(E, L, H, KV, hd, F, X, K, V, tok, window=128) -> dict:
    """gpt-oss-20b's config.json (transformers 4.55 keys) at the given sizes."""
    return {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": tok["eos"], "experts_per_token": K, "head_dim": hd, "hidden_act": "silu",
        "hidden_size": E, "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": F,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)],
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": H,
        "num_experts_per_tok": K, "num_hidden_layers": L, "num_key_value_heads": KV, "num_local_experts": X,
        "output_router_logits": False, "pad_token_id": tok.get("pad", tok["eos"]),
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"],
                                "quant_method": "mxfp4"},
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": window, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.55.0",
        "use_cache": True, "vocab_size": V}


def layer_tensors(i: int, E, H, KV, hd, F, X) -> list[tuple[str, tuple, str]]:
    """(name, shape, kind) of one layer; kind: bf16 init name, or "mxfp4" for a blocks+scales pair."""
    p = f"model.layers.{i}."
    t = [(p + "input_layernorm.weight", (E,), "norm"), (p + "post_attention_layernorm.weight", (E,), "norm"),
         (p + "mlp.router.weight", (X, E), "router"), (p + "mlp.router.bias", (X,), "bias"),
         (p + "mlp.experts.gate_up_proj", (X, 2 * F, E), "mxfp4"), (p + "mlp.experts.gate_up_proj_bias", (X, 2 * F), "bias"),
         (p + "mlp.experts.down_proj", (X, E, F), "mxfp4"), (p + "mlp.experts.down_proj_bias", (X, E), "bias"),
         (p + "self_attn.sinks", (H,), "bias"),
         (p + "self_attn.q_proj.weight", (H * hd, E), "normal"), (p + "self_attn.q_proj.bias", (H * hd,), "bias"),
         (p + "self_attn.k_proj.weight", (KV * hd, E), "normal"), (p + "self_attn.k_proj.bias", (KV * hd,), "bias"),
         (p + "self_attn.v_proj.weight", (KV * hd, E), "normal"), (p + "self_attn.v_proj.bias", (KV * hd,), "bias"),
         (p + "self_attn.o_proj.weight", (E, H * hd), "normal"), (p + "self_attn.o_proj.bias", (E,), "bias")]
    return t


def _values(shape, kind: str, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    if kind == "norm":
        return 1.0 + 0.1 * x
    if kind == "bias":
        return 0.1 * x
    if kind == "embed":
        return 0.5 * x
    fan_in = shape[-1]
    return x * np.float32((2.0 if kind == "router" else 1.0) / np.sqrt(fan_in))


def _stored(name: str, shape, kind: str, rng, bf16: bool = False) -> list[tuple[str, str, tuple, bytes]]:
    """(name, dtype, shape, bytes) as the checkpoint stores it: an MXFP4 weight is two tensors; with
    ``bf16`` the same values dequantized, in transformers' ``[expert, in, out]`` layout."""
    if kind != "mxfp4":
        return [(name, "BF16", shape, _bf16_bits(_values(shape, kind, rng)).tobytes())]
    rows = int(np.prod(shape[:-1]))
    nb = shape[-1] // 32
    raw = encode_mxfp4(_values(shape, "normal", rng).reshape(rows, shape[-1]))
    if bf16:       # MXFP4 values are exact in BF16
        w = dequantize(raw).reshape(shape).transpose(0, 2, 1)
        return [(name, "BF16", w.shape, _bf16_bits(np.ascontiguousarray(w)).tobytes())]
    blocks, scales = ggml_to_hf_blocks(raw, nb)
    return [(name + "_blocks", "U8", tuple(shape[:-1]) + (nb, 16), blocks.tobytes()),
            (name + "_scales", "U8", tuple(shape[:-1]) + (nb,), scales.tobytes())]


def make_gpt_oss(out: Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 head_dim: int = 16, ff: int = 64, experts: int = 8, active: int = 2, vocab=None, shards: int = 3,
                 seed: int = 0, window: int = 128, bf16: bool = False, tokenizer: str = "bpe", mutate=None) -> Path:
    """A synthetic gpt-oss checkpoint in ``out``; ``mutate(list of (name, dtype, shape, bytes))`` may
    break the stored tensors of one layer (bad-input tests); it is called per shard. ``bf16``: the
    experts dequantized to BF16 (as unsloth/gpt-oss-20b-BF16; no quantization_config). ``tokenizer``
    "spm": the tiny SentencePiece vocabulary (8192 tokens) instead of Qwen2's BPE (151936), for fast
    tests of ggufq alone (llama.cpp's converter wants BPE for gpt-oss)."""
    if hidden % 32 or ff % 32:
        raise ValueError("MXFP4 rows are whole blocks of 32: hidden and ff must be multiples of 32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        from tools.synthetic_moe import write_llama_spm_tokenizer
        tok = write_llama_spm_tokenizer(out)
    else:
        tok = write_bpe_tokenizer(out, "olmo2")
    V = vocab or (tok["n"] if tokenizer == "spm" else 151936)
    cfg = config_for(hidden, layers, heads, kv_heads, head_dim, ff, experts, active, V, tok, window)
    if bf16:
        del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "do_sample": False}))
    groups = [[("model.embed_tokens.weight", (V, hidden), "embed")]]
    groups += [layer_tensors(i, hidden, heads, kv_heads, head_dim, ff, experts) for i in range(layers)]
    groups.append([("model.norm.weight", (hidden,), "norm"), ("lm_head.weight", (V, hidden), "normal")])
    n = max(1, min(shards, len(groups)))
    per = -(-len(groups) // n)
    shard_groups = [sum(groups[k:k + per], []) for k in range(0, len(groups), per)]
    weight_map, total, seq = {}, 0, 0
    for si, g in enumerate(shard_groups):
        fn = "model.safetensors" if len(shard_groups) == 1 else \
            f"model-{si + 1:05d}-of-{len(shard_groups):05d}.safetensors"
        stored = []
        for name, shape, kind in g:
            stored += _stored(name, shape, kind, np.random.default_rng([seed, seq]), bf16)
            seq += 1
        stored.sort(key=lambda s: s[0])
        if mutate is not None:
            stored = mutate(stored)
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dt, shape, data in stored:
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
            off += len(data)
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(out / fn, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for name, _, _, data in stored:
                f.write(data)
                weight_map[name] = fn
        total += off
    if len(shard_groups) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "README.md").write_text(
        f"# synthetic-gpt-oss\n\nRandom weights (seed {seed}) in GptOssForCausalLM shapes ({experts} experts, "
        f"{active} active, {'BF16' if bf16 else 'MXFP4'} experts), made by `tools/synthetic_gptoss.py`. For tests and benchmarks only.\n\n"
        "license: apache-2.0\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--ff", type=int, default=64, help="one expert's FFN width (intermediate_size)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--active", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="experts dequantized to BF16 instead of MXFP4")
    a = ap.parse_args(argv)
    make_gpt_oss(a.out_dir, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
                 head_dim=a.head_dim, ff=a.ff, experts=a.experts, active=a.active, vocab=a.vocab,
                 shards=a.shards, seed=a.seed, bf16=a.bf16)
    print(a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
