"""Qwen2 -> GGUF arch ``qwen2``: Llama's tensors plus q/k/v biases, NeoX rope (no Q/K permutation)."""
from __future__ import annotations

import gguf

from . import register
from .llama import Llama


@register("Qwen2ForCausalLM")
class Qwen2(Llama):
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    permute_qk = False
    writes_vocab_size = False   # llama.cpp's Qwen2Model writes only TextModel's keys
    always_head_dim = False     # transformers' Qwen2Config has no head_dim

    def layer_biases(self, p, b, q_rows, kv_rows, pq, pk):
        return [
            (p + "self_attn.q_proj.bias", b + "attn_q.bias", (q_rows,), None),
            (p + "self_attn.k_proj.bias", b + "attn_k.bias", (kv_rows,), None),
            (p + "self_attn.v_proj.bias", b + "attn_v.bias", (kv_rows,), None),
        ]
