"""Per-architecture mapping: HF config -> GGUF hyperparameters, HF tensors -> GGUF tensors.

One small module per architecture family registers its class under the HF
``architectures`` names it handles. An arch knows nothing of files or
quantization: it turns a :class:`ggufq.source.Model` into GGUF metadata and a
list of :class:`OutTensor` whose ``read(lo, hi)`` yields float32 rows (Q/K
permutations and generated tensors such as ``rope_freqs`` happen there).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Type

import numpy as np

from .. import GgufqError
from ..plan import TensorSpec

_MODULES = ("llama", "mistral", "qwen2")
_REGISTRY: dict[str, Type] = {}
_loaded = False


@dataclass
class OutTensor:
    """A tensor as it will be in the GGUF file (numpy shape order, row = last dim)."""
    name: str
    shape: tuple[int, ...]
    read: Callable[[int, int], np.ndarray]   # rows [lo, hi) of the [n_rows, row_len] view, float32

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
        return TensorSpec(self.name, self.shape)


def register(*hf_names: str):
    def deco(cls):
        for n in hf_names:
            _REGISTRY[n] = cls
        cls.hf_names = tuple(hf_names)
        return cls
    return deco


def _load() -> None:
    global _loaded
    if not _loaded:
        for m in _MODULES:
            importlib.import_module(f"{__name__}.{m}")
        _loaded = True


def supported() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def for_config(config: dict):
    """The arch object for a config.json, or a clear error listing what is supported."""
    _load()
    names = config.get("architectures") or []
    if isinstance(names, str):
        names = [names]
    for n in names:
        if n in _REGISTRY:
            return _REGISTRY[n](config)
    got = ", ".join(names) if names else "none given in config.json"
    raise GgufqError(f"unsupported architecture ({got}); ggufq converts {', '.join(supported())}")
