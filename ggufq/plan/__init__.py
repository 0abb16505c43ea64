"""Layer map: tensor name + shape -> ggml type, before any weight is read.

``make_plan(tensors, info, ftype, rules=None)`` returns a :class:`Plan` whose
entries say, for every tensor, the type chosen and the rule that chose it
(what ``ggufq plan`` prints). Presets reproduce llama-quantize's mixtures
(``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from .. import GgufqError


@dataclass(frozen=True)
class TensorSpec:
    name: str                 # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]    # numpy order: (..., rows, n_per_row); last dim is the row length


@dataclass(frozen=True)
class ModelInfo:
    arch: str                 # GGUF arch name, e.g. "llama"
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    qtype: T
    reason: str

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // bs * ts


@dataclass
class Plan:
    ftype: str                       # the --type asked for, e.g. "Q4_K_M"
    file_type: LlamaFileType         # general.file_type
    entries: list[PlanEntry] = field(default_factory=list)

    def __getitem__(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def n_elements(self) -> int:
        return sum(e.n_elements for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bytes * 8 / max(1, self.n_elements)


# --type -> (general.file_type, default type of quantizable matrices)
SIMPLE_TYPES: dict[str, tuple[LlamaFileType, T]] = {
    "F32": (LlamaFileType.ALL_F32, T.F32),
    "F16": (LlamaFileType.MOSTLY_F16, T.F16),
    "BF16": (LlamaFileType.MOSTLY_BF16, T.BF16),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
}


def keeps_f32(spec: TensorSpec) -> Optional[str]:
    """Tensors llama.cpp's converter always writes as F32; returns the reason, or None."""
    if len(spec.shape) <= 1:
        return "1-D tensor kept F32"
    if spec.name.endswith("_norm.weight"):
        return "norm kept F32"
    return None


def make_plan(tensors: Sequence[TensorSpec], info: ModelInfo, ftype: str,
              rules: Optional[list] = None) -> Plan:
    key = ftype.upper()
    if key not in SIMPLE_TYPES:
        raise GgufqError(f"unknown --type {ftype!r}; choose one of {', '.join(SIMPLE_TYPES)}")
    file_type, default = SIMPLE_TYPES[key]
    plan = Plan(ftype=key, file_type=file_type)
    for spec in tensors:
        why = keeps_f32(spec)
        if why:
            plan.entries.append(PlanEntry(spec.name, spec.shape, T.F32, why))
            continue
        qtype, reason = default, f"--type {key}"
        bs = GGML_QUANT_SIZES[qtype][0]
        if spec.shape[-1] % bs:
            # as convert_hf_to_gguf.py: rows Q8_0 can't take are written F16
            qtype, reason = T.F16, f"row length {spec.shape[-1]} not a multiple of {bs}: F16"
        plan.entries.append(PlanEntry(spec.name, spec.shape, qtype, reason))
    return plan
