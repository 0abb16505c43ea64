"""Legacy 32-weight block formats (Q8_0, ...), vectorised over all blocks.

Follows ggml-quants.c's ``quantize_row_*_ref``. Each encoder reshapes rows into
blocks ``[n_blocks, 32]`` and builds the block struct bytes column-wise.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, roundf

QK8_0 = 32


@register(T.Q8_0)
def encode_q8_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    # block_q8_0 { ggml_half d; int8_t qs[32]; } ; d = amax/127, q = roundf(x/d)
    n, k = rows.shape
    blocks = rows.reshape(-1, QK8_0)
    amax = np.abs(blocks).max(axis=1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = roundf(blocks * inv[:, None]).astype(np.int8)
    out = np.empty((blocks.shape[0], 2 + QK8_0), dtype=np.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(n, k // QK8_0 * (2 + QK8_0))


# --- 4/5-bit legacy formats -------------------------------------------------
# block_q4_0 { half d; u8 qs[16]; }            block_q4_1 { half d; half m; u8 qs[16]; }
# block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }  block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }
# qs[j] holds weight j in the low nibble and weight j+16 in the high nibble;
# bit j of qh (little-endian uint32) is bit 4 of weight j.

QK = 32
F32 = np.float32


def _trunc_codes(v: np.ndarray, hi: int) -> np.ndarray:
    """MIN(hi, (int8_t)v): C's truncating float -> int conversion, then the clamp."""
    return np.minimum(np.trunc(v), F32(hi)).astype(np.int32)


def _absmax_signed(blocks: np.ndarray) -> np.ndarray:
    """The first value with the largest |x| in each block (ggml's ``if (amax < fabsf(v))`` scan)."""
    idx = np.abs(blocks).argmax(axis=1)
    return blocks[np.arange(blocks.shape[0]), idx]


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """[nb, 32] codes -> [nb, 16] bytes: low nibble weight j, high nibble weight j+16."""
    L = L.astype(np.uint8)
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def _pack_qh(L: np.ndarray) -> np.ndarray:
    """[nb, 32] 5-bit codes -> [nb, 4] bytes of the little-endian uint32 of bit 4 per weight."""
    bits = ((L.astype(np.uint32) >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _assemble(rows: np.ndarray, *cols: np.ndarray) -> np.ndarray:
    """Block columns [nb, ...] -> bytes [n_rows, row_nbytes] (also for zero rows)."""
    blk = np.concatenate(cols, axis=1)
    return blk.reshape(rows.shape[0], rows.shape[1] // QK * blk.shape[1])


def _row_weights(rows: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """ggml's legacy imatrix weights: qw * sqrtf(sigma2 + x^2), sigma2 = sum(x^2)/n_per_row per row."""
    n, k = rows.shape
    sq = rows * rows
    sum_x2 = np.add.reduce(np.ascontiguousarray(sq.T), axis=0)   # sequential, as the C loop
    sigma2 = sum_x2 / F32(k)
    return (imatrix[None, :] * np.sqrt(sigma2[:, None] + sq)).astype(F32)


def _symmetric(rows: np.ndarray, imatrix, nmax: int):
    """(d [nb], codes [nb, 32] in [0, 2*nmax-1]) for Q4_0 (nmax 8) / Q5_0 (nmax 16)."""
    blocks = rows.reshape(-1, QK)
    if imatrix is None:
        mx = _absmax_signed(blocks)
        d = (mx / F32(-nmax)).astype(F32)
        L = _trunc_codes(blocks * _inv(d)[:, None] + F32(nmax + 0.5), 2 * nmax - 1)
        return d, L
    from .qx import make_qx_quants
    w = _row_weights(rows, imatrix).reshape(-1, QK)
    d, L = make_qx_quants(blocks, nmax, 1, w)
    return d, L


def _asymmetric(rows: np.ndarray, imatrix, nmax: int):
    """(d [nb], m [nb], codes [nb, 32] in [0, nmax]) for Q4_1 (nmax 15) / Q5_1 (nmax 31)."""
    blocks = rows.reshape(-1, QK)
    if imatrix is None:
        mn = blocks.min(axis=1)
        mx = blocks.max(axis=1)
        d = ((mx - mn) / F32(nmax)).astype(F32)
        L = _trunc_codes((blocks - mn[:, None]) * _inv(d)[:, None] + F32(0.5), nmax)
        return d, mn, L
    from .qkx import make_qkx3_quants
    w = _row_weights(rows, imatrix).reshape(-1, QK)
    d, the_min, L = make_qkx3_quants(blocks, w, nmax, -0.9, 0.05, 36, False)
    return d, -the_min, L


@register(T.Q4_0)
def encode_q4_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    d, L = _symmetric(rows, imatrix, 8)
    return _assemble(rows, fp16_bytes(d), _pack_nibbles(L))


@register(T.Q5_0)
def encode_q5_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    d, L = _symmetric(rows, imatrix, 16)
    return _assemble(rows, fp16_bytes(d), _pack_qh(L), _pack_nibbles(L))


@register(T.Q4_1)
def encode_q4_1(rows: np.ndarray, imatrix=None) -> np.ndarray:
    d, m, L = _asymmetric(rows, imatrix, 15)
    return _assemble(rows, fp16_bytes(d), fp16_bytes(m), _pack_nibbles(L))


@register(T.Q5_1)
def encode_q5_1(rows: np.ndarray, imatrix=None) -> np.ndarray:
    d, m, L = _asymmetric(rows, imatrix, 31)
    return _assemble(rows, fp16_bytes(d), fp16_bytes(m), _pack_qh(L), _pack_nibbles(L))
