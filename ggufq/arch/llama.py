"""Llama (2, 3, 3.x), Mistral and SmolLM3 -> GGUF arch ``llama`` / ``smollm3``.

llama.cpp's ``LlamaModel`` (``conversion/llama.py``): rope NORM (Q/K rows permuted
from HF's rotate-half layout to interleaved pairs, biases too), ``vocab_size`` and
``rope.dimension_count`` after ``general.file_type``, ``rope_freqs`` generated for
llama3 rope scaling. Mistral converts exactly as Llama (sliding window not written,
as llama.cpp's converter doesn't). SmolLM3 is ``LlamaModel`` with another arch name:
its rope-less layers are llama.cpp's fixed every-4th pattern, nothing is written.
"""
from __future__ import annotations

import math

import gguf
import numpy as np

from . import ArchRecord, Forward, OutTensor, register
from .torchpow import torch_pow
from .base import permute_rows  # noqa: F401  (re-exported: tests and tools use ggufq.arch.llama.permute_rows)

F32 = np.float32


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """``LlamaModel.generate_extra_tensors`` in its own precision and operation order.

    llama.cpp computes ``freqs`` as a float32 torch tensor and each factor with 0-d float32
    tensors and Python scalars: ``2 * pi / freq`` is ``freq.reciprocal() * 2pi`` (torch's
    ``__rtruediv__``), so is ``old_ctx / wavelen``; Python scalars are rounded to float32 first.
    Following that order makes the factors bit-identical (the float64 formula was 1 ulp off);
    ``base ** x`` is torch's own (SLEEF's vector pow for whole SIMD blocks, libm's powf for the
    rest: :mod:`ggufq.arch.torchpow`), as on the x86 machine the comparison runs on.
    """
    base = rope.get("rope_theta", 10000.0)
    ex = np.arange(0, head_dim, 2, dtype=F32) / F32(head_dim)
    freqs = F32(1) / torch_pow(base, ex)
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    with np.errstate(divide="ignore", over="ignore"):
        for f in freqs:
            wavelen = (F32(1) / f) * F32(2 * math.pi)
            if wavelen < F32(high_wavelen):
                out.append(F32(1))
            elif wavelen > F32(low_wavelen):
                out.append(F32(factor))
            else:
                smooth = ((F32(1) / wavelen) * F32(old_ctx) - F32(low)) / F32(high - low)
                out.append(F32(1) / ((F32(1) - smooth) / F32(factor) + smooth))
    return np.asarray(out, dtype=F32)


def rope_freqs(a) -> list[OutTensor]:
    if str(a.rope.get("rope_type", "")).lower() != "llama3":
        return []
    f = llama3_rope_factors(a.rope, a.head_dim)
    return [OutTensor("rope_freqs.weight", f.shape, lambda lo, hi, f=f: f.reshape(1, -1)[lo:hi])]


def vocab_size_and_rope_dims(a, w: gguf.GGUFWriter) -> None:
    w.add_vocab_size(a.cfg.need("vocab_size"))
    hd = a.cfg.get("head_dim")
    w.add_rope_dimension_count(hd if hd is not None else a.n_embd // a.n_head)


def llama_vocab(vocab, model_dir, a):
    """LlamaModel.set_vocab: tokenizer_config.json's add_prefix_space is copied; Granite's small
    tokenizer (vocab 49152) adds no BOS."""
    from ..vocab import read_json
    tc = read_json(model_dir / "tokenizer_config.json") or {}
    if tc.get("add_prefix_space") is not None:
        vocab.add_space_prefix = bool(tc["add_prefix_space"])
    if a.cfg.get("vocab_size", 32000) == 49152:
        vocab.extra["tokenizer.ggml.add_bos_token"] = (False, gguf.GGUFValueType.BOOL)
    return vocab


def _hd(c: dict) -> int:
    return c["hidden_size"] // c["num_attention_heads"]


def _n_head(c: dict) -> int:
    return c["num_attention_heads"]


LLAMA = register(ArchRecord(
    hf_names=("LlamaForCausalLM", "LLaMAForCausalLM"),
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    permute_qk=True,
    bias_key="attention_bias",
    # transformers' LlamaConfig always has these (llama.cpp reads the config through it)
    defaults={"head_dim": _hd, "num_key_value_heads": _n_head},
    keys_after_ftype=vocab_size_and_rope_dims,
    generated=rope_freqs,
    vocab=llama_vocab,
))

MISTRAL = register(LLAMA.derive(("MistralForCausalLM",), defaults={"head_dim": _hd, "num_key_value_heads": 8}))

SMOLLM3 = register(LLAMA.derive(
    ("SmolLM3ForCausalLM",), gguf_arch=gguf.MODEL_ARCH.SMOLLM3,
    defaults={"num_key_value_heads": 4},   # SmolLM3Config has no head_dim
    forward=Forward(no_rope_every=4),
    template_family="chatml",
))
