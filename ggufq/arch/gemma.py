"""Gemma 2 and Gemma 3 (text) -> GGUF arch ``gemma2`` / ``gemma3``.

llama.cpp's ``Gemma3Model`` (``conversion/gemma.py``): norms stored as ``1 + w`` (Gemma's RMSNorm
computes ``x * (1 + w)``; the sum is taken in the checkpoint's dtype), per-head q/k norms, pre- and
post-norms around attention and MLP, tied output, NeoX rope with a local base for sliding layers
(``rope.freq_base_swa``), and a few keys rewritten after the common ones with Gemma3TextConfig's
defaults. The vocabulary is SentencePiece without a space prefix.

Gemma 2 (``Gemma2Model``): the same tensors without q/k norms, ``lm_head`` skipped (tied output), every
key written by the class itself (no rope keys: llama.cpp's default base), with attention and final logit
soft-capping and the sliding window (every other layer, llama.cpp's ``swa_pattern`` 2).
"""
from __future__ import annotations

import gguf

from . import MT, ArchRecord, Forward, register


def gemma3_keys(a, w: gguf.GGUFWriter) -> None:
    c = a.cfg
    w.add_context_length(c.get("max_position_embeddings", 131072))
    w.add_head_count(c.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    w.add_key_length(c.get("head_dim", 256))
    w.add_value_length(c.get("head_dim", 256))
    w.add_rope_freq_base(a.rope_parameters.get("full_attention", a.rope_parameters).get("rope_theta", 1_000_000.0))
    if c.get("attn_logit_softcapping") is not None:
        from .. import GgufqError
        raise GgufqError("config.json: Gemma 3 has no attn_logit_softcapping (llama.cpp's converter refuses it)")
    if cap := c.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cap)
    if c.get("sliding_window_pattern") != 1:
        w.add_sliding_window(c.need("sliding_window"))
    w.add_head_count_kv(c.get("num_key_value_heads", 4))


def no_space_prefix(vocab, model_dir, a):
    if vocab.model == "llama":
        vocab.add_space_prefix = False
    return vocab


def gemma2_keys(a, w: gguf.GGUFWriter) -> None:
    c = a.cfg
    w.add_context_length(c.need("max_position_embeddings"))
    w.add_embedding_length(a.n_embd)
    w.add_block_count(a.n_layer)
    w.add_feed_forward_length(a.n_ff)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_head_kv)
    w.add_layer_norm_rms_eps(c.need("rms_norm_eps"))
    w.add_key_length(c.need("head_dim"))
    w.add_value_length(c.need("head_dim"))
    w.add_attn_logit_softcapping(c.need("attn_logit_softcapping"))
    w.add_final_logit_softcapping(c.need("final_logit_softcapping"))
    w.add_sliding_window(c.need("sliding_window"))


GEMMA2 = register(ArchRecord(
    hf_names=("Gemma2ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.GEMMA2,
    layer=(MT.ATTN_NORM, MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT, MT.ATTN_POST_NORM,
           MT.FFN_NORM, MT.FFN_GATE, MT.FFN_UP, MT.FFN_DOWN, MT.FFN_POST_NORM),
    bias_key="attention_bias",
    norm_offset=1.0,
    skip_tensors=("lm_head.weight",),
    # Gemma2Config's defaults (transformers), for keys a config.json may leave out
    defaults={"head_dim": 256, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "sliding_window": 4096,
              "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
              "max_position_embeddings": 8192},
    common_keys=False,
    keys=gemma2_keys,
    vocab=no_space_prefix,
    forward=Forward(act="gelu_tanh", norm_offset=1.0, post_norm=True, embed_scale="sqrt_embd",
                    attn_scale="query_pre_attn_scalar", attn_softcap="attn_logit_softcapping",
                    final_softcap="final_logit_softcapping"),
    template_family="gemma",
))

GEMMA3 = register(ArchRecord(
    hf_names=("Gemma3ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.GEMMA3,
    layer=(MT.ATTN_NORM, MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT, MT.ATTN_Q_NORM, MT.ATTN_K_NORM,
           MT.ATTN_POST_NORM, MT.FFN_NORM, MT.FFN_GATE, MT.FFN_UP, MT.FFN_DOWN, MT.FFN_POST_NORM),
    bias_key="attention_bias",
    norm_offset=1.0,
    vocab_rows_from_tokenizer=True,
    defaults={"head_dim": 256, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "sliding_window": 4096,
              "query_pre_attn_scalar": 256},
    keys=gemma3_keys,
    vocab=no_space_prefix,
    forward=Forward(act="gelu_tanh", norm_offset=1.0, qk_norm="head", post_norm=True,
                    embed_scale="sqrt_embd", attn_scale="query_pre_attn_scalar",
                    final_softcap="final_logit_softcapping"),
    template_family="gemma",
))
