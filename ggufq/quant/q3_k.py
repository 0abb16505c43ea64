"""Q3_K: 256-weight super-blocks of 16 groups x 16, 3-bit codes, 6-bit group scales.

Follows ggml-quants.c: ``quantize_row_q3_K_ref`` without an imatrix
(make_q3_quants per group, block scale from the largest group scale) and
``quantize_row_q3_K_impl`` with one (make_qx_quants per group weighted by
``imatrix * sqrt(sigma2 + x²)``, then make_qx_quants over the 16 group scales).
Vectorised over all blocks of a chunk; groups are held transposed
``[16, n_groups]`` (see :mod:`.qx`).

block_q3_K { uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; ggml_half d; } (110 bytes)
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, fp16_round, transpose_f32
from .q6_k import encode_blocks_chunked, group_T, requantize
from .qx import F32, make_q3_quants_T, make_qx_quants_T, nearest_int_exact

QK_K = 256
BLOCK_BYTES = 110
_BYTE1 = np.uint64(0x0101010101010101)
_BYTE3 = np.uint64(0x0303030303030303)
_BIT_OF_CHUNK = np.arange(8, dtype=np.uint64)[None, :, None]
_SHIFT_OF_QUARTER = np.arange(0, 8, 2, dtype=np.uint64)[None, None, :, None]


def _pack_scales(ls: np.ndarray) -> np.ndarray:
    """6-bit scales [n, 16] (0..63) -> the 12-byte layout: low nibbles in 0..7, high 2 bits in 8..11."""
    ls = ls.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    h = (ls >> 4).reshape(-1, 4, 4)                     # [n, j//4, j%4]
    out[:, 8:12] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return out


def _encode_blocks(xb: np.ndarray, qw: Optional[np.ndarray]) -> np.ndarray:
    nblk = xb.shape[0]
    xT = group_T(xb)
    if qw is None:
        scale, LT = make_q3_quants_T(xT, 4, True)
        scales = scale.reshape(nblk, 16)
        idx = np.argmax(np.abs(scales), axis=1)
        max_scale = scales[np.arange(nblk), idx]
        nonzero = max_scale != 0
        with np.errstate(divide="ignore"):
            iscale = F32(-32) / np.where(nonzero, max_scale, F32(1))
        ls = np.clip(nearest_int_exact(iscale[:, None] * scales), -32, 31) + 32
        ls[~nonzero] = 0
        d = np.where(nonzero, F32(1) / iscale, F32(0)).astype(F32)
    else:
        # sigma2 = 2 * sum(x²) / 256, summed in C's order
        xbT = transpose_f32(xb)            # axis-0 sums are sequential only on contiguous data
        sigma2 = (F32(2) * np.add.reduce(xbT * xbT, axis=0)) / F32(QK_K)
        s2g = np.repeat(sigma2, 16)                          # per group
        wT = group_T(qw) * np.sqrt(s2g + xT * xT)
        sw = np.add.reduce(wT, axis=0)
        scale, LT = make_qx_quants_T(xT, 4, 1, wT)
        d, LsT = make_qx_quants_T(np.ascontiguousarray(scale.reshape(nblk, 16).T), 32, 1,
                                  np.ascontiguousarray(sw.reshape(nblk, 16).T))
        ls = LsT.T.astype(np.int32)

    # requantize with the stored scales; groups whose scale is 0 keep the search codes
    sc = (ls - 32).astype(F32)
    L = requantize(xT, (fp16_round(d)[:, None] * sc).reshape(-1), LT, 4)
    # bit fields on 64-bit words (eight codes each): hmask[m] bit b <- L[32*b + m] > 3 (bit 2 of
    # the code), qs[h*32 + l] <- sum_q (L[h*128 + q*32 + l] & 3) << 2q
    Lw = L.view(np.uint64).reshape(nblk, 8, 4)
    hb = Lw >> np.uint64(2)
    hb &= _BYTE1
    hb <<= _BIT_OF_CHUNK
    hb = hb[:, :4] | hb[:, 4:]                           # or over the 8 chunks as a tree (a reduce over
    hb = hb[:, :2] | hb[:, 2:]                           # a middle axis of 8 is ~5x slower)
    hmask = hb[:, 0] | hb[:, 1]
    lw = Lw & _BYTE3
    lw = lw.reshape(nblk, 2, 4, 4)
    lw <<= _SHIFT_OF_QUARTER
    lw = lw[:, :, :2] | lw[:, :, 2:]
    qs = lw[:, :, 0] | lw[:, :, 1]

    out = np.empty((nblk, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:32] = hmask.view(np.uint8)
    out[:, 32:96] = qs.view(np.uint8).reshape(nblk, 64)
    out[:, 96:108] = _pack_scales(ls)
    out[:, 108:110] = fp16_bytes(d)
    return out


@register(T.Q3_K)
def encode_q3_k(rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    return encode_blocks_chunked(rows, imatrix, BLOCK_BYTES, _encode_blocks)
