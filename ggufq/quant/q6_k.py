"""Q6_K: 256-weight super-blocks of 16 groups x 16, 6-bit codes, int8 group scales.

Follows ggml-quants.c: ``quantize_row_q6_K_ref`` without an imatrix and
``quantize_row_q6_K_impl`` with one (make_qx_quants(16, 32, ..., rmse_type 1)
per group, weighted by the imatrix slice). Vectorised over all blocks of a
chunk; groups are held transposed ``[16, n_groups]`` (see :mod:`.qx`).

block_q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; ggml_half d; } (210 bytes)
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import clip_ufunc, fp16_bytes, fp16_round, transpose_f32, transpose_u8
from .qx import _BIAS, _MAGIC, _MANT, CHUNK_GROUPS, F32, GROUP_MAX_EPS, make_qx_quants_T, nearest_int_exact

QK_K = 256
BLOCK_BYTES = 210
_NIB = np.uint64(0x0F0F0F0F0F0F0F0F)
_BYTE3 = np.uint64(0x0303030303030303)


def _chunk_imatrix(imatrix: Optional[np.ndarray], k: int, b_lo: int, b_hi: int) -> Optional[np.ndarray]:
    """Per-weight importance for blocks [b_lo, b_hi) of the flattened rows, as [n_blocks, 256]."""
    if imatrix is None:
        return None
    nb = k // QK_K
    return imatrix.reshape(nb, QK_K)[np.arange(b_lo, b_hi) % nb]


def group_T(a: np.ndarray) -> np.ndarray:
    """[n_blocks, 256] -> transposed groups [16, n_blocks*16] (group g = block*16 + j)."""
    return transpose_f32(a.reshape(-1, 16))


def requantize(xT: np.ndarray, dq: np.ndarray, LT: np.ndarray, nmax: int) -> np.ndarray:
    """Codes ``clamp(nearest_int(x/dq), -nmax, nmax-1) + nmax`` as uint8 [n_blocks, 256].

    ``xT`` [16, n_groups] transposed groups, ``dq`` [n_groups] the effective group
    scales; where one is 0, the group keeps its codes from the search, ``LT``
    [16, n_groups]. Computed transposed (the scales broadcast along rows) with
    nearest_int's own bit trick (``bits(v + 12582912.f) & 0x7FFFFF`` is
    ``nearest_int(v) + 0x400000``, clamped and shifted as integers), then
    transposed back once, four rows per 32-bit word.
    """
    ok = dq != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = xT / np.where(ok, dq, F32(1))
    q += _MAGIC
    m = q.view(np.int32)
    m &= _MANT
    clip_ufunc(m, np.int32(_BIAS - nmax), np.int32(_BIAS + nmax - 1), out=m)
    m -= np.int32(_BIAS - nmax)                         # l + nmax, in [0, 2*nmax)
    if not ok.all():
        keep = ~ok
        m[:, keep] = LT[:, keep]
    if not np.little_endian:
        return transpose_u8(m.astype(np.uint8)).reshape(-1, QK_K)
    r = m.reshape(4, 4, -1)                             # word a of a group's 16 bytes: rows 4a .. 4a+3
    u = r[:, 3] << 24
    u |= r[:, 2] << 16
    u |= r[:, 1] << 8
    u |= r[:, 0]
    return np.ascontiguousarray(u.T).view(np.uint8).reshape(-1, QK_K)


def _encode_blocks(xb: np.ndarray, qw: Optional[np.ndarray]) -> np.ndarray:
    nblk = xb.shape[0]
    xT = group_T(xb)
    wT = None if qw is None else group_T(qw)
    scale, LT = make_qx_quants_T(xT, 32, 1, wT)
    scales = scale.reshape(nblk, 16)

    # block scale from the group scale with the largest magnitude (first one on ties)
    idx = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(nblk), idx]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
    d = F32(1) / iscale
    sc = np.minimum(127, nearest_int_exact(iscale[:, None] * scales)).astype(np.int8)

    # requantize with the stored (fp16) scales;
    # groups whose scale is 0 keep the search codes
    dq = fp16_round(d)[:, None] * sc.astype(F32)
    L = requantize(xT, dq.reshape(-1), LT, 32)
    # on 64-bit words, eight codes each (the shifts stay within a byte after the masks):
    # ql[h*64 + q*32 + l] = L[q] & 15 | (L[q+2] & 15) << 4, qh[h*32 + l] = sum_q (L[q] >> 4) << 2q
    Lw = L.view(np.uint64).reshape(nblk, 2, 4, 4)       # [block, half, quarter, word of l]
    lo4 = Lw & _NIB
    ql = lo4[:, :, 2:4] << np.uint64(4)
    ql |= lo4[:, :, 0:2]
    hi2 = Lw >> np.uint64(4)
    hi2 &= _BYTE3
    hi2[:, :, 1] <<= np.uint64(2)
    hi2[:, :, 2] <<= np.uint64(4)
    hi2[:, :, 3] <<= np.uint64(6)
    qh = hi2[:, :, :2] | hi2[:, :, 2:]
    qh = qh[:, :, 0] | qh[:, :, 1]

    out = np.empty((nblk, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql.view(np.uint8).reshape(nblk, 128)
    out[:, 128:192] = qh.view(np.uint8).reshape(nblk, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = fp16_bytes(d)
    out[zero] = 0
    return out


def encode_blocks_chunked(rows: np.ndarray, imatrix: Optional[np.ndarray], block_bytes: int,
                          encode_blocks) -> np.ndarray:
    """Rows [n, k] -> bytes [n, k/256*block_bytes], encoding CHUNK_GROUPS/16 super-blocks at a time
    with ``encode_blocks(blocks [b, 256], importance [b, 256] | None) -> uint8 [b, block_bytes]``."""
    n, k = rows.shape
    blocks = rows.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], block_bytes), dtype=np.uint8)
    step = max(1, CHUNK_GROUPS // 16)
    for lo in range(0, blocks.shape[0], step):
        hi = min(lo + step, blocks.shape[0])
        out[lo:hi] = encode_blocks(blocks[lo:hi], _chunk_imatrix(imatrix, k, lo, hi))
    return out.reshape(n, k // QK_K * block_bytes)


@register(T.Q6_K)
def encode_q6_k(rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    return encode_blocks_chunked(rows, imatrix, BLOCK_BYTES, _encode_blocks)
