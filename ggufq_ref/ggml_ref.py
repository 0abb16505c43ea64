"""ggml's own quantizers through ctypes, as the reference for tests and benchmarks.

Loads ``libggml-base`` from the installed llama-cpp-python (which bundles the
llama.cpp we compare against; :mod:`ggufq.llamalib`) and calls ``ggml_quantize_chunk``.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType

from ggufq import llamalib
from ggufq.quant import row_nbytes


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = llamalib.ggml_base()
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    try:
        _lib()
        return True
    except (RuntimeError, OSError):
        return False


def quantize(qtype: GGMLQuantizationType, rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """ggml_quantize_chunk over float32 rows [n, k] -> uint8 [n, row_nbytes]."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = rows.shape
    out = np.empty((n, row_nbytes(qtype, k)), dtype=np.uint8)
    imp = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (k,)
        imp = imatrix.ctypes.data
    lib = _lib()
    if imp is None and requires_imatrix(qtype):
        raise ValueError(f"ggml cannot quantize {qtype.name} without an imatrix")
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n, k, imp)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def requires_imatrix(qtype: GGMLQuantizationType) -> bool:
    """ggml_quantize_requires_imatrix: ggml_quantize_chunk aborts the process for these types
    without an imatrix (IQ2_XXS, IQ2_XS, IQ1_S); never call :func:`quantize` so for them."""
    lib = _lib()
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return bool(lib.ggml_quantize_requires_imatrix(int(qtype)))
