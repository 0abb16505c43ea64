"""Q2_K: 256-weight super-blocks of 16 sub-blocks with a 4-bit scale and 4-bit min each.

Follows ggml-quants.c: ``quantize_row_q2_K_ref`` (make_qkx2_quants(16, 3, ...)
with |x| weights and the mean absolute error) without an imatrix, and
``quantize_row_q2_K_impl`` (make_qkx3_quants + make_qp_quants) with one.

block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; }   84 bytes
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, fp16_round
from .q4_k import QK_K, _rows_of, _seq_sum_last
from .qkx import make_qkx2_quants, make_qkx3_quants

F32 = np.float32


def _requantize(sub, L, d, dmin, scales):
    dd = fp16_round(d)[:, None] * (scales & 0xF).astype(F32)
    dm = fp16_round(dmin)[:, None] * (scales >> 4).astype(F32)
    ok = dd != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (sub + dm[..., None]) / np.where(ok, dd, F32(1))[..., None]
    q = np.clip(np.rint(q), 0, 3)
    return np.where(ok[..., None], q, L).astype(np.uint8)


@register(T.Q2_K)
def encode_q2_k(rows: np.ndarray, imatrix=None) -> np.ndarray:
    n, k = rows.shape
    sub = rows.reshape(-1, 16, 16)
    nb = sub.shape[0]
    g = sub.reshape(-1, 16)
    if imatrix is None:
        s, mins, L = make_qkx2_quants(g, np.abs(g), 3, -0.5, 0.1, 15, True)
        s = s.reshape(nb, 16)
        mins = mins.reshape(nb, 16)
        q4scale = F32(15)
        max_scale = np.maximum(s.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        with np.errstate(divide="ignore"):
            isc = np.where(max_scale > 0, q4scale / max_scale, F32(0)).astype(F32)
            imn = np.where(max_min > 0, q4scale / max_min, F32(0)).astype(F32)
        ls = np.where(max_scale[:, None] > 0, np.rint(isc[:, None] * s), 0).astype(np.int64)
        lm = np.where(max_min[:, None] > 0, np.rint(imn[:, None] * mins), 0).astype(np.int64)
        scales = ((ls | (lm << 4)) & 0xFF).astype(np.uint8)
        d = np.where(max_scale > 0, max_scale / q4scale, F32(0)).astype(F32)
        dmin = np.where(max_min > 0, max_min / q4scale, F32(0)).astype(F32)
    else:
        from .qx import make_qp_quants
        sup = rows.reshape(-1, QK_K)
        sum_x2 = _seq_sum_last(sup * sup)
        sigma2 = sum_x2 / F32(QK_K)
        qw = np.broadcast_to(imatrix.reshape(1, -1, QK_K), (n, k // QK_K, QK_K)).reshape(nb, QK_K)
        w = (qw * np.sqrt(sigma2[:, None] + sup * sup)).reshape(-1, 16)
        sw = _seq_sum_last(w).reshape(nb, 16)
        s, mins, L = make_qkx3_quants(g, w, 3, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(s.reshape(nb, 16), 15, sw)
        dmin, lm = make_qp_quants(mins.reshape(nb, 16), 15, sw)
        scales = (ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)).astype(np.uint8)
    L = _requantize(sub, L.reshape(nb, 16, 16), d, dmin, scales).reshape(nb, 2, 4, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    return _rows_of([scales, qs, fp16_bytes(d), fp16_bytes(dmin)], rows)
