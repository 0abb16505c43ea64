"""Granite (3.x) -> GGUF arch ``granite``.

llama.cpp's ``GraniteModel`` (``conversion/granite.py``): Llama (Q/K permuted, ``vocab_size`` and
``rope.dimension_count`` after the file type) with ``head_dim`` ignored and four multipliers
written as GGUF scales: ``attention_multiplier`` -> ``attention.scale``, ``embedding_multiplier``
-> ``embedding_scale``, ``residual_multiplier`` -> ``residual_scale``, ``logits_scaling`` ->
``logit_scale`` (each only when set and non-zero).
"""
from __future__ import annotations

import gguf

from . import Forward, register
from .llama import LLAMA


def granite_keys(a, w: gguf.GGUFWriter) -> None:
    c = a.cfg
    for key, add in (("attention_multiplier", w.add_attention_scale), ("embedding_multiplier", w.add_embedding_scale),
                     ("residual_multiplier", w.add_residual_scale), ("logits_scaling", w.add_logit_scale)):
        if v := c.get(key):
            add(v)


GRANITE = register(LLAMA.derive(
    ("GraniteForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.GRANITE,
    drop_keys=("head_dim",),
    defaults={"num_key_value_heads": lambda c: c["num_attention_heads"]},
    keys=granite_keys,
    forward=Forward(embed_scale="embedding_multiplier", attn_scale="attention_multiplier",
                    residual_scale="residual_multiplier", logit_scale="logits_scaling"),
))
