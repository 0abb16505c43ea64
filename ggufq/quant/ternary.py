"""TQ1_0 and TQ2_0: ternary {-1, 0, 1} codes under one fp16 scale per 256 weights (BitNet b1.58, TriLMs).

Follows ggml-quants.c's ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref``
(``ggml_quantize_chunk`` ignores an imatrix for both): d = max |x|, each weight
``lroundf(x * (1/d)) + 1`` in {0, 1, 2}.

* TQ1_0 packs five trits per byte as a base-3 number (first weight most
  significant) scaled to a byte by ``ceil(q * 256 / 243)``: 32 bytes for weights
  0..159 (byte m holds m, m+32, ..., m+128), 16 bytes for 160..239 (stride 16),
  then 4 bytes of four trits (stride 4, the fifth trit 0) for 240..255.
* TQ2_0 packs four 2-bit codes per byte: byte m of each 128-weight half holds
  weights m, m+32, m+64, m+96 from the low bits up.

block_tq1_0 { u8 qs[48]; u8 qh[4]; half d; }   54 bytes
block_tq2_0 { u8 qs[64]; half d; }             66 bytes
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes

F32 = np.float32
QK_K = 256


def _trits(rows: np.ndarray):
    """(d [nb], codes uint8 [nb, 256] in {0, 1, 2}) for every 256-weight block of rows.

    ``lroundf(v) + 1`` for ``v = x * (1/d)``, |v| <= 1 (+ rounding): 0 for v <= -0.5, 2 for v >= 0.5,
    else 1 -- two exact float comparisons (halves go away from zero, as lroundf)."""
    x = rows.reshape(-1, QK_K)
    d = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    v = x * inv[:, None]
    t = (v > F32(-0.5)).view(np.uint8) + (v >= F32(0.5)).view(np.uint8)
    return d, t


def _base3(t: np.ndarray) -> np.ndarray:
    """Trits [..., n, m] (axis -2 most significant first) -> their base-3 numbers [..., m] (< 243)."""
    q = t[..., 0, :].copy()
    for i in range(1, t.shape[-2]):
        q *= 3
        q += t[..., i, :]
    return q


def _to_byte(q: np.ndarray) -> np.ndarray:
    """Ceiling division that spreads 0..242 over a byte (243 == 3**5)."""
    return ((q.astype(np.uint16) * 256 + 242) // 243).astype(np.uint8)


@register(T.TQ1_0)
def encode_tq1_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    n, k = rows.shape
    d, t = _trits(rows)
    nb = t.shape[0]
    qs32 = _to_byte(_base3(t[:, :160].reshape(nb, 5, 32)))
    qs16 = _to_byte(_base3(t[:, 160:240].reshape(nb, 5, 16)))
    qh = _to_byte(_base3(t[:, 240:].reshape(nb, 4, 4)) * 3)
    out = np.concatenate([qs32, qs16, qh, fp16_bytes(d)], axis=1)
    return out.reshape(n, k // QK_K * 54)


@register(T.TQ2_0)
def encode_tq2_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    n, k = rows.shape
    d, t = _trits(rows)
    nb = t.shape[0]
    t = t.reshape(nb, 2, 4, 32)
    qs = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
    out = np.concatenate([qs.reshape(nb, 64), fp16_bytes(d)], axis=1)
    return out.reshape(n, k // QK_K * 66)
