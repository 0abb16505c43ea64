"""OLMo 2 -> GGUF arch ``olmo2``.

llama.cpp's ``Olmo2Model`` (``conversion/olmo.py``): no norm before attention or MLP, a norm
after each (``attn_post_norm``, ``ffn_post_norm``), RMSNorm over the whole q and k projections
(``attn_q_norm`` ``[n_head*head_dim]``, ``attn_k_norm`` ``[n_head_kv*head_dim]``), NeoX rope,
``TextModel``'s keys (plus the sliding-window pattern where the config has one: OLMo 3).
"""
from __future__ import annotations

import gguf

from . import MT, ArchRecord, Forward, register


def olmo2_keys(a, w: gguf.GGUFWriter) -> None:
    c = a.cfg
    if "sliding_window" in c:
        w.add_sliding_window(c.get("sliding_window"))
        types = c.get("layer_types")
        pattern = [t == "sliding_attention" for t in types] if types else \
            [(i + 1) % 4 != 0 for i in range(a.n_layer)]
        w.add_sliding_window_pattern(pattern)


OLMO2 = register(ArchRecord(
    hf_names=("Olmo2ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.OLMO2,
    layer=(MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT, MT.ATTN_Q_NORM, MT.ATTN_K_NORM, MT.ATTN_POST_NORM,
           MT.FFN_GATE, MT.FFN_UP, MT.FFN_DOWN, MT.FFN_POST_NORM),
    bias_key="attention_bias",
    shapes={MT.ATTN_Q_NORM: ("q",), MT.ATTN_K_NORM: ("kv",)},
    defaults={"num_key_value_heads": lambda c: c["num_attention_heads"]},
    keys=olmo2_keys,
    forward=Forward(qk_norm="full", pre_norm=False, post_norm=True),
))
