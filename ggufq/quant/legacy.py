"""Legacy 32-weight block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), vectorised over all blocks.

Follows ggml-quants.c's ``quantize_row_*_ref`` (and, with an imatrix,
``quantize_row_q*_impl``). Without an imatrix, blocks go through in chunks held
transposed ``[32, n_blocks]``: the per-block max/min are then element-wise maxima
of 32 rows (a reduction along a 32-wide last axis is ~15x slower in NumPy), the
block scale broadcasts along rows, and the packed bytes are transposed back once.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, transpose_u8

QK8_0 = 32
QK = 32
F32 = np.float32
CHUNK_BLOCKS = 8192      # [32, 8192] float32 = 1 MiB per temporary
_HALF_BELOW = F32(0.49999997)   # the one float32 where floor(|x| + 0.5) != roundf(x): the sum rounds up to 1


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``"""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), in place on float32 ``v``."""
    a = np.abs(v)
    r = a + F32(0.5)
    np.floor(r, out=r)
    fix = a == _HALF_BELOW
    if fix.any():
        r[fix] = 0
    return np.copysign(r, v, out=r)


def _by_chunks(rows: np.ndarray, block_bytes: int, encode_T) -> np.ndarray:
    """Rows [n, k] -> bytes [n, k/32*block_bytes]; ``encode_T(xT [32, c], out [c, block_bytes])``."""
    blocks = rows.reshape(-1, QK)
    nb = blocks.shape[0]
    out = np.empty((nb, block_bytes), dtype=np.uint8)
    buf = np.empty(QK * min(nb, CHUNK_BLOCKS), dtype=F32)
    for lo in range(0, nb, CHUNK_BLOCKS):
        hi = min(nb, lo + CHUNK_BLOCKS)
        xT = buf[:QK * (hi - lo)].reshape(QK, hi - lo)
        np.copyto(xT, blocks[lo:hi].T)
        encode_T(xT, out[lo:hi])
    return out.reshape(rows.shape[0], rows.shape[1] // QK * block_bytes)


def _q8_0_T(xT: np.ndarray, out: np.ndarray) -> None:
    # block_q8_0 { ggml_half d; int8_t qs[32]; } ; d = amax/127, q = roundf(x/d)
    amax = np.maximum(xT.max(axis=0), -xT.min(axis=0))
    amax += F32(0)                                  # fabsf: +0, never -0
    d = amax / F32(127)
    v = xT * _inv(d)
    q = _roundf(v).astype(np.int8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:] = transpose_u8(q.view(np.uint8))


@register(T.Q8_0)
def encode_q8_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    return _by_chunks(rows, 2 + QK8_0, _q8_0_T)


# --- 4/5-bit legacy formats -------------------------------------------------
# block_q4_0 { half d; u8 qs[16]; }            block_q4_1 { half d; half m; u8 qs[16]; }
# block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }  block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }
# qs[j] holds weight j in the low nibble and weight j+16 in the high nibble;
# bit j of qh (little-endian uint32) is bit 4 of weight j.


def _trunc_codes(v: np.ndarray, hi: int) -> np.ndarray:
    """MIN(hi, (int8_t)v): C's truncating float -> int conversion, then the clamp."""
    return np.minimum(np.trunc(v), F32(hi)).astype(np.int32)


def _absmax_signed_T(xT: np.ndarray) -> np.ndarray:
    """The first value with the largest |x| in each column (ggml's ``if (amax < fabsf(v))`` scan)."""
    from .qx import _absmax_signed
    amax, mx = _absmax_signed(xT)
    mx[amax == 0] = 0                               # C's max stays 0.0f (+0) when no |v| > 0
    return mx


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """[nb, 32] codes -> [nb, 16] bytes: low nibble weight j, high nibble weight j+16."""
    L = L.astype(np.uint8)
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def _pack_qh(L: np.ndarray) -> np.ndarray:
    """[nb, 32] 5-bit codes -> [nb, 4] bytes of the little-endian uint32 of bit 4 per weight."""
    return np.packbits((L.astype(np.uint8) >> 4) & 1, axis=1, bitorder="little")


def _nibbles_T(LT: np.ndarray) -> np.ndarray:
    """Codes [32, nb] (uint8) -> qs [nb, 16]: low nibble weight j, high nibble weight j+16."""
    return transpose_u8((LT[:16] & 0xF) | (LT[16:] << 4))


def _qh_T(LT: np.ndarray) -> np.ndarray:
    """5-bit codes [32, nb] (uint8) -> qh [nb, 4]: bit j of the little-endian uint32 is bit 4 of weight j."""
    return transpose_u8(np.packbits((LT >> 4) & 1, axis=0, bitorder="little"))


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


def _symmetric_T(xT: np.ndarray, nmax: int):
    """quantize_row_q{4,5}_0_ref on blocks [32, nb]: (d [nb], codes uint8 [32, nb] in [0, 2*nmax-1])."""
    d = (_absmax_signed_T(xT) / F32(-nmax)).astype(F32)
    v = xT * _inv(d)
    v += F32(nmax + 0.5)
    np.clip(v, F32(0), F32(2 * nmax - 1), out=v)   # v >= 0.5: MIN(hi, (int8_t)v) == (int8_t)MIN(v, hi)
    return d, v.astype(np.int8).view(np.uint8)


def _asymmetric_T(xT: np.ndarray, nmax: int):
    """quantize_row_q{4,5}_1_ref on blocks [32, nb]: (d [nb], m [nb], codes uint8 [32, nb] in [0, nmax])."""
    mn = xT.min(axis=0)
    mx = xT.max(axis=0)
    z = np.flatnonzero((mn == 0) | (mx == 0))
    if z.size:                                      # C keeps the first of equal extremes: the sign of a zero
        sub = np.take(xT, z, axis=1)
        cols = np.arange(z.size)
        mn[z] = sub[np.argmin(sub, axis=0), cols]
        mx[z] = sub[np.argmax(sub, axis=0), cols]
    d = ((mx - mn) / F32(nmax)).astype(F32)
    v = xT - mn
    v *= _inv(d)
    v += F32(0.5)
    if nmax == 15:
        np.clip(v, F32(0), F32(nmax), out=v)      # Q4_1: MIN(15, (int8_t)v), v >= 0.5; Q5_1: no clamp
    return d, mn, v.astype(np.uint8)


def _symmetric(rows: np.ndarray, imatrix, nmax: int):
    """(d [nb], codes [nb, 32] in [0, 2*nmax-1]) for Q4_0 (nmax 8) / Q5_0 (nmax 16)."""
    blocks = rows.reshape(-1, QK)
    if imatrix is None:
        d, LT = _symmetric_T(np.ascontiguousarray(blocks.T), nmax)
        return d, np.ascontiguousarray(LT.T).astype(np.int32)
    from .qx import make_qx_quants
    w = _row_weights(rows, imatrix).reshape(-1, QK)
    d, L = make_qx_quants(blocks, nmax, 1, w)
    return d, L


def _asymmetric(rows: np.ndarray, imatrix, nmax: int):
    """(d [nb], m [nb], codes [nb, 32] in [0, nmax]) for Q4_1 (nmax 15) / Q5_1 (nmax 31)."""
    blocks = rows.reshape(-1, QK)
    if imatrix is None:
        d, m, LT = _asymmetric_T(np.ascontiguousarray(blocks.T), nmax)
        return d, m, np.ascontiguousarray(LT.T).astype(np.int32)
    from .qkx import make_qkx3_quants
    w = _row_weights(rows, imatrix).reshape(-1, QK)
    d, the_min, L = make_qkx3_quants(blocks, w, nmax, -0.9, 0.05, 36, False)
    return d, -the_min, L


def _q4_0_T(xT, out):
    d, LT = _symmetric_T(xT, 8)
    out[:, 0:2] = fp16_bytes(d)
    out[:, 2:18] = _nibbles_T(LT)


def _q5_0_T(xT, out):
    d, LT = _symmetric_T(xT, 16)
    out[:, 0:2] = fp16_bytes(d)
    out[:, 2:6] = _qh_T(LT)
    out[:, 6:22] = _nibbles_T(LT)


def _q4_1_T(xT, out):
    d, m, LT = _asymmetric_T(xT, 15)
    out[:, 0:2] = fp16_bytes(d)
    out[:, 2:4] = fp16_bytes(m)
    out[:, 4:20] = _nibbles_T(LT)


def _q5_1_T(xT, out):
    d, m, LT = _asymmetric_T(xT, 31)
    out[:, 0:2] = fp16_bytes(d)
    out[:, 2:4] = fp16_bytes(m)
    out[:, 4:8] = _qh_T(LT)
    out[:, 8:24] = _nibbles_T(LT)


@register(T.Q4_0)
def encode_q4_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_chunks(rows, 18, _q4_0_T)
    d, L = _symmetric(rows, imatrix, 8)
    return _assemble(rows, fp16_bytes(d), _pack_nibbles(L))


@register(T.Q5_0)
def encode_q5_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_chunks(rows, 22, _q5_0_T)
    d, L = _symmetric(rows, imatrix, 16)
    return _assemble(rows, fp16_bytes(d), _pack_qh(L), _pack_nibbles(L))


@register(T.Q4_1)
def encode_q4_1(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_chunks(rows, 20, _q4_1_T)
    d, m, L = _asymmetric(rows, imatrix, 15)
    return _assemble(rows, fp16_bytes(d), fp16_bytes(m), _pack_nibbles(L))


@register(T.Q5_1)
def encode_q5_1(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_chunks(rows, 24, _q5_1_T)
    d, m, L = _asymmetric(rows, imatrix, 31)
    return _assemble(rows, fp16_bytes(d), fp16_bytes(m), _pack_qh(L), _pack_nibbles(L))
