"""Qwen2 and Qwen3 -> GGUF arch ``qwen2`` / ``qwen3``.

llama.cpp's ``Qwen2Model`` / ``Qwen3Model`` (``conversion/qwen.py``): NeoX rope (no Q/K
permutation), only ``TextModel``'s keys. Qwen2 always has q/k/v biases; Qwen3 drops them
(unless ``attention_bias``) and adds a per-head RMSNorm on q and k (``attn_q_norm`` /
``attn_k_norm``, ``[head_dim]``), and its config class always has ``head_dim`` (128 by default).
"""
from __future__ import annotations

import gguf

from . import LLAMA_LAYER, MT, ArchRecord, Forward, register

QWEN2 = register(ArchRecord(
    hf_names=("Qwen2ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.QWEN2,
    biases=(MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V),
    defaults={"num_key_value_heads": lambda c: c["num_attention_heads"]},
    template_family="chatml",
))

QWEN3 = register(QWEN2.derive(
    ("Qwen3ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.QWEN3,
    layer=LLAMA_LAYER + (MT.ATTN_Q_NORM, MT.ATTN_K_NORM),
    biases=(),
    bias_key="attention_bias",
    bias_tensors=(MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT),
    defaults={"head_dim": 128, "num_key_value_heads": lambda c: c["num_attention_heads"]},
    forward=Forward(qk_norm="head"),
    template_family="qwen3",
))
