"""Error-feedback rounding (GPTQ) into the IQ2_XXS, IQ2_XS and IQ2_S codebooks.

The IQ3 version (:mod:`ggufq.quant.iq3_gptq`) with units of 8 weights instead of quads: in
the IQ2 formats eight weights share one grid point of the E8-style grids (256, 512 or 1024
points of levels {1, 3, 5} in ggml's units) and carry eight signs (IQ2_XXS and IQ2_XS store
seven: the eighth makes the count of negatives even).

For a unit on columns ``J`` with current weights ``w`` (after the errors pushed onto them so
far) and ``U`` the upper Cholesky factor of ``H^-1``, quantizing ``w`` to ``q`` with
sequential feedback inside the unit leaves the errors ``e = (w - q) U_JJ^-1`` and costs
``|e|² = (w - q) M (w - q)^T``, ``M = U_JJ^-1 U_JJ^-T``. Each unit takes the grid point
``q = db * signs * grid[j]`` minimising that form, over the whole grid: ``|e|²`` expands into
``db² P[signs, j] - 2 db (w M ⊙ signs) · grid[j]`` (``P`` for the sign patterns present, one
matrix product), then ``e U_J,rest`` is subtracted from the columns that follow; a whole
super-block's errors reach the later ones in one product.

As in ggml's encoder: the super-block scale ``d`` and the 4-bit group scales come from
``start`` (the ggml-identical encoder, weighted by ``diag(H)``) run on the super-block's
columns as updated so far; the signs of a unit are those of the updated weights, and where
only seven are stored an odd count of negatives flips the least important one (smallest
``diag(H) * w²``, ``quantize_row_iq2_xxs_impl``'s rule). Decoded values use gguf-py's
dequantizer grids, so the objective is the error of what llama.cpp will compute with.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .gptq import Hessian, push_group, sweep_inputs

QK_K = 256
Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]
# qtype: (gguf-py class, block bytes, units of 8 per group scale)
_FMT = {T.IQ2_XXS: (gq.IQ2_XXS, 66, 4), T.IQ2_XS: (gq.IQ2_XS, 74, 2), T.IQ2_S: (gq.IQ2_S, 82, 2)}
# the 256 sign patterns of a unit: _SIG[p, i] = -1 where bit i of p is set
_SIG = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, -1.0, 1.0)
_SIG2 = (_SIG[:, :, None] * _SIG[:, None, :]).reshape(256, 64)
_BIT8 = (1 << np.arange(8)).astype(np.int64)


def _group_scales(qtype: T, blk: np.ndarray) -> np.ndarray:
    """The decoded group scales of blocks [n, bytes]: [n, 8] (IQ2_XXS) or [n, 16], as gguf-py computes them."""
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == T.IQ2_XXS:
        ls = (blk[:, 2:66].copy().view("<u4").reshape(-1, 8, 2)[:, :, 1] >> 28).astype(np.float32)
    else:
        sc = blk[:, -8:]
        ls = np.stack([sc & 15, sc >> 4], axis=2).reshape(-1, 16).astype(np.float32)
    return d * (np.float32(0.5) + ls) * np.float32(0.25)


def _pack(qtype: T, blk: np.ndarray, gidx: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Block bytes [n, bytes] with the grid indices and sign bytes [n, 32] of the units, the scale
    bytes taken from ``blk`` (the start encoder's block)."""
    n = blk.shape[0]
    o = blk.copy()
    if qtype == T.IQ2_XXS:
        s7 = (signs & 127).astype(np.uint32).reshape(n, 8, 4) << (7 * np.arange(4, dtype=np.uint32))
        ls = blk[:, 2:66].copy().view("<u4").reshape(n, 8, 2)[:, :, 1] >> 28
        aux = np.empty((n, 8, 2), "<u4")
        aux[:, :, 0] = gidx.astype(np.uint8).reshape(n, 8, 4).copy().view("<u4")[:, :, 0]
        aux[:, :, 1] = np.bitwise_or.reduce(s7, axis=2) | (ls << 28)
        o[:, 2:66] = aux.reshape(n, 16).view(np.uint8)
    elif qtype == T.IQ2_XS:
        qs = (gidx.astype(np.uint16) | ((signs & 127).astype(np.uint16) << 9)).astype("<u2")
        o[:, 2:66] = qs.view(np.uint8)
    else:
        o[:, 2:34] = (gidx & 255).astype(np.uint8)
        o[:, 34:66] = signs
        hb = ((gidx >> 8).astype(np.uint8).reshape(n, 8, 4)) << (2 * np.arange(4, dtype=np.uint8))
        o[:, 66:74] = np.bitwise_or.reduce(hb, axis=2)
    return o


def encode(qtype: T, rows: np.ndarray, h: Hessian, start: Encoder,
           importance: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, k] -> uint8 [n, k/256 * block bytes] of IQ2_XXS, IQ2_XS or IQ2_S, the contract of
    :func:`ggufq.quant.gptq.encode` (``start(qtype, cols, importance)`` gives the scales)."""
    cls, bsz, per_scale = _FMT[qtype]
    parity = qtype != T.IQ2_S
    cls.init_grid()
    grid = cls.grid.reshape(cls.grid_shape).astype(np.float64)              # [ng, 8] decoded values
    # the products below are small: NumPy's own loops (einsum), not a threaded BLAS call whose
    # start-up costs more than the product in a busy encoder process
    gT = np.ascontiguousarray(grid.T)                                        # [8, ng]
    g2T = np.ascontiguousarray((grid[:, :, None] * grid[:, None, :]).reshape(grid.shape[0], 64).T)
    W, imp, perm = sweep_inputs(qtype, rows, h, QK_K, importance, unit=8)
    n, k = W.shape
    U = h.u
    out = np.empty((n, k // QK_K, bsz), np.uint8)
    P = np.empty((256, grid.shape[0]))
    for b, c0 in enumerate(range(0, k, QK_K)):
        c1 = c0 + QK_K
        col = perm[c0:c1] - c0                               # sweep position -> column in the block-column
        nat = np.empty((n, QK_K))
        nat[:, col] = W[:, c0:c1]
        blk = start(qtype, nat.astype(np.float32), imp[c0:c1])
        db = _group_scales(qtype, blk).astype(np.float64)
        gidx = np.zeros((n, 32), np.int64)
        sbytes = np.zeros((n, 32), np.uint8)
        E = np.empty((n, QK_K))
        for pos in range(32):                                # units in h's order; `unit` is the block's own
            j0 = c0 + 8 * pos
            unit = col[8 * pos] // 8
            n0 = c0 + 8 * unit
            w = W[:, j0:j0 + 8]
            neg = w < 0
            if parity:
                odd = np.flatnonzero(neg.sum(axis=1) % 2 == 1)
                if odd.size:
                    w8 = w[odd]
                    imin = np.argmin(imp[n0:n0 + 8] * w8 * w8, axis=1)
                    neg[odd, imin] = ~neg[odd, imin]
            pat = neg.astype(np.int64) @ _BIT8
            sbytes[:, unit] = pat
            dq = db[:, unit // per_scale]
            ui = np.linalg.inv(U[j0:j0 + 8, j0:j0 + 8])                          # upper triangular
            M = ui @ ui.T
            up = np.unique(pat)
            P[up] = np.einsum("pm,mj->pj", _SIG2[up] * M.reshape(1, 64), g2T)
            lin = np.einsum("ri,ij->rj", np.einsum("ri,ik->rk", w, M) * _SIG[pat], gT)   # [n, ng]
            cost = P[pat]
            cost *= (dq * dq)[:, None]
            cost -= (2 * dq)[:, None] * lin
            j = np.argmin(cost, axis=1)
            q = dq[:, None] * _SIG[pat] * grid[j]
            push_group(W, E, U, ui, w - q, j0, c0, c1)
            gidx[:, unit] = j
        if c1 < k:
            W[:, c1:] -= E @ U[c0:c1, c1:]
        out[:, b] = _pack(qtype, blk, gidx, sbytes)
    return out.reshape(n, -1)
