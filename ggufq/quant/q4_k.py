"""Q4_K and Q5_K: 256-weight super-blocks of 8 sub-blocks with a 6-bit scale and min each.

Follows ggml-quants.c: ``quantize_row_q{4,5}_K_ref`` without an imatrix
(make_qkx2_quants per sub-block, scales rounded against the largest) and
``quantize_row_q{4,5}_K_impl`` with one (make_qkx3_quants per sub-block,
make_qp_quants over the 8 scales and the 8 mins). Vectorised over every
sub-block of the chunk.

block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }           144 bytes
block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; } 176 bytes
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, fp16_round
from .qkx import make_qkx2_quants, make_qkx3_quants

QK_K = 256
F32 = np.float32


def _seq_sum_last(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis element after element (the C loop order)."""
    t = np.ascontiguousarray(np.moveaxis(a, -1, 0))
    return np.add.reduce(t, axis=0)


def _rows_of(cols, rows: np.ndarray) -> np.ndarray:
    """Super-block columns [nb, ...] -> bytes [n_rows, row_nbytes] (also for zero rows)."""
    blk = np.concatenate(cols, axis=1)
    return blk.reshape(rows.shape[0], rows.shape[1] // QK_K * blk.shape[1])


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [nb, 8] -> the 12 packed bytes [nb, 12] (inverse of get_scale_min_k4)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def unpack_scales_k4(sc: np.ndarray):
    """get_scale_min_k4 for all 8 sub-blocks: [nb, 12] -> (scales [nb, 8], mins [nb, 8]) as uint8."""
    d = np.empty((sc.shape[0], 8), np.uint8)
    m = np.empty_like(d)
    d[:, :4] = sc[:, 0:4] & 63
    m[:, :4] = sc[:, 4:8] & 63
    d[:, 4:] = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return d, m


def _nearest(v: np.ndarray) -> np.ndarray:
    return np.rint(v).astype(np.int64)


def _requantize(sub: np.ndarray, L: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray,
                nmax: int) -> np.ndarray:
    """The final pass: codes from the stored (fp16) super scales and the 6-bit/4-bit sub scales.

    sub [nb, ns, gs] weights, L [nb, ns, gs] codes of the search (kept where the sub scale is 0),
    d/dmin [nb] as stored, sc/m [nb, ns] integer sub scales.
    """
    dd = (fp16_round(d)[:, None] * sc.astype(F32))
    dm = (fp16_round(dmin)[:, None] * m.astype(F32))
    ok = dd != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (sub + dm[..., None]) / np.where(ok, dd, F32(1))[..., None]
    q = np.clip(np.rint(q), 0, nmax)
    return np.where(ok[..., None], q, L).astype(np.uint8)


def _max0(v: np.ndarray) -> np.ndarray:
    return np.maximum(v.max(axis=1), F32(0))


def _sub_scales_ref(sub: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """quantize_row_q{4,5}_K_ref up to the packed scales. sub: [nb, 8, 32]."""
    nb = sub.shape[0]
    g = sub.reshape(-1, 32)
    sum_x2 = _seq_sum_last(g * g)
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x[:, None] + np.abs(g)
    scales, mins, L = make_qkx2_quants(g, w, nmax, rmin, rdelta, nstep, False)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = _max0(scales)
    max_min = _max0(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(_nearest(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_nearest(inv_min[:, None] * mins) & 0xFF, 63)
    d = (max_scale / F32(63)).astype(F32)
    dmin = (max_min / F32(63)).astype(F32)
    return d, dmin, ls, lm, L.reshape(nb, 8, 32)


def _sub_scales_imatrix(rows: np.ndarray, imatrix: np.ndarray, nmax: int):
    """quantize_row_q{4,5}_K_impl up to the packed scales (with quant weights)."""
    from .qx import make_qp_quants
    n, k = rows.shape
    sup = rows.reshape(-1, QK_K)                      # [nb, 256]
    nb = sup.shape[0]
    sum_x2 = _seq_sum_last(sup * sup)
    sigma2 = F32(2) * sum_x2 / F32(QK_K)
    qw = np.broadcast_to(imatrix.reshape(1, -1, QK_K), (n, k // QK_K, QK_K)).reshape(nb, QK_K)
    w = qw * np.sqrt(sigma2[:, None] + sup * sup)
    g = sup.reshape(-1, 32)
    wg = w.reshape(-1, 32)
    sw = _seq_sum_last(wg).reshape(nb, 8)
    scales, mins, L = make_qkx3_quants(g, wg, nmax, -0.9, 0.05, 36, False)
    d, ls = make_qp_quants(scales.reshape(nb, 8), 63, sw)
    dmin, lm = make_qp_quants(mins.reshape(nb, 8), 63, sw)
    return d, dmin, np.minimum(ls, 63), np.minimum(lm, 63), L.reshape(nb, 8, 32)


def _encode_k(rows: np.ndarray, imatrix, nmax: int, rmin: float, rdelta: float, nstep: int):
    n, k = rows.shape
    sub = rows.reshape(-1, 8, 32)
    if imatrix is None:
        d, dmin, ls, lm, L = _sub_scales_ref(sub, nmax, rmin, rdelta, nstep)
    else:
        d, dmin, ls, lm, L = _sub_scales_imatrix(rows, imatrix, nmax)
    scales = pack_scales_k4(ls, lm)
    sc, m = unpack_scales_k4(scales)
    L = _requantize(sub, L, d, dmin, sc, m, nmax)
    return d, dmin, scales, L


@register(T.Q4_K)
def encode_q4_k(rows: np.ndarray, imatrix=None) -> np.ndarray:
    d, dmin, scales, L = _encode_k(rows, imatrix, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)                        # 64-weight chunks: low nibble first 32, high next 32
    qs = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(-1, 128)
    return _rows_of([fp16_bytes(d), fp16_bytes(dmin), scales, qs], rows)


@register(T.Q5_K)
def encode_q5_k(rows: np.ndarray, imatrix=None) -> np.ndarray:
    d, dmin, scales, L = _encode_k(rows, imatrix, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 4, 2, 32)
    lo = L & 0xF
    qs = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(-1, 128)
    hb = (L >> 4).astype(np.uint8)                     # [nb, 4, 2, 32]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = np.bitwise_or.reduce((hb[:, :, 0, :] << shifts) | (hb[:, :, 1, :] << (shifts + 1)), axis=1)
    return _rows_of([fp16_bytes(d), fp16_bytes(dmin), scales, qh, qs], rows)
