"""Q4_K and Q5_K: 256-weight super-blocks of 8 sub-blocks with a 6-bit scale and min each.

Follows ggml-quants.c: ``quantize_row_q{4,5}_K_ref`` without an imatrix
(make_qkx2_quants per sub-block, scales rounded against the largest) and
``quantize_row_q{4,5}_K_impl`` with one (make_qkx3_quants per sub-block,
make_qp_quants over the 8 scales and the 8 mins). Vectorised over every
sub-block of a chunk, held transposed ``[32, n_sub_blocks]`` from the weights
to the final codes.

block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }           144 bytes
block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; } 176 bytes
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import qkx, register
from .common import clip_ufunc, fp16_bytes, fp16_round, transpose_f32, transpose_u8
from .qkx import make_qkx_T
from .qx import make_qp_quants

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


def _block_scales_ref(scales: np.ndarray, mins: np.ndarray):
    """quantize_row_q{4,5}_K_ref's 6-bit scales: each sub-block's scale and min rounded against the
    largest of its super-block. scales/mins [nb, 8] -> (d [nb], dmin [nb], ls [nb, 8], lm [nb, 8])."""
    max_scale = _max0(scales)
    max_min = _max0(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(_nearest(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(_nearest(inv_min[:, None] * mins) & 0xFF, 63)
    d = (max_scale / F32(63)).astype(F32)
    dmin = (max_min / F32(63)).astype(F32)
    return d, dmin, ls, lm


def _max0(v: np.ndarray) -> np.ndarray:
    return np.maximum(v.max(axis=1), F32(0))


def _imatrix_weights_T(rows_c: np.ndarray, xT: np.ndarray, qwT: np.ndarray, out: np.ndarray):
    """quantize_row_q{4,5}_K_impl's weights qw * sqrt(sigma2 + x²), sigma2 = 2*sum(x²)/256 over the
    super-block (summed in C's order), for transposed groups ``xT [32, c]``; ``qwT`` [32, c]."""
    sup = transpose_f32(rows_c.reshape(-1, QK_K))          # [256, nb]: sequential sums
    sup *= sup
    sigma2 = F32(2) * np.add.reduce(sup, axis=0) / F32(QK_K)
    np.multiply(xT, xT, out=out)
    out += np.repeat(sigma2, 8)
    np.sqrt(out, out=out)
    out *= qwT
    return out


def _encode_k(rows: np.ndarray, imatrix, nmax: int, rmin: float, rdelta: float, nstep: int):
    """(d [nb], dmin [nb], packed scales [nb, 12], codes uint8 [nb*8, 32]) for Q4_K/Q5_K.

    Sub-blocks go through in chunks, held transposed ``[32, c]`` from the search to the
    final codes (weights, search, requantization), so each chunk is transposed once each way."""
    n, k = rows.shape
    g = rows.reshape(-1, 32)
    ng = g.shape[0]
    nb = ng // 8
    d = np.empty(nb, F32)
    dmin = np.empty(nb, F32)
    scales = np.empty((nb, 12), np.uint8)
    L = np.empty((ng, 32), np.uint8)
    step = max(8, qkx.CHUNK_GROUPS // 8 * 8)
    c0 = min(ng, step) * 32
    xbuf, wbuf = np.empty(c0, F32), np.empty(c0, F32)
    bufs = [np.empty(c0, F32) for _ in range(3)]
    qw_all = None if imatrix is None else np.ascontiguousarray(imatrix.reshape(-1, 32).T)   # [32, k/32]
    for lo in range(0, ng, step):
        hi = min(lo + step, ng)
        c = hi - lo
        xT = xbuf[:c * 32].reshape(32, c)
        np.copyto(xT, g[lo:hi].T)
        wT = wbuf[:c * 32].reshape(32, c)
        if imatrix is None:
            np.multiply(xT, xT, out=wT)
            av_x = np.sqrt(np.add.reduce(wT, axis=0) / F32(32))
            np.abs(xT, out=wT)
            wT += av_x
            s, mins, LT = make_qkx_T(xT, wT, nmax, rmin, rdelta, nstep, False, False, bufs)
            dc, dminc, ls, lm = _block_scales_ref(s.reshape(-1, 8), mins.reshape(-1, 8))
        else:
            qwT = np.take(qw_all, np.arange(lo, hi) % qw_all.shape[1], axis=1)
            _imatrix_weights_T(g[lo:hi], xT, qwT, wT)
            sw = np.add.reduce(wT, axis=0).reshape(-1, 8)
            s, mins, LT = make_qkx_T(xT, wT, nmax, -0.9, 0.05, 36, False, True, bufs)
            dc, ls = make_qp_quants(s.reshape(-1, 8), 63, sw)
            dminc, lm = make_qp_quants(mins.reshape(-1, 8), 63, sw)
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        b0, b1 = lo // 8, hi // 8
        packed = pack_scales_k4(ls, lm)
        sc, m = unpack_scales_k4(packed)
        d[b0:b1], dmin[b0:b1], scales[b0:b1] = dc, dminc, packed
        L[lo:hi] = transpose_u8(_requantize_T(xT, LT, dc, dminc, sc, m, nmax, bufs[0]))
    return d, dmin, scales, L


def _requantize_T(xT: np.ndarray, LT: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, m: np.ndarray,
                  nmax: int, buf: np.ndarray) -> np.ndarray:
    """The final pass: codes clamp(nearest_int((x + dmin*m) / (d*sc)), 0, nmax) from the stored (fp16)
    super scales and the integer sub scales, on transposed groups ``xT [32, c]``; sub-blocks whose
    scale is 0 keep the codes of the search ``LT``."""
    dd = (fp16_round(d)[:, None] * sc.astype(F32)).reshape(-1)
    dm = (fp16_round(dmin)[:, None] * m.astype(F32)).reshape(-1)
    ok = dd != 0
    q = np.add(xT, dm, out=buf[:xT.size].reshape(xT.shape))
    q /= np.where(ok, dd, F32(1))
    np.rint(q, out=q)
    clip_ufunc(q, F32(0), F32(nmax), out=q)
    out = q.astype(np.uint8)
    if not ok.all():
        bad = ~ok
        out[:, bad] = LT[:, bad]
    return out


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
