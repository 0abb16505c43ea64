"""Error-feedback rounding (GPTQ) into the IQ1_S and IQ1_M codebooks.

As :mod:`ggufq.quant.iq2_gptq`, units of 8 weights sharing one point of the 2048-point grid of
levels {-1, 0, 1}, decoded as ``dl * (grid[j] + delta)`` with ``delta = ±1/8`` (IQ1_S: one sign per
32 weights, IQ1_M: one per 8) and ``dl`` the block scale (``d * (2 ls + 1)``, per 32 weights in
IQ1_S, per 16 in IQ1_M). There are no sign bits: the grid holds the signs.

``start`` (the ggml-identical encoder, weighted by ``diag(H)``, on the super-block's columns as
updated so far) fixes ``d``, the 3-bit scales and every delta sign; the feedback then re-chooses
the grid index of each unit over the whole grid, minimising ``(w - q) M (w - q)^T`` with
``M = U_JJ^-1 U_JJ^-T`` (``U`` the upper Cholesky factor of ``H^-1``), which expands into
``dl² (A + 2 delta B + delta² C)[j] - 2 dl (wM · grid[j] + delta wM · 1)`` with ``A, B, C`` the
grid's quadratic, linear and constant terms under ``M``; its errors go onto the later columns.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .gptq import Hessian, push_group, sweep_inputs

QK_K = 256
Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]
_BYTES = {T.IQ1_S: 50, T.IQ1_M: 56}


def _unit_scales(qtype: T, blk: np.ndarray):
    """(dl, delta, high index bits kept as they are) of blocks [n, bytes]: dl, delta [n, 32] per unit of 8."""
    n = blk.shape[0]
    if qtype == T.IQ1_S:
        d = blk[:, 0:2].copy().view(np.float16).astype(np.float64)               # [n, 1]
        qh = blk[:, 34:50].copy().view("<u2").astype(np.int64)                   # [n, 8]
        dl = d * (2 * ((qh >> 12) & 7) + 1)
        delta = np.where(qh & 0x8000, -gq.IQ1_S.delta, gq.IQ1_S.delta)
        return np.repeat(dl, 4, axis=1), np.repeat(delta, 4, axis=1)
    sc = blk[:, 48:56].copy().view("<u2").astype(np.int64)                       # [n, 4]
    dbits = ((sc & 0xF000) >> np.array([12, 8, 4, 0])).sum(axis=1).astype(np.uint16)
    d = dbits.view(np.float16).astype(np.float64)[:, None]
    ls = ((sc[:, :, None] >> np.array([0, 3, 6, 9])) & 7).reshape(n, 16)      # per 16 weights
    dl = np.repeat(d * (2 * ls + 1), 2, axis=1)
    qh = blk[:, 32:48].astype(np.int64)
    dsign = np.stack([qh & 0x08, qh & 0x80], axis=2).reshape(n, 32)
    delta = np.where(dsign != 0, -gq.IQ1_M.delta, gq.IQ1_M.delta)
    return dl, delta


def _pack(qtype: T, blk: np.ndarray, gidx: np.ndarray) -> np.ndarray:
    """``blk`` with the grid indices [n, 32] of its units replaced (scales, deltas, d kept)."""
    n = blk.shape[0]
    o = blk.copy()
    hi = gidx >> 8
    if qtype == T.IQ1_S:
        o[:, 2:34] = (gidx & 255).astype(np.uint8)
        qh = o[:, 34:50].copy().view("<u2") & np.uint16(0xF000)
        qh |= (hi.reshape(n, 8, 4) << np.array([0, 3, 6, 9])).sum(axis=2).astype(np.uint16)
        o[:, 34:50] = qh.astype("<u2").view(np.uint8)
    else:
        o[:, 0:32] = (gidx & 255).astype(np.uint8)
        h2 = hi.reshape(n, 16, 2)
        o[:, 32:48] = (o[:, 32:48] & 0x88) | (h2[:, :, 0] | (h2[:, :, 1] << 4)).astype(np.uint8)
    return o


def encode(qtype: T, rows: np.ndarray, h: Hessian, start: Encoder,
           importance: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, k] -> uint8 [n, k/256 * block bytes] of IQ1_S or IQ1_M, the contract of
    :func:`ggufq.quant.gptq.encode` (``start(qtype, cols, importance)`` gives scales and deltas)."""
    cls = gq.IQ1_S if qtype == T.IQ1_S else gq.IQ1_M
    cls.init_grid()
    grid = cls.grid.reshape(cls.grid_shape).astype(np.float64)              # [2048, 8], values -1/0/1
    gT = np.ascontiguousarray(grid.T)
    g2T = np.ascontiguousarray((grid[:, :, None] * grid[:, None, :]).reshape(grid.shape[0], 64).T)
    W, imp, _ = sweep_inputs(qtype, rows, h, QK_K, importance)
    n, k = W.shape
    U = h.u
    out = np.empty((n, k // QK_K, _BYTES[qtype]), np.uint8)
    for b, c0 in enumerate(range(0, k, QK_K)):
        c1 = c0 + QK_K
        blk = start(qtype, W[:, c0:c1].astype(np.float32), imp[c0:c1])
        dl, delta = _unit_scales(qtype, blk)
        gidx = np.zeros((n, 32), np.int64)
        E = np.empty((n, QK_K))
        for unit in range(32):
            j0 = c0 + 8 * unit
            w = W[:, j0:j0 + 8]
            ui = np.linalg.inv(U[j0:j0 + 8, j0:j0 + 8])
            M = ui @ ui.T
            A = M.reshape(64) @ g2T                                     # g M g
            B = gT.T @ M.sum(axis=1)                                    # g M 1
            C = M.sum()                                                 # 1 M 1
            wM = np.einsum("ri,ik->rk", w, M)
            d, s = dl[:, unit][:, None], delta[:, unit][:, None]
            lin = np.einsum("ri,ij->rj", wM, gT) + s * wM.sum(axis=1, keepdims=True)
            cost = A[None, :] + 2 * s * B[None, :]
            cost += s * s * C
            cost *= d * d
            cost -= 2 * d * lin
            j = np.argmin(cost, axis=1)
            q = d * (grid[j] + s)
            push_group(W, E, U, ui, w - q, j0, c0, c1)
            gidx[:, unit] = j
        if c1 < k:
            W[:, c1:] -= E @ U[c0:c1, c1:]
        out[:, b] = _pack(qtype, blk, gidx)
    return out.reshape(n, -1)
