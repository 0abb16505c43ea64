"""gpt-oss (``GptOssForCausalLM``): llama.cpp's ``GptOssModel`` (``conversion/gpt_oss.py``), arch ``gpt-oss``.

A pre-norm decoder with q/k/v/o biases, one learned attention-sink logit per head
(``self_attn.sinks`` -> ``attn_sinks.weight``), ``post_attention_layernorm`` as
``post_attention_norm``, a biased router ``mlp.router`` -> ``ffn_gate_inp`` and fused experts:
``mlp.experts.gate_up_proj`` holds gate (even rows) and up (odd rows) interleaved, with
``gate_up_proj_bias`` interleaved the same way on its last axis; ``down_proj`` / ``down_proj_bias``.

The published checkpoints store the expert matrices as MXFP4 (:mod:`ggufq.source_mxfp4`:
``*_blocks`` + ``*_scales``, already ``[expert, out, in]``); llama.cpp's converter copies their blocks
into ``MXFP4`` tensors whatever ``--outtype`` asks (``repack_mxfp4``), and says ``general.file_type``
``MOSTLY_MXFP4_MOE`` for F32/F16/BF16. Here the same tensors carry ``native = MXFP4``: the plan keeps
them for F32/F16/BF16/Q8_0 and MXFP4_MOE, and the writer copies their bytes; another --type dequantizes
and quantizes them again. A dequantized (BF16) checkpoint stores ``gate_up_proj`` ``[expert, embd,
2 ff]`` and ``down_proj`` ``[expert, ff, embd]`` (transformers' ``x @ W`` layout), transposed by
llama.cpp; :class:`Transposed` reads one expert's matrix per chunk to do the same.

Keys beyond ``TextModel``'s: ``sliding_window`` and ``expert_feed_forward_length`` =
``intermediate_size``; yarn rope from ``rope_scaling``. llama.cpp's graph alternates sliding and full
attention itself (``swa_pattern`` 2), so ``layer_types`` is not written, as there.
"""
from __future__ import annotations

import gguf
import numpy as np

from .. import GgufqError
from . import MT, ArchRecord, Moe, register
from .moe import ExpertRows

LAYER = (MT.ATTN_NORM, MT.ATTN_POST_NORM, MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT, MT.ATTN_SINKS,
         MT.FFN_GATE_INP, MT.FFN_GATE_EXP, MT.FFN_UP_EXP, MT.FFN_DOWN_EXP)


class Interleaved(ExpertRows):
    """Every other row of a ``[n_expert, 2 ff, cols]`` source, from ``half`` (0: gate, 1: up), as a
    ``[n_expert, ff, cols]`` source; for an MXFP4 source also its block bytes (``raw``)."""

    def __init__(self, src, half: int):
        if len(src.shape) != 3 or src.shape[1] % 2:
            raise GgufqError(f"tensor {src.name} has shape {list(src.shape)}; gpt-oss's gate_up_proj is "
                             f"[n_expert, 2 * ff, embd] (gate and up rows interleaved)")
        self.name, self.src, self.half, self.dtype = src.name, src, half, src.dtype
        self.per = src.shape[1] // 2
        self.shape = (src.shape[0], self.per, src.shape[2])
        self.native = getattr(src, "native", None)

    def _every_other(self, read, e: int, a: int, b: int) -> np.ndarray:
        # source rows 2a+half .. 2(b-1)+half of expert e: read the span, keep every other row
        base = e * 2 * self.per
        return read(base + 2 * a + self.half, base + 2 * (b - 1) + self.half + 1)[::2]

    def _expert_rows(self, e: int, a: int, b: int) -> np.ndarray:
        return self._every_other(self.src.rows, e, a, b)

    def raw(self, lo: int, hi: int) -> np.ndarray:
        return self._gather(lambda e, a, b: self._every_other(self.src.raw, e, a, b), lo, hi,
                            self.row_len // 32 * 17, np.uint8)


class Transposed(ExpertRows):
    """A dequantized checkpoint's ``[n_expert, cols, rows * step]`` expert matrix as the
    ``[n_expert, rows, cols]`` source llama.cpp writes (``transpose(-1, -2)``, then every ``step``-th
    row from ``start``: gate/up of an interleaved gate_up). One expert's matrix is read per chunk."""

    def __init__(self, src, step: int = 1, start: int = 0):
        if len(src.shape) != 3 or src.shape[2] % step:
            raise GgufqError(f"tensor {src.name} has shape {list(src.shape)}; expected [n_expert, in, out]")
        self.name, self.src, self.dtype, self.step, self.start = src.name, src, src.dtype, step, start
        self.per = src.shape[2] // step
        self.shape = (src.shape[0], self.per, src.shape[1])
        self.native = None

    def _expert_rows(self, e: int, a: int, b: int) -> np.ndarray:
        cols = self.src.shape[1]
        m = self.src.rows(e * cols, (e + 1) * cols)                 # [in, out * step] of expert e
        return m[:, self.start + a * self.step:self.start + b * self.step:self.step].T


class BiasHalf:
    """Every other column of a ``[n_expert, 2 ff]`` bias, from ``half``: ``[n_expert, ff]``."""

    def __init__(self, src, half: int):
        if len(src.shape) != 2 or src.shape[1] % 2:
            raise GgufqError(f"tensor {src.name} has shape {list(src.shape)}; gpt-oss's gate_up_proj_bias is "
                             f"[n_expert, 2 * ff]")
        self.name, self.src, self.half, self.dtype = src.name, src, half, src.dtype
        self.shape = (src.shape[0], src.shape[1] // 2)
        self.native = None

    @property
    def row_len(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return np.ascontiguousarray(self.src.rows(lo, hi)[:, self.half::2])


def expert_sources(a, tensors: dict) -> dict:
    """GptOssModel.modify_tensors / generate_extra_tensors as renamings: the fused expert tensors
    split into the ``gate_proj`` / ``up_proj`` / ``down_proj`` (``.weight``, ``.bias``) names
    gguf-py maps to ``ffn_{gate,up,down}_exps``."""
    out: dict = {}
    for hf, t in tensors.items():
        pre, _, leaf = hf.rpartition(".experts.")
        if not pre:
            out[hf] = t
            continue
        pre += ".experts"
        mx = getattr(t, "native", None) is not None
        if leaf == "gate_up_proj":
            if mx:
                out[f"{pre}.gate_proj.weight"], out[f"{pre}.up_proj.weight"] = Interleaved(t, 0), Interleaved(t, 1)
            else:
                out[f"{pre}.gate_proj.weight"] = Transposed(t, 2, 0)
                out[f"{pre}.up_proj.weight"] = Transposed(t, 2, 1)
        elif leaf == "gate_up_proj_bias":
            out[f"{pre}.gate_proj.bias"], out[f"{pre}.up_proj.bias"] = BiasHalf(t, 0), BiasHalf(t, 1)
        elif leaf == "down_proj":
            out[f"{pre}.down_proj.weight"] = t if mx else Transposed(t)
        elif leaf == "down_proj_bias":
            out[f"{pre}.down_proj.bias"] = t
        else:
            raise GgufqError(f"{a.name}: no GGUF name for tensor {hf}")
    return out


def gpt_oss_keys(a, w: gguf.GGUFWriter) -> None:
    """GptOssModel.set_gguf_parameters' additions."""
    w.add_sliding_window(a.cfg.need("sliding_window"))
    w.add_expert_feed_forward_length(a.cfg.need("intermediate_size"))


GPT_OSS = register(ArchRecord(
    ("GptOssForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.GPT_OSS,
    layer=LAYER,
    biases=(MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT, MT.FFN_GATE_INP, MT.FFN_GATE_EXP, MT.FFN_UP_EXP,
            MT.FFN_DOWN_EXP),
    keys=gpt_oss_keys,
    moe=Moe(renorm="always", gate_up="interleaved"),   # softmax over the top-k router logits
))
