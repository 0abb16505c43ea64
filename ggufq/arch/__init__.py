"""Architectures as data: an :class:`ArchRecord` per HF class, read by every stage.

gguf-py already names every tensor of every llama.cpp architecture
(``MODEL_TENSORS[arch]``, ``TENSOR_NAMES``) and maps the HF spellings to them
(``TensorNameMap``). So an architecture here is only a record of its
*deviations* from the common dense decoder -- rope layout, norm offset, q/k
norms, biases, fused tensors, config defaults, the few extra GGUF keys -- and
:class:`ggufq.arch.base.TextArch` turns (record, config.json) into GGUF
metadata and a list of :class:`OutTensor` whose ``read(lo, hi)`` yields float32
rows (Q/K permutations, norm offsets, generated tensors such as ``rope_freqs``
happen there). The same record tells the plan (``model_info``), the data-free
importance (which norm feeds which matrix) and the tests' reference forward
(``forward`` facts) what the model is. An arch knows nothing of files or
quantization.

Adding an architecture: one module under ``ggufq/arch`` that calls
:func:`register` with a record (see docs/DESIGN.md, "How to add an
architecture", with Qwen3 as the worked example).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import gguf
import numpy as np

from .. import GgufqError
from ..plan import TensorSpec

MT = gguf.MODEL_TENSOR

_MODULES = ("llama", "qwen", "gemma", "phi3", "olmo2", "granite", "moe", "gpt_oss")
_REGISTRY: dict[str, "ArchRecord"] = {}
_loaded = False


@dataclass
class OutTensor:
    """A tensor as it will be in the GGUF file (numpy shape order, row = last dim)."""
    name: str
    shape: tuple[int, ...]
    read: Callable[[int, int], np.ndarray]   # rows [lo, hi) of the [n_rows, row_len] view, float32
    # a tensor the checkpoint already holds in a ggml block type (gpt-oss's MXFP4 experts): that type
    # and raw(lo, hi) -> its rows' block bytes, which the writer copies when the plan keeps the type
    native: Optional[gguf.GGMLQuantizationType] = None
    raw: Optional[Callable[[int, int], np.ndarray]] = None

    @property
    def row_len(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.native)


# the layer of a Llama-style pre-norm decoder: what every record starts from
LLAMA_LAYER = (MT.ATTN_NORM, MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT,
               MT.FFN_NORM, MT.FFN_GATE, MT.FFN_UP, MT.FFN_DOWN)

# GGUF tensor -> shape in numpy order, in terms of the hyperparameters
# (E embd, F ff, V vocab, q = n_head*head_dim, kv = n_head_kv*head_dim, hd head_dim, qkv = q + 2 kv)
SHAPES: dict[MT, tuple[str, ...]] = {
    MT.TOKEN_EMBD: ("V", "E"), MT.OUTPUT: ("V", "E"), MT.OUTPUT_NORM: ("E",),
    MT.ATTN_NORM: ("E",), MT.FFN_NORM: ("E",), MT.ATTN_POST_NORM: ("E",), MT.FFN_POST_NORM: ("E",),
    MT.ATTN_Q: ("q", "E"), MT.ATTN_K: ("kv", "E"), MT.ATTN_V: ("kv", "E"), MT.ATTN_QKV: ("qkv", "E"),
    MT.ATTN_OUT: ("E", "q"), MT.ATTN_Q_NORM: ("hd",), MT.ATTN_K_NORM: ("hd",),
    MT.FFN_GATE: ("F", "E"), MT.FFN_UP: ("F", "E"), MT.FFN_DOWN: ("E", "F"),
    # mixture of experts (X experts of width Fx, a shared expert of width Fs): ggufq.arch.moe
    MT.FFN_GATE_INP: ("X", "E"), MT.FFN_GATE_EXP: ("X", "Fx", "E"), MT.FFN_UP_EXP: ("X", "Fx", "E"),
    MT.FFN_DOWN_EXP: ("X", "E", "Fx"), MT.FFN_GATE_SHEXP: ("Fs", "E"), MT.FFN_UP_SHEXP: ("Fs", "E"),
    MT.FFN_DOWN_SHEXP: ("E", "Fs"), MT.FFN_GATE_INP_SHEXP: ("1", "E"),
    MT.ATTN_SINKS: ("H",),     # one attention-sink logit per head (gpt-oss)
}


@dataclass(frozen=True)
class Forward:
    """How the HF model computes, for the readers that run or model it (reference forward,
    importance, calibration). Defaults: Llama."""
    act: str = "silu"                     # gate activation: "silu" | "gelu_tanh"
    norm_offset: float = 0.0              # HF norms compute x * (offset + w) (Gemma: 1)
    qk_norm: Optional[str] = None         # "head": RMSNorm per head on q/k; "full": over all of q / k
    pre_norm: bool = True                 # norm before attention / MLP (OLMo 2 has none)
    post_norm: bool = False               # norm after attention / MLP, before the residual add
    embed_scale: Optional[str] = None     # "sqrt_embd" (Gemma) or a config key (Granite)
    attn_scale: Optional[str] = None      # None: 1/sqrt(head_dim); "query_pre_attn_scalar"; a config key
    residual_scale: Optional[str] = None  # config key multiplying each block's output (Granite)
    logit_scale: Optional[str] = None     # config key dividing the logits (Granite)
    final_softcap: Optional[str] = None   # config key of tanh soft-capping of the logits (Gemma 2/3)
    attn_softcap: Optional[str] = None    # config key of tanh soft-capping of attention scores (Gemma 2)
    no_rope_every: int = 0                # every n-th layer has no rope (SmolLM3: 4)
    fused_qkv: bool = False               # Phi-3: q, k, v in one matrix
    fused_gate_up: bool = False           # Phi-3: gate and up in one matrix (gate first)


@dataclass(frozen=True)
class Moe:
    """A mixture-of-experts FFN (:mod:`ggufq.arch.moe`): per-expert HF tensors
    ``*.experts.{i}.*`` are stacked into ``ffn_{gate,up,down}_exps``."""
    ff_key: Optional[str] = None          # config key of one expert's FFN width (None: intermediate_size)
    shared_ff_key: Optional[str] = None   # config key of the shared expert's width (Qwen2-MoE)
    # how the HF model weights the top-k experts: "always" renormalises them to sum 1 (Mixtral),
    # otherwise the config key that switches it on and its default ("norm_topk_prob", False)
    renorm: object = "always"
    # how a fused gate_up tensor holds its halves: "halves" ([gate; up] on the row axis, transformers 5's
    # Qwen2/3-MoE) or "interleaved" (gate rows even, up rows odd, with biases: gpt-oss)
    gate_up: str = "halves"


@dataclass(frozen=True)
class ArchRecord:
    """One architecture's deviations from the common dense decoder.

    Read by :class:`ggufq.arch.base.TextArch` (convert), ``model_info`` (plan),
    :mod:`ggufq.importance` and the tests' reference forward.
    """
    hf_names: tuple[str, ...]             # config.json "architectures" this record converts
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False              # rope NORM (interleaved): Q/K rows permuted from HF's rotate-half
    layer: tuple[MT, ...] = LLAMA_LAYER   # tensors every layer must have
    biases: tuple[MT, ...] = ()           # tensors whose .bias every layer must have
    bias_key: Optional[str] = None        # config key switching ``bias_tensors`` on (e.g. attention_bias)
    bias_tensors: tuple[MT, ...] = (MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT)
    shapes: dict = field(default_factory=dict)       # MT -> shape terms, overriding SHAPES
    defaults: dict = field(default_factory=dict)     # config key -> value or f(config): what transformers'
                                                     # config class fills in (llama.cpp reads it through it)
    drop_keys: tuple[str, ...] = ()       # config keys llama.cpp's class pops before writing (Granite head_dim)
    skip_tensors: tuple[str, ...] = ()    # HF tensors never written (Gemma drops lm_head)
    norm_offset: float = 0.0              # added to every HF "*norm.weight" on the way in (Gemma: +1)
    vocab_rows_from_tokenizer: bool = False  # token_embd rows cut to the tokenizer's size (Gemma 3)
    common_keys: bool = True              # False: the arch writes all its hparams itself (Phi-3)
    keys: Optional[Callable] = None       # (cfg, writer) after the common keys: arch-specific hparams
    keys_after_ftype: Optional[Callable] = None  # (cfg, writer) after general.file_type (Llama's vocab_size)
    generated: Optional[Callable] = None  # (cfg) -> [OutTensor] tensors made from the config (rope_freqs)
    vocab: Optional[Callable] = None      # (vocab, model_dir, cfg) -> Vocab: tokenizer deviations
    tokenizer: Optional[str] = None       # force a vocab loader: "spm" | "bpe" | None (what the folder has)
    forward: Forward = Forward()
    template_family: Optional[str] = None  # ggufq.ollama template family for this arch (None: detect)
    moe: Optional[Moe] = None             # mixture of experts (None: dense FFN)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def derive(self, hf_names: tuple[str, ...], **changes) -> "ArchRecord":
        """A record for a related arch: this one with ``changes``."""
        return replace(self, hf_names=tuple(hf_names), **changes)


def register(record: ArchRecord) -> ArchRecord:
    for n in record.hf_names:
        _REGISTRY[n] = record
    return record


def _load() -> None:
    global _loaded
    if not _loaded:
        for m in _MODULES:
            importlib.import_module(f"{__name__}.{m}")
        _loaded = True


def supported() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def record_for(config: dict) -> ArchRecord:
    """The record for a config.json, or a clear error listing what is supported."""
    _load()
    names = config.get("architectures") or []
    if isinstance(names, str):
        names = [names]
    for n in names:
        if n in _REGISTRY:
            return _REGISTRY[n]
    got = ", ".join(map(str, names)) if names else "none given in config.json"
    raise GgufqError(f"unsupported architecture ({got}); ggufq converts {', '.join(supported())}")


def for_config(config: dict):
    """The arch object (:class:`ggufq.arch.base.TextArch`) for a config.json."""
    from .base import TextArch
    return TextArch(record_for(config), config)
