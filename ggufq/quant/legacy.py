"""Legacy 32-weight block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), vectorised over all blocks.

Follows ggml-quants.c's ``quantize_row_*_ref`` (and, with an imatrix,
``quantize_row_q*_impl``). Without an imatrix, blocks go through in chunks held
in a lane layout ``[8, 4 * n_blocks]`` (see ``_by_lanes``): the per-block max/min
are then element-wise maxima of 8 rows (a reduction along a 32-wide last axis is
~15x slower in NumPy), the block scale broadcasts along rows, and the packed
codes are written into the blocks by one strided uint32 copy.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, transpose_f32

QK8_0 = 32
QK = 32
F32 = np.float32
CHUNK_BLOCKS = 8192      # [32, 8192] float32 = 1 MiB per temporary
_HALF_BELOW = F32(0.49999997)   # the one float32 where floor(|x| + 0.5) != roundf(x): the sum rounds up to 1


def _inv(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``"""
    return np.divide(F32(1), d, out=np.zeros(d.shape, F32), where=d != 0)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), in place on float32 ``v``."""
    a = np.abs(v)
    r = a + F32(0.5)
    np.floor(r, out=r)
    fix = a == _HALF_BELOW
    if fix.any():
        r[fix] = 0
    return np.copysign(r, v, out=r)


# --- lane layout (no imatrix) -------------------------------------------------
# A chunk of c blocks [c, 32] is held as X [8, 4c] float32: row r, column 4b + l is weight
# 4r + l of block b. Moving 16-byte lanes (four weights) costs about 0.4 ns per weight
# against 1 ns for a float-by-float transpose; per-block extremes are element-wise
# maxima of 8 rows and then of 4 lanes, block scales broadcast along rows repeated 4x,
# and the codes, viewed as uint32 [8, c], are one lane per block and row: qs (weights j,
# j+16) is rows r and r+4, qh gathers bit 4 of each byte by a multiply.

_LANE = np.dtype("V16")
_BYTE1 = np.uint32(0x01010101)
_NIB = np.uint32(0x0F0F0F0F)
_GATHER4 = np.uint32(0x00204081)      # bits 4, 12, 20, 28 -> bits 25..28 (no carries)
_BIT4 = np.uint32(0x10101010)
_ROW_SHIFT = np.arange(0, 32, 4, dtype=np.uint32)[:, None]


def _fields(*names_fmts) -> np.dtype:
    return np.dtype({"names": [n for n, _ in names_fmts], "formats": [f for _, f in names_fmts]})


class _Chunk:
    """Blocks ``lo:hi`` of the output: ``rec`` the records, ``words(name)`` a field as uint32 [size/4, c]."""

    def __init__(self, out: np.ndarray, block: np.dtype, lo: int, hi: int):
        self.out, self.block, self.lo, self.hi = out, block, lo, hi
        self.rec = out[lo:hi].reshape(-1).view(block)

    def put_half(self, name: str, v: np.ndarray) -> None:
        """float32 [c] -> the fp16 field (one contiguous cast, then a strided 2-byte copy)."""
        off = self.block.fields[name][1]
        dst = np.ndarray((self.hi - self.lo,), dtype="<u2", buffer=self.out,
                         offset=self.lo * self.block.itemsize + off, strides=(self.block.itemsize,))
        np.copyto(dst, v.astype(np.float16).view(np.uint16))

    def words(self, name: str) -> np.ndarray:
        fmt, off = self.block.fields[name][:2]
        # unaligned uint32 view straight into the records: the lane -> block transpose is this copy
        return np.ndarray((fmt.itemsize // 4, self.hi - self.lo), dtype="<u4", buffer=self.out,
                          offset=self.lo * self.block.itemsize + off, strides=(4, self.block.itemsize))


class _Lanes:
    """Work buffers of one chunk of ``c`` blocks: ``X`` [8, 4c] the weights in the lane layout (overwritten by
    the encoders), ``E`` [2, 4c] per-lane extremes, ``R`` [2, c, 4] block values repeated over their 4 lanes,
    ``U`` [8, 4c] the codes as bytes."""

    def __init__(self, c: int):
        self.X = np.empty((8, 4 * c), F32)
        self.E = np.empty((2, 4 * c), F32)
        self.R = np.empty((2, c, 4), F32)
        self.U = np.empty((8, 4 * c), np.uint8)

    def load(self, blocks: np.ndarray) -> "_Lanes":
        """Blocks [c', 32] (c' <= c) into ``X``; the buffers are cut to c' blocks."""
        n = blocks.shape[0]
        if n != self.R.shape[1]:
            self.X, self.E, self.R, self.U = (self.X[:, :4 * n], self.E[:, :4 * n], self.R[:, :n],
                                              self.U[:, :4 * n])
        np.copyto(self.X.view(_LANE), blocks.view(_LANE).T)
        return self

    def extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """(max [c], min [c]) of each block."""
        E = self.E
        np.maximum.reduce(self.X, axis=0, out=E[0])
        np.minimum.reduce(self.X, axis=0, out=E[1])
        a = E.reshape(2, -1, 4)
        hi = np.maximum(a[0, :, 0], a[0, :, 1])
        np.maximum(hi, a[0, :, 2], out=hi)
        np.maximum(hi, a[0, :, 3], out=hi)
        lo = np.minimum(a[1, :, 0], a[1, :, 1])
        np.minimum(lo, a[1, :, 2], out=lo)
        np.minimum(lo, a[1, :, 3], out=lo)
        return hi, lo

    def repeat(self, i: int, v: np.ndarray) -> np.ndarray:
        """Block values [c] -> [4c], each over its block's 4 lanes (four strided copies: np.repeat is ~2x slower)."""
        r = self.R[i]
        for j in range(4):
            r[:, j] = v
        return r.reshape(-1)

    def codes(self) -> np.ndarray:
        """(int8_t) of ``X`` (in [0, 256)) as bytes, viewed as uint32 [8, c]: one lane per block and row."""
        np.copyto(self.U, self.X, casting="unsafe")
        return self.U.view(np.uint32)


def _by_lanes(rows: np.ndarray, block: np.dtype, encode_X) -> np.ndarray:
    """Rows [n, k] -> bytes [n, k/32*block.itemsize]; ``encode_X(lanes, blocks [c, 32], chunk)``."""
    rows = np.ascontiguousarray(rows, dtype=F32)
    blocks = rows.reshape(-1, QK)
    nb = blocks.shape[0]
    out = np.empty((nb, block.itemsize), dtype=np.uint8)
    work = _Lanes(min(nb, CHUNK_BLOCKS))
    for lo in range(0, nb, CHUNK_BLOCKS):
        hi = min(nb, lo + CHUNK_BLOCKS)
        encode_X(work.load(blocks[lo:hi]), blocks[lo:hi], _Chunk(out, block, lo, hi))
    return out.reshape(rows.shape[0], rows.shape[1] // QK * block.itemsize)


def _lanes_of(blocks: np.ndarray) -> _Lanes:
    """Blocks [c, 32] -> their lanes (one chunk, for callers outside ``_by_lanes``)."""
    blocks = np.ascontiguousarray(blocks, dtype=F32)
    return _Lanes(blocks.shape[0]).load(blocks)


def _codes_of(L32: np.ndarray) -> np.ndarray:
    """Codes as uint32 [8, c] -> int32 [c, 32] in weight order."""
    return np.ascontiguousarray(L32.T).view(np.uint8).reshape(-1, QK).astype(np.int32)


def _saturate(L32: np.ndarray, bit: int) -> np.ndarray:
    """Bytes of ``L32`` in [0, 2**bit] -> MIN(2**bit - 1, byte), in place."""
    t = np.right_shift(L32, np.uint32(bit))
    t &= _BYTE1
    L32 -= t
    return L32


def _put_qs(chunk: _Chunk, L32: np.ndarray) -> None:
    """Codes as uint32 [8, c] (bytes < 16) -> qs: weight j in the low, weight j+16 in the high nibble."""
    q = L32[4:] << np.uint32(4)
    q |= L32[:4]
    np.copyto(chunk.words("qs"), q)


def _qh_X(L32: np.ndarray) -> np.ndarray:
    """5-bit codes as uint32 [8, c] -> qh uint32 [c]: bit j is bit 4 of weight j."""
    h = L32 & _BIT4
    h *= _GATHER4                        # bits 4, 12, 20, 28 -> 25, 26, 27, 28 (nothing else above 24)
    h >>= np.uint32(25)
    h <<= _ROW_SHIFT                     # row r: bits 4r..4r+3 = weights 4r..4r+3
    return np.bitwise_or.reduce(h, axis=0)


def _q8_0_X(w, blocks, chunk):
    # block_q8_0 { ggml_half d; int8_t qs[32]; } ; d = amax/127, q = roundf(x/d)
    hi, lo = w.extremes()
    np.negative(lo, out=lo)
    amax = np.maximum(hi, lo)
    amax += F32(0)                                  # fabsf: +0, never -0
    d = amax / F32(127)
    X = w.X
    np.multiply(X, w.repeat(0, _inv(d)), out=X)
    q = _roundf(X).astype(np.int8)
    chunk.put_half("d", d)
    np.copyto(chunk.words("qs"), q.view(np.uint32))


_Q8_0 = _fields(("d", "<f2"), ("qs", "V32"))


@register(T.Q8_0)
def encode_q8_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    return _by_lanes(rows, _Q8_0, _q8_0_X)


# --- 4/5-bit legacy formats -------------------------------------------------
# block_q4_0 { half d; u8 qs[16]; }            block_q4_1 { half d; half m; u8 qs[16]; }
# block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }  block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }
# qs[j] holds weight j in the low nibble and weight j+16 in the high nibble;
# bit j of qh (little-endian uint32) is bit 4 of weight j.


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """[nb, 32] codes -> [nb, 16] bytes: low nibble weight j, high nibble weight j+16."""
    L = L.astype(np.uint8)
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def _pack_qh(L: np.ndarray) -> np.ndarray:
    """[nb, 32] 5-bit codes -> [nb, 4] bytes of the little-endian uint32 of bit 4 per weight."""
    return np.packbits((L.astype(np.uint8) >> 4) & 1, axis=1, bitorder="little")


def _assemble(rows: np.ndarray, *cols: np.ndarray) -> np.ndarray:
    """Block columns [nb, ...] -> bytes [n_rows, row_nbytes] (also for zero rows)."""
    blk = np.concatenate(cols, axis=1)
    return blk.reshape(rows.shape[0], rows.shape[1] // QK * blk.shape[1])


def _row_weights(rows: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """ggml's legacy imatrix weights: qw * sqrtf(sigma2 + x^2), sigma2 = sum(x^2)/n_per_row per row."""
    k = rows.shape[1]
    sq = rows * rows
    sum_x2 = np.add.reduce(transpose_f32(sq), axis=0)   # sequential, as the C loop
    sigma2 = sum_x2 / F32(k)
    return (imatrix[None, :] * np.sqrt(sigma2[:, None] + sq)).astype(F32)


def _symmetric(rows: np.ndarray, imatrix, nmax: int):
    """(d [nb], codes [nb, 32] in [0, 2*nmax-1]) for Q4_0 (nmax 8) / Q5_0 (nmax 16)."""
    blocks = rows.reshape(-1, QK)
    if imatrix is None:
        d, L32 = _symmetric_X(_lanes_of(blocks), blocks, nmax)
        return d, _codes_of(L32)
    from .qx import make_qx_quants
    w = _row_weights(rows, imatrix).reshape(-1, QK)
    d, L = make_qx_quants(blocks, nmax, 1, w)
    return d, L


def _asymmetric(rows: np.ndarray, imatrix, nmax: int):
    """(d [nb], m [nb], codes [nb, 32] in [0, nmax]) for Q4_1 (nmax 15) / Q5_1 (nmax 31)."""
    blocks = rows.reshape(-1, QK)
    if imatrix is None:
        d, m, L32 = _asymmetric_X(_lanes_of(blocks), blocks, nmax)
        return d, m, _codes_of(L32)
    from .qkx import make_qkx3_quants
    w = _row_weights(rows, imatrix).reshape(-1, QK)
    d, the_min, L = make_qkx3_quants(blocks, w, nmax, -0.9, 0.05, 36, False)
    return d, -the_min, L


def _symmetric_X(w: _Lanes, blocks: np.ndarray, nmax: int):
    """quantize_row_q{4,5}_0_ref in the lane layout: (d [c], codes as uint32 [8, c], bytes in [0, 2*nmax-1])."""
    hi, neg = w.extremes()
    np.negative(neg, out=neg)                       # -min
    mx = np.where(hi >= neg, hi, -neg)
    mx += F32(0)                                    # C's max stays 0.0f (+0) when no |v| > 0
    tie = hi == neg
    tie &= hi > 0
    if tie.any():                                   # +amax and -amax: C keeps the first
        both = np.flatnonzero(tie)
        sub = blocks[both]
        mx[both] = sub[np.arange(both.size), np.argmax(np.abs(sub), axis=1)]
    d = mx / F32(-nmax)
    X = w.X
    np.multiply(X, w.repeat(0, _inv(d)), out=X)
    np.add(X, F32(nmax + 0.5), out=X)               # in [0.5, 2*nmax + 0.5]: (int8_t)v is in [0, 2*nmax]
    return d, _saturate(w.codes(), 4 if nmax == 8 else 5)  # MIN(2*nmax - 1, (int8_t)v)


def _asymmetric_X(w: _Lanes, blocks: np.ndarray, nmax: int):
    """quantize_row_q{4,5}_1_ref in the lane layout: (d [c], m [c], codes as uint32 [8, c], bytes in [0, nmax])."""
    mx, mn = w.extremes()
    z = np.flatnonzero((mn == 0) | (mx == 0))
    if z.size:                                      # C keeps the first of equal extremes: the sign of a zero
        sub = blocks[z]
        cols = np.arange(z.size)
        mn[z] = sub[cols, np.argmin(sub, axis=1)]
        mx[z] = sub[cols, np.argmax(sub, axis=1)]
    d = ((mx - mn) / F32(nmax)).astype(F32)
    X = w.X
    np.subtract(X, w.repeat(0, mn), out=X)
    np.multiply(X, w.repeat(1, _inv(d)), out=X)
    np.add(X, F32(0.5), out=X)                      # in [0.5, nmax + 0.5]
    L32 = w.codes()
    if nmax == 15:
        _saturate(L32, 4)                           # Q4_1: MIN(15, (int8_t)v); Q5_1: no clamp
    return d, mn, L32


def _q4_0_X(X, blocks, chunk):
    d, L32 = _symmetric_X(X, blocks, 8)
    chunk.put_half("d", d)
    _put_qs(chunk, L32)


def _q5_0_X(X, blocks, chunk):
    d, L32 = _symmetric_X(X, blocks, 16)
    chunk.put_half("d", d)
    chunk.rec["qh"] = _qh_X(L32)
    _put_qs(chunk, L32 & _NIB)


def _q4_1_X(X, blocks, chunk):
    d, m, L32 = _asymmetric_X(X, blocks, 15)
    chunk.put_half("d", d)
    chunk.put_half("m", m)
    _put_qs(chunk, L32)


def _q5_1_X(X, blocks, chunk):
    d, m, L32 = _asymmetric_X(X, blocks, 31)
    chunk.put_half("d", d)
    chunk.put_half("m", m)
    chunk.rec["qh"] = _qh_X(L32)
    _put_qs(chunk, L32 & _NIB)


_Q4_0 = _fields(("d", "<f2"), ("qs", "V16"))
_Q5_0 = _fields(("d", "<f2"), ("qh", "<u4"), ("qs", "V16"))
_Q4_1 = _fields(("d", "<f2"), ("m", "<f2"), ("qs", "V16"))
_Q5_1 = _fields(("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "V16"))


@register(T.Q4_0)
def encode_q4_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_lanes(rows, _Q4_0, _q4_0_X)
    d, L = _symmetric(rows, imatrix, 8)
    return _assemble(rows, fp16_bytes(d), _pack_nibbles(L))


@register(T.Q5_0)
def encode_q5_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_lanes(rows, _Q5_0, _q5_0_X)
    d, L = _symmetric(rows, imatrix, 16)
    return _assemble(rows, fp16_bytes(d), _pack_qh(L), _pack_nibbles(L))


@register(T.Q4_1)
def encode_q4_1(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_lanes(rows, _Q4_1, _q4_1_X)
    d, m, L = _asymmetric(rows, imatrix, 15)
    return _assemble(rows, fp16_bytes(d), fp16_bytes(m), _pack_nibbles(L))


@register(T.Q5_1)
def encode_q5_1(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        return _by_lanes(rows, _Q5_1, _q5_1_X)
    d, m, L = _asymmetric(rows, imatrix, 31)
    return _assemble(rows, fp16_bytes(d), fp16_bytes(m), _pack_qh(L), _pack_nibbles(L))
