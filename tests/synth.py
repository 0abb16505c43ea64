"""Small synthetic Hugging Face folders for tests (random weights, the tiny model's tokenizer)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from conftest import TINY
from ggufq_ref.st_writer import write_safetensors


def make_model(d: Path, arch: str = "LlamaForCausalLM", hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, ff: int = 128, vocab: int = 8192, dtype: str = "BF16", tied: bool = False,
               bias: bool = False, rope: Optional[dict] = None, shards: int = 1, seed: int = 0,
               extra_config: Optional[dict] = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)) * 0.5}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden)
        t[p + "self_attn.q_proj.weight"] = rng.standard_normal((heads * hd, hidden)) / np.sqrt(hidden)
        t[p + "self_attn.k_proj.weight"] = rng.standard_normal((kv_heads * hd, hidden)) / np.sqrt(hidden)
        t[p + "self_attn.v_proj.weight"] = rng.standard_normal((kv_heads * hd, hidden)) / np.sqrt(hidden)
        t[p + "self_attn.o_proj.weight"] = rng.standard_normal((hidden, heads * hd)) / np.sqrt(hidden)
        if bias:
            t[p + "self_attn.q_proj.bias"] = 0.1 * rng.standard_normal(heads * hd)
            t[p + "self_attn.k_proj.bias"] = 0.1 * rng.standard_normal(kv_heads * hd)
            t[p + "self_attn.v_proj.bias"] = 0.1 * rng.standard_normal(kv_heads * hd)
        t[p + "mlp.gate_proj.weight"] = rng.standard_normal((ff, hidden)) / np.sqrt(hidden)
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((ff, hidden)) / np.sqrt(hidden)
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, ff)) / np.sqrt(ff)
    t["model.norm.weight"] = 1 + 0.1 * rng.standard_normal(hidden)
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((vocab, hidden)) / np.sqrt(hidden)
    names = list(t)
    if shards == 1:
        write_safetensors(d / "model.safetensors", {n: (t[n], dtype) for n in names})
    else:
        parts = np.array_split(np.arange(len(names)), shards)
        wm = {}
        for k, idx in enumerate(parts):
            fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(d / fn, {names[i]: (t[names[i]], dtype) for i in idx})
            wm.update({names[i]: fn for i in idx})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = {
        "architectures": [arch], "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": ff,
        "vocab_size": vocab, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
        "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                       "Qwen2ForCausalLM": "qwen2"}.get(arch, "llama"),
    }
    if rope:
        cfg["rope_scaling"] = rope
    cfg["rope_theta"] = 10000.0
    cfg.update(extra_config or {})
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY / f, d / f)
    return d
