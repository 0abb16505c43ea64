"""MXFP4: 32 weights as E2M1 codes (``kvalues_mxfp4``) under a shared power-of-two (E8M0) scale.

Follows ggml-quants.c's ``quantize_row_mxfp4_ref`` (``ggml_quantize_chunk``
ignores an imatrix): ``e = floor(log2f(amax)) - 2 + 127`` (0 for an all-zero
block), ``d = 2^(e - 128)`` (``GGML_E8M0_TO_FP32_HALF``; the table holds doubled
E2M1 values) and each weight takes the first table entry with the least
``|kv*d - x|``.

``floor(log2f(amax))`` is the float exponent of amax except just below a power of
two, where log2f rounds up to the integer: that is decided here from a float64
log2 rounded to float32 (glibc's log2f is correctly rounded there; tests check
the floats next to powers of two against ggml).

block_mxfp4 { u8 e; u8 qs[16]; }   17 bytes; qs[j] = code j | code j+16 << 4
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import MXFP4 as _GGUF_MXFP4

from . import register

F32 = np.float32
QK = 32
KVALUES = np.array(_GGUF_MXFP4.kvalues, dtype=np.int8)          # kvalues_mxfp4: 0..7 >= 0, 8..15 their negatives
_MAG = KVALUES[:8].astype(F32)
assert (KVALUES[8:] == -KVALUES[:8]).all()


def e8m0_exponent(amax: np.ndarray) -> np.ndarray:
    """(uint8)(floorf(log2f(amax)) - 2 + 127), 0 where amax is 0."""
    pos = amax > 0
    with np.errstate(divide="ignore"):
        lg = np.log2(np.where(pos, amax, F32(1)).astype(np.float64)).astype(F32)
    e = np.floor(lg).astype(np.int64) - 2 + 127
    return np.where(pos, e & 0xFF, 0).astype(np.uint8)


def e8m0_to_fp32_half(e: np.ndarray) -> np.ndarray:
    """ggml_e8m0_to_fp32_half: 2^(e-128) as float32 (denormal patterns for e < 2)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(F32)


# the nearest magnitude (ties to the smaller) as a table on ceil(2 * |x| / d): d is a power of two, so
# |x| / d is exact, and the midpoints between table entries are multiples of 1/2
_MID2 = (_MAG[:-1] + _MAG[1:]).astype(np.int64)                                   # 2 * midpoints
_LUT = np.searchsorted(_MID2, np.arange(int(2 * _MAG[-1]) + 1), side="left").astype(np.uint8)
_TOP = F32(2 * _MAG[-1])


def _nearest_first(ax: np.ndarray, d: np.ndarray) -> np.ndarray:
    """best_index_mxfp4's scan over the 8 magnitudes: first entry with the least |kv*d - |x||."""
    best = np.zeros(ax.shape, dtype=np.uint8)
    best_err = np.abs(_MAG[0] * d[:, None] - ax)
    for i in range(1, 8):
        err = np.abs(_MAG[i] * d[:, None] - ax)
        best[err < best_err] = i
        np.minimum(best_err, err, out=best_err)
    return best


@register(T.MXFP4)
def encode_mxfp4(rows: np.ndarray, imatrix=None) -> np.ndarray:
    n, k = rows.shape
    x = rows.reshape(-1, QK)
    nb = x.shape[0]
    ax = np.abs(x)
    e = e8m0_exponent(ax.max(axis=1))
    d = e8m0_to_fp32_half(e)
    # a negative x against a negative entry gives the same |.| as |x| against the positive one,
    # and the zero entry (index 0) comes before its negative twin (index 8), so ties keep index 0
    normal = e >= 3                                  # 2/d is a finite power of two
    inv2 = np.where(normal, F32(2) / np.where(normal, d, F32(1)), F32(0)).astype(F32)
    t = np.minimum(np.ceil(ax * inv2[:, None]), _TOP).astype(np.intp)
    best = _LUT[t]
    if not normal.all():
        small = ~normal
        best[small] = _nearest_first(ax[small], d[small])
    code = np.where((x < 0) & (best != 0), best + np.uint8(8), best)
    qs = code[:, :16] | (code[:, 16:] << 4)
    out = np.concatenate([e.reshape(nb, 1), qs], axis=1)
    return out.reshape(n, k // QK * 17)
