"""Accuracy parity of our encoders against ggml's own (``ggml_ref``), for tests and tools.

* :func:`model_matrices` reads the 2-D tensors of a model folder one at a time, as
  float32, through :mod:`ggufq.source`.
* :func:`compare` encodes one matrix with ours and ggml's and reports relative
  RMSE of both (decoded with ``gguf.quants.dequantize``) and the share of
  byte-identical blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from ggufq.quant import encode

def model_matrices(model_dir: str, min_cols: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, float32 [rows, cols])`` for every 2-D tensor with ``cols >= min_cols``, sorted by name."""
    from ggufq.source import DTYPES, open_model

    with open_model(model_dir) as m:
        for t in sorted(m, key=lambda t: t.name):
            if len(t.shape) == 2 and t.shape[1] >= min_cols and t.dtype in DTYPES:
                yield t.name, t.read_all()


def synthetic_imatrix(n_cols: int, seed: int = 0, n_tokens: int = 64) -> np.ndarray:
    """A positive importance vector like llama-imatrix's: mean of squared activations per column."""
    rng = np.random.default_rng(seed + n_cols)
    scale = np.exp(rng.normal(0, 1, n_cols)).astype(np.float32)       # heavy per-channel spread
    act = rng.standard_normal((n_tokens, n_cols)).astype(np.float32) * scale
    return (act * act).mean(axis=0).astype(np.float32) + np.float32(1e-6)


def rel_rmse(x: np.ndarray, q: np.ndarray, qtype: GGMLQuantizationType) -> float:
    deq = gq.dequantize(q, qtype).reshape(x.shape)
    return float(np.linalg.norm(deq - x) / np.linalg.norm(x))


@dataclass
class Parity:
    ours: float          # relative RMSE of our encoding
    ggml: float          # relative RMSE of ggml's
    same_blocks: float   # share of byte-identical blocks
    n_blocks: int

    @property
    def ratio(self) -> float:
        return self.ours / self.ggml if self.ggml else (1.0 if self.ours == 0 else float("inf"))


def compare(qtype: GGMLQuantizationType, x: np.ndarray, imatrix: Optional[np.ndarray] = None) -> Parity:
    from . import ggml_ref

    ours = encode(qtype, x, imatrix)
    ref = ggml_ref.quantize(qtype, x, imatrix)
    bsz = GGML_QUANT_SIZES[qtype][1]
    a = ours.reshape(-1, bsz)
    b = ref.reshape(-1, bsz)
    same = float((a == b).all(axis=1).mean())
    return Parity(rel_rmse(x, ours, qtype), rel_rmse(x, ref, qtype), same, a.shape[0])
