"""Phi-3 / Phi-4 (mini, medium) -> GGUF arch ``phi3``.

llama.cpp's ``Phi3MiniModel`` (``conversion/phi.py``): q, k, v stay fused in ``attn_qkv`` and
gate/up in ``ffn_up`` (``[2*n_ff, n_embd]``, gate first), as llama.cpp writes and loads them; NeoX
rope; its own key list (not ``TextModel``'s): ``rope.scaling.original_context_length``, the rope
dimension count from ``partial_rotary_factor``, ``attention.sliding_window`` (0 when unset, which
tells Phi-4 apart), and for LongRoPE checkpoints the ``rope_factors_long`` / ``rope_factors_short``
tensors with ``rope.scaling.attn_factor``.
"""
from __future__ import annotations

import math

import gguf
import numpy as np

from .. import GgufqError
from . import MT, ArchRecord, Forward, OutTensor, register


def _rope_dims(a) -> int:
    rot = a.rope_parameters.get("partial_rotary_factor", 1.0)
    return int(rot * a.n_embd) // a.n_head


def _orig_ctx(a) -> int:
    v = a.rope_parameters.get("original_max_position_embeddings")
    if v is None:
        raise GgufqError(f"config.json lacks original_max_position_embeddings needed for {a.hf_names[0]}")
    return v


def phi3_keys(a, w: gguf.GGUFWriter) -> None:
    c = a.cfg
    w.add_context_length(c.need("n_positions", "max_position_embeddings"))
    w.add_rope_scaling_orig_ctx_len(_orig_ctx(a))
    w.add_embedding_length(c.need("hidden_size", "n_embd"))
    w.add_feed_forward_length(c.need("intermediate_size"))
    w.add_block_count(a.n_layer)
    w.add_head_count(c.need("num_attention_heads", "n_head"))
    w.add_head_count_kv(c.need("num_key_value_heads", "n_head_kv"))
    w.add_layer_norm_rms_eps(c.need("rms_norm_eps"))
    w.add_rope_dimension_count(_rope_dims(a))
    theta = a.rope_parameters.get("full_attention", a.rope_parameters).get("rope_theta")
    if theta is None:
        raise GgufqError(f"config.json lacks rope_theta needed for {a.hf_names[0]}")
    w.add_rope_freq_base(theta)
    if longrope_scale(a) is not None:
        w.add_rope_scaling_attn_factors(longrope_scale(a))


def phi3_after_ftype(a, w: gguf.GGUFWriter) -> None:
    sw = a.cfg.get("sliding_window")
    w.add_sliding_window(0 if sw is None else sw)


def longrope_scale(a):
    """The attention factor of a LongRoPE checkpoint (None without long factors)."""
    rp = a.rope_parameters
    if not rp.get("long_factor"):
        return None
    scale = a.cfg.need("n_positions", "max_position_embeddings") / _orig_ctx(a)
    kind = str(rp.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(_orig_ctx(a))) if scale > 1.0 else 1.0
    if kind == "yarn":
        return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    raise GgufqError(f"config.json: rope type {kind or '(none)'!r} with long_factor is not supported for Phi-3")


def longrope_factors(a) -> list[OutTensor]:
    rp = a.rope_parameters
    if not rp.get("long_factor"):
        return []
    longf, shortf = rp.get("long_factor"), rp.get("short_factor")
    if shortf is None or len(longf) != len(shortf) or len(longf) != _rope_dims(a) / 2:
        raise GgufqError(f"config.json: rope long_factor/short_factor must both have {_rope_dims(a) // 2} values")
    out = []
    for mt, vals in ((MT.ROPE_FACTORS_LONG, longf), (MT.ROPE_FACTORS_SHORT, shortf)):
        f = np.asarray(vals, dtype=np.float32)
        out.append(OutTensor(gguf.TENSOR_NAMES[mt] + ".weight", f.shape, lambda lo, hi, f=f: f.reshape(1, -1)[lo:hi]))
    return out


PHI3 = register(ArchRecord(
    hf_names=("Phi3ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.PHI3,
    layer=(MT.ATTN_NORM, MT.ATTN_QKV, MT.ATTN_OUT, MT.FFN_NORM, MT.FFN_UP, MT.FFN_DOWN),
    shapes={MT.FFN_UP: ("2F", "E")},
    defaults={"num_key_value_heads": lambda c: c["num_attention_heads"], "rms_norm_eps": 1e-5,
              "original_max_position_embeddings": 4096},
    common_keys=False,
    keys=phi3_keys,
    keys_after_ftype=phi3_after_ftype,
    generated=longrope_factors,
    forward=Forward(fused_qkv=True, fused_gate_up=True),
    template_family="phi3",
))
