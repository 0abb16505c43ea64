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
from .common import fp16_bytes, fp16_round, transpose_u8
from .qx import CHUNK_GROUPS, F32, GROUP_MAX_EPS, make_qx_quants_T, nearest_f, nearest_int_exact

QK_K = 256
BLOCK_BYTES = 210


def _chunk_imatrix(imatrix: Optional[np.ndarray], k: int, b_lo: int, b_hi: int) -> Optional[np.ndarray]:
    """Per-weight importance for blocks [b_lo, b_hi) of the flattened rows, as [n_blocks, 256]."""
    if imatrix is None:
        return None
    nb = k // QK_K
    return imatrix.reshape(nb, QK_K)[np.arange(b_lo, b_hi) % nb]


def group_T(a: np.ndarray) -> np.ndarray:
    """[n_blocks, 256] -> transposed groups [16, n_blocks*16] (group g = block*16 + j)."""
    return np.ascontiguousarray(a.reshape(-1, 16).T)


def requantize(xT: np.ndarray, dq: np.ndarray, LT: np.ndarray, nmax: int) -> np.ndarray:
    """Codes ``clamp(nearest_int(x/dq), -nmax, nmax-1) + nmax`` as uint8 [n_blocks, 256].

    ``xT`` [16, n_groups] transposed groups, ``dq`` [n_groups] the effective group
    scales; where one is 0, the group keeps its codes from the search, ``LT``
    [16, n_groups]. Computed transposed (the scales broadcast along rows), then
    transposed back once, as bytes.
    """
    ok = dq != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = xT / np.where(ok, dq, F32(1))
    r = nearest_f(q, F32(-nmax), F32(nmax - 1), np.empty_like(q))
    r += F32(nmax)
    L = r.astype(np.uint8)
    if not ok.all():
        keep = ~ok
        L[:, keep] = LT[:, keep].astype(np.uint8)
    return transpose_u8(L).reshape(-1, QK_K)


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
    L = L.reshape(nblk, 2, 4, 32)                        # [block, half, quarter, l]
    lo4 = L & 0xF
    ql = lo4[:, :, 0:2] | (lo4[:, :, 2:4] << 4)          # ql[h*64 + q*32 + l] = L[q] | L[q+2] << 4
    hi2 = L >> 4
    qh = hi2[:, :, 0] | (hi2[:, :, 1] << 2) | (hi2[:, :, 2] << 4) | (hi2[:, :, 3] << 6)

    out = np.empty((nblk, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(nblk, 128)
    out[:, 128:192] = qh.reshape(nblk, 64)
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
