"""Mixture-of-experts architectures: Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE.

llama.cpp's converter (``Qwen2MoeModel`` / ``Qwen3MoeModel`` / ``OlmoeModel`` in
``conversion/qwen.py`` / ``olmo.py``, Mixtral in ``LlamaModel``) collects a layer's
per-expert HF tensors ``*.experts.{i}.{gate,up,down}_proj.weight`` (Mixtral:
``block_sparse_moe.experts.{i}.w1/w3/w2``) and ``torch.stack``s them into one
``[n_expert, rows, cols]`` tensor, written as ``blk.N.ffn_{gate,up,down}_exps``; the router
(``mlp.gate`` / ``block_sparse_moe.gate``) is ``ffn_gate_inp`` (kept F32), a shared expert is
``ffn_*_shexp`` with its sigmoid gate ``ffn_gate_inp_shexp``.

Here a stacked tensor is never held: :class:`StackedSource` answers ``rows(lo, hi)`` over the
``[n_expert * rows, cols]`` view by reading only the experts (and, inside each, only the
rows) that range covers, so memory holds one row chunk whatever the expert count, and the
writer's worker processes read their own chunks as for any tensor. transformers 5's fused
layout (``mlp.experts.gate_up_proj`` ``[n_expert, 2 ff, embd]`` and 3-D ``down_proj``) is
read the same way (:class:`ExpertHalf`), as llama.cpp's ``Qwen2MoeModel`` splits it.

Checked before anything is read (one :class:`~ggufq.GgufqError` line each): every expert
``0 .. n_expert-1`` of every stacked tensor present, no expert index past ``n_expert``, all
experts of one tensor of one shape, ``num_experts_per_tok`` within ``1 .. n_expert``, and no
dense layers among the sparse ones (``mlp_only_layers`` / ``decoder_sparse_step``, which
llama.cpp's qwen2moe/qwen3moe graphs do not build either).
"""
from __future__ import annotations

import re
from typing import Optional

import gguf
import numpy as np

from .. import GgufqError
from . import LLAMA_LAYER, MT, Forward, Moe, register
from .llama import LLAMA
from .qwen import QWEN2, QWEN3

_EXPERT = re.compile(r"^(?P<pre>.*\.experts)\.(?P<xid>\d+)\.(?P<post>.+)$")
_FUSED_GATE_UP = re.compile(r"^(?P<pre>.*\.experts)\.gate_up_proj(?:\.weight)?$")
_FUSED_DOWN = re.compile(r"^(?P<pre>.*\.experts)\.down_proj$")   # 3-D, no .weight suffix

MOE_FFN = (MT.FFN_NORM, MT.FFN_GATE_INP, MT.FFN_GATE_EXP, MT.FFN_UP_EXP, MT.FFN_DOWN_EXP)
ATTN = (MT.ATTN_NORM, MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT)
SHARED = (MT.FFN_GATE_INP_SHEXP, MT.FFN_GATE_SHEXP, MT.FFN_UP_SHEXP, MT.FFN_DOWN_SHEXP)


class ExpertRows:
    """A ``[n_expert, per, cols]`` source read expert by expert (the duck type of
    :class:`ggufq.source.SourceTensor` that ``TextArch`` reads). A subclass sets ``shape`` and
    ``per`` and gives ``_expert_rows(e, a, b)``: rows ``[a, b)`` of expert ``e``, float32."""
    shape: tuple
    per: int

    @property
    def row_len(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.shape[0] * self.per

    def _expert_rows(self, e: int, a: int, b: int) -> np.ndarray:
        raise NotImplementedError

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` of the ``[n_expert * per, cols]`` view: expert ``e`` holds rows
        ``[e * per, (e + 1) * per)``; only those experts are read, only those rows of each."""
        return self._gather(self._expert_rows, lo, hi, self.row_len, np.float32)

    def _gather(self, fetch, lo: int, hi: int, width: int, dtype) -> np.ndarray:
        """Rows ``[lo, hi)`` of the 2-D view, ``width`` values of ``dtype`` each, from ``fetch(e, a, b)``
        (rows ``[a, b)`` of expert ``e``), expert by expert."""
        lo, hi = max(0, lo), min(hi, self.n_rows)
        out = np.empty((hi - lo, width), dtype=dtype)
        pos = lo
        while pos < hi:
            e = pos // self.per
            a = pos - e * self.per
            b = min(self.per, hi - e * self.per)
            out[pos - lo:pos - lo + b - a] = fetch(e, a, b)
            pos += b - a
        return out


class StackedSource(ExpertRows):
    """``n_expert`` tensors of one shape ``[rows, cols]`` as one ``[n_expert, rows, cols]``
    source (the duck type of :class:`ggufq.source.SourceTensor` that ``TextArch`` reads)."""

    def __init__(self, name: str, parts: list):
        self.name = name
        self.parts = parts
        self.dtype = parts[0].dtype
        self.shape = (len(parts),) + tuple(parts[0].shape)
        self.per = parts[0].n_rows          # rows of one expert in the 2-D view

    def _expert_rows(self, e: int, a: int, b: int) -> np.ndarray:
        return self.parts[e].rows(a, b)


class ExpertHalf(ExpertRows):
    """The gate (``half`` 0) or up (1) half of a fused ``[n_expert, 2 ff, cols]`` tensor, as a
    ``[n_expert, ff, cols]`` source (``Qwen2MoeModel`` splits ``gate_up_proj`` on dim -2)."""

    def __init__(self, src, half: int):
        if len(src.shape) != 3 or src.shape[1] % 2:
            raise GgufqError(f"tensor {src.name} has shape {list(src.shape)}; a fused gate_up_proj is "
                             f"[n_expert, 2 * ff, embd]")
        self.name, self.src, self.half, self.dtype = src.name, src, half, src.dtype
        self.ff = self.per = src.shape[1] // 2
        self.shape = (src.shape[0], self.ff, src.shape[2])

    def _expert_rows(self, e: int, a: int, b: int) -> np.ndarray:
        base = e * 2 * self.ff + self.half * self.ff
        return self.src.rows(base + a, base + b)


def n_expert(a) -> int:
    return int(a.cfg.find("num_local_experts", "num_experts", "n_routed_experts") or 0)


def moe_dims(a) -> dict[str, int]:
    m: Moe = a.record.moe
    d = {"X": n_expert(a), "1": 1,
         "Fx": int(a.cfg.need(m.ff_key)) if m.ff_key else a.n_ff}
    if m.shared_ff_key:
        d["Fs"] = int(a.cfg.need(m.shared_ff_key))
    return d


def check_config(a) -> int:
    """The routing hyperparameters llama.cpp needs, checked; returns the expert count."""
    c, name = a.cfg, a.hf_names[0]
    n = n_expert(a)
    if n < 1:
        raise GgufqError(f"config.json lacks num_experts / num_local_experts needed for {name}")
    used = c.find("num_experts_per_tok", "num_experts_per_token", "top_k_experts")
    if used is None:
        raise GgufqError(f"config.json lacks num_experts_per_tok needed for {name}")
    if not 1 <= int(used) <= n:
        raise GgufqError(f"config.json: num_experts_per_tok = {used} for {n} experts")
    if c.get("mlp_only_layers") or int(c.get("decoder_sparse_step") or 1) != 1:
        raise GgufqError(f"config.json: dense layers among the expert layers (mlp_only_layers / "
                         f"decoder_sparse_step) are not supported for {name}")
    return n


def stacked_sources(a, tensors: dict) -> dict:
    """``tensors`` with every group of per-expert tensors replaced by one :class:`StackedSource`
    under the merged HF name llama.cpp's converter maps (``...experts.gate_proj.weight``)."""
    n = check_config(a)
    groups: dict[str, dict[int, object]] = {}
    out: dict = {}
    for hf, t in tensors.items():
        if (m := _EXPERT.match(hf)) is not None:
            groups.setdefault(f"{m['pre']}.{m['post']}", {})[int(m["xid"])] = t
        elif (m := _FUSED_GATE_UP.match(hf)) is not None:
            out[f"{m['pre']}.gate_proj.weight"] = ExpertHalf(t, 0)
            out[f"{m['pre']}.up_proj.weight"] = ExpertHalf(t, 1)
        elif (m := _FUSED_DOWN.match(hf)) is not None:
            out[f"{m['pre']}.down_proj.weight"] = t
        else:
            out[hf] = t
    for merged, parts in groups.items():
        pre, post = merged.rsplit(".experts.", 1)

        def hf_name(x: int) -> str:
            return f"{pre}.experts.{x}.{post}"
        past = [x for x in parts if x >= n]
        if past:
            raise GgufqError(f"tensor {hf_name(max(past))} is expert {max(past)}, config.json has {n} experts")
        missing = [x for x in range(n) if x not in parts]
        if missing:
            raise GgufqError(f"{a.name}: tensor {hf_name(missing[0])} is missing "
                             f"({len(parts)} of {n} experts present)")
        shape0 = tuple(parts[0].shape)
        for x in range(1, n):
            if tuple(parts[x].shape) != shape0:
                raise GgufqError(f"tensor {hf_name(x)} has shape {list(parts[x].shape)}, expert 0's is "
                                 f"{list(shape0)} (experts of unequal shapes)")
        if len(shape0) != 2:
            raise GgufqError(f"tensor {hf_name(0)} has shape {list(shape0)}; an expert's matrix is 2-D")
        out[merged] = StackedSource(merged, [parts[x] for x in range(n)])
    return out


def parameter_counts(tensors) -> tuple[int, int, int, int]:
    """``GGUFWriter.get_total_parameter_count`` over OutTensors: (total, shared, per-expert,
    expert count), what ``gguf.size_label`` turns into ``8x1.2M`` and ``general.size_label``."""
    total = shared = expert = expert_sum = n_exp_tensors = 0
    for t in tensors:
        size = int(np.prod(t.shape, dtype=np.int64))
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[1 if t.name.endswith(".bias") else 0]   # numpy order: ne[-3] is shape[0]
            expert += size // count
            expert_sum += count
            n_exp_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_exp_tensors) if n_exp_tensors else 0


# ---- records ---------------------------------------------------------------------------------
def qwen_moe_keys(a, w: gguf.GGUFWriter) -> None:
    """Qwen2MoeModel.set_gguf_parameters' additions."""
    if (v := a.cfg.get("moe_intermediate_size")) is not None:
        w.add_expert_feed_forward_length(v)
    if (v := a.cfg.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(v)


def olmoe_keys(a, w: gguf.GGUFWriter) -> None:
    """OlmoeModel.set_gguf_parameters: the rms eps is written as 1e-5 whatever the config says."""
    w.add_layer_norm_rms_eps(1e-5)


QWEN_RENORM = ("norm_topk_prob", False)     # transformers' Qwen2/3-MoE and OLMoE configs default

QWEN3MOE = register(QWEN3.derive(
    ("Qwen3MoeForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
    layer=ATTN + (MT.ATTN_Q_NORM, MT.ATTN_K_NORM) + MOE_FFN,
    defaults={"num_key_value_heads": lambda c: c["num_attention_heads"]},   # Qwen3MoeConfig: no head_dim
    keys=qwen_moe_keys,
    moe=Moe(ff_key="moe_intermediate_size", renorm=QWEN_RENORM),
))

QWEN2MOE = register(QWEN2.derive(
    ("Qwen2MoeForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.QWEN2MOE,
    layer=ATTN + MOE_FFN + SHARED,
    keys=qwen_moe_keys,
    moe=Moe(ff_key="moe_intermediate_size", shared_ff_key="shared_expert_intermediate_size", renorm=QWEN_RENORM),
    template_family="chatml",
))

MIXTRAL = register(LLAMA.derive(
    ("MixtralForCausalLM",),
    layer=LLAMA_LAYER[:6] + MOE_FFN[1:],
    defaults={"num_key_value_heads": 8},   # MixtralConfig: head_dim None (no key_length written)
    moe=Moe(renorm="always"),
))

OLMOE = register(QWEN3.derive(
    ("OlmoeForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.OLMOE,
    layer=ATTN + (MT.ATTN_Q_NORM, MT.ATTN_K_NORM) + MOE_FFN,
    shapes={MT.ATTN_Q_NORM: ("q",), MT.ATTN_K_NORM: ("kv",)},
    bias_key="attention_bias",
    bias_tensors=(MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT),
    defaults={"num_key_value_heads": lambda c: c["num_attention_heads"]},
    keys=olmoe_keys,
    forward=Forward(qk_norm="full"),
    moe=Moe(renorm=QWEN_RENORM),
    template_family=None,
))


def renormalizes(record, config: dict) -> bool:
    """Whether the HF model rescales its top-k router weights to sum 1 (for the readers of
    ``Forward`` facts: the reference forward, calibration)."""
    r = record.moe.renorm
    if r == "always":
        return True
    if r == "never" or r is None:
        return False
    key, default = r
    v = config.get(key)
    return bool(default if v is None else v)


def expert_count(record, config: dict) -> Optional[int]:
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(k):
            return int(config[k])
    return None
