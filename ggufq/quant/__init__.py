"""Block encoders: float32 rows -> bytes in ggml's layout.

Every encoder is a pure function ``encode(rows, imatrix=None) -> np.ndarray``:

* ``rows``: float32 array ``[n_rows, n_per_row]``; ``n_per_row`` is a multiple of
  the type's block size (callers check with :func:`can_encode`).
* ``imatrix``: optional float32 ``[n_per_row]`` importance weights (llama.cpp's
  ``quant_weights``); encoders without a weighted variant ignore it.
* returns uint8 ``[n_rows, row_nbytes(qtype, n_per_row)]``, decodable with
  ``gguf.quants.dequantize``.

Encoders register themselves with :func:`register`; the modules that hold them
are listed in ``_MODULES`` and imported once on first use.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Encoder = Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]

# one module per block family
_MODULES = ("floats", "legacy", "q2_k", "q3_k", "q4_k", "q6_k", "iq4", "ternary", "mxfp4", "iq2", "iq1", "iq3")
_ENCODERS: dict[GGMLQuantizationType, Encoder] = {}
_loaded = False


def register(qtype: GGMLQuantizationType) -> Callable[[Encoder], Encoder]:
    def deco(fn: Encoder) -> Encoder:
        _ENCODERS[qtype] = fn
        return fn
    return deco


def _load() -> None:
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            importlib.import_module(f"{__name__}.{mod}")
        _loaded = True


def encoders() -> dict[GGMLQuantizationType, Encoder]:
    _load()
    return dict(_ENCODERS)


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_nbytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    if n_per_row % bs:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {bs}, got {n_per_row}")
    return n_per_row // bs * ts


def requires_imatrix(qtype: GGMLQuantizationType) -> bool:
    """Whether the encoder refuses rows without importance weights (ggml_quantize_requires_imatrix:
    IQ2_XXS, IQ2_XS, IQ1_S); the modules that hold such encoders list them in ``REQUIRES_IMATRIX``."""
    _load()
    return any(qtype in getattr(importlib.import_module(f"{__name__}.{m}"), "REQUIRES_IMATRIX", ())
               for m in _MODULES)


def can_encode(qtype: GGMLQuantizationType, n_per_row: int) -> bool:
    _load()
    return qtype in _ENCODERS and n_per_row % block_size(qtype) == 0


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return ts * 8 / bs


def encode(qtype: GGMLQuantizationType, rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """Encode float32 rows ``[n, k]`` as ``qtype``; returns uint8 ``[n, row_nbytes]``."""
    _load()
    try:
        fn = _ENCODERS[qtype]
    except KeyError:
        raise ValueError(f"no encoder for {qtype.name}") from None
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"encode takes 2-D rows, got shape {rows.shape}")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (rows.shape[1],):
            raise ValueError(f"imatrix has shape {imatrix.shape}, rows have {rows.shape[1]} columns")
    out = fn(rows, imatrix)
    assert out.dtype == np.uint8 and out.shape == (rows.shape[0], row_nbytes(qtype, rows.shape[1])), (qtype, out.shape)
    return out
