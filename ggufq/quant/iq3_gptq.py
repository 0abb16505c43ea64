"""Error-feedback rounding (GPTQ) into the IQ3_XXS and IQ3_S codebooks.

:func:`ggufq.quant.gptq.encode` rounds one column at a time under block scales and
pushes each column's error onto the columns not yet quantized. In the IQ3 formats
a weight is not rounded alone: four weights share one grid point (a quad), so the
"rounding" step is a search over the grid, and the error feedback runs quad by quad.

For a quad on columns ``J`` (four consecutive columns) with current weights ``w``
(after the errors pushed onto them so far) and ``U`` the upper Cholesky factor of
``H^-1``, quantizing ``w`` to ``q`` with the same sequential feedback inside the quad
gives the errors ``e = (w - q) U_JJ^-1`` and costs ``|e|² = (w - q) M (w - q)^T`` with
``M = U_JJ^-1 U_JJ^-T`` -- GPTQ's objective for a vector of columns. So each quad takes
the grid point ``q = db * signs * grid[j]`` minimising that quadratic form (all grid
points are tried: ``|e|²`` expands into ``db² P[signs, j] - 2 db (w M ⊙ signs) · grid[j]``
with ``P`` tabulated per sign pattern), then ``e U_J,rest`` is subtracted from the
columns that follow; a whole block's errors reach the later blocks in one product.

What stays as in ggml's encoder: the super-block scale ``d`` and the 4-bit group
scales come from ``start`` (the ggml-identical encoder, weighted by ``diag(H)``) run
on the block's columns as updated so far, and the signs of each 8 weights are those
of the updated weights (IQ3_XXS stores 7 of them: an odd count of negatives flips
the least important one, as ``quantize_row_iq3_xxs_impl`` does). Decoded values use
gguf-py's dequantizer grids (IQ3_XXS's top level is 62, not 60), so the objective is
the error of what llama.cpp will compute with.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .gptq import Hessian, sweep_inputs

QK_K = 256
Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]
_BLOCK = {T.IQ3_XXS: (gq.IQ3_XXS, 98), T.IQ3_S: (gq.IQ3_S, 110)}
# the 16 sign patterns of a quad: _SIG[p, i] = -1 where bit i of p is set
_SIG = np.where((np.arange(16)[:, None] >> np.arange(4)) & 1, -1.0, 1.0)


def _group_scales(qtype: T, blk: np.ndarray) -> np.ndarray:
    """The 8 decoded group scales [n, 8] of blocks [n, bytes], as gguf-py's dequantizer computes them."""
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == T.IQ3_XXS:
        ls = (blk[:, 66:98].copy().view("<u4") >> 28).astype(np.float32)
        return d * (np.float32(0.5) + ls) * np.float32(0.5)
    sc = blk[:, 106:110]
    ls = np.stack([sc & 15, sc >> 4], axis=2).reshape(-1, 8).astype(np.float32)
    return d * (1 + 2 * ls)


def _pack(qtype: T, blk: np.ndarray, gidx: np.ndarray, sbytes: np.ndarray) -> np.ndarray:
    """Block bytes [n, bytes] with the quads' grid indices [n, 64] and the sign bytes [n, 32] (one per
    8 weights), the scale bytes taken from ``blk`` (the start encoder's block)."""
    n = blk.shape[0]
    o = np.empty_like(blk)
    o[:, 0:2] = blk[:, 0:2]
    if qtype == T.IQ3_XXS:
        o[:, 2:66] = gidx.astype(np.uint8)
        s7 = (sbytes & 127).astype(np.uint32).reshape(n, 8, 4) << (7 * np.arange(4, dtype=np.uint32))
        ls = blk[:, 66:98].copy().view("<u4") >> 28
        sas = np.bitwise_or.reduce(s7, axis=2) | (ls << 28)
        o[:, 66:98] = sas.astype("<u4").view(np.uint8)
    else:
        o[:, 2:66] = (gidx & 255).astype(np.uint8)
        hb = ((gidx >> 8).astype(np.uint8).reshape(n, 8, 8)) << np.arange(8, dtype=np.uint8)
        o[:, 66:74] = np.bitwise_or.reduce(hb, axis=2)
        o[:, 74:106] = sbytes
        o[:, 106:110] = blk[:, 106:110]
    return o


def encode(qtype: T, rows: np.ndarray, h: Hessian, start: Encoder,
           importance: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, k] -> uint8 [n, k/256 * block bytes] of IQ3_XXS or IQ3_S, same contract as
    :func:`ggufq.quant.gptq.encode` (``start(qtype, cols, importance)`` gives the scales).

    Long because the GPTQ column loop holds the iq3 grid search inside it."""
    cls, bsz = _BLOCK[qtype]
    xxs = qtype == T.IQ3_XXS
    cls.init_grid()
    grid = cls.grid.reshape(cls.grid_shape).astype(np.float64)              # [ng, 4] decoded values
    W, imp, perm = sweep_inputs(qtype, rows, h, QK_K, importance, unit=8)
    n, k = W.shape
    U = h.u
    bit8 = (1 << np.arange(8)).astype(np.uint8)
    out = np.empty((n, k // QK_K, bsz), np.uint8)
    for b, c0 in enumerate(range(0, k, QK_K)):
        c1 = c0 + QK_K
        col = perm[c0:c1] - c0                               # sweep position -> column in the block-column
        nat = np.empty((n, QK_K))
        nat[:, col] = W[:, c0:c1]
        blk = start(qtype, nat.astype(np.float32), imp[c0:c1])
        db = _group_scales(qtype, blk).astype(np.float64)                      # [n, 8]
        gidx = np.zeros((n, 64), np.int64)
        sbytes = np.zeros((n, 32), np.uint8)
        E = np.empty((n, QK_K))
        for pos in range(32):                          # 8 weights, one sign byte; units in h's order
            u0 = c0 + 8 * pos
            unit = col[8 * pos] // 8                   # the unit's place in the block
            n0 = c0 + 8 * unit
            neg = W[:, u0:u0 + 8] < 0
            if xxs:
                odd = np.flatnonzero(neg.sum(axis=1) % 2 == 1)
                if odd.size:
                    w8 = W[odd, u0:u0 + 8]
                    imin = np.argmin(imp[n0:n0 + 8] * w8 * w8, axis=1)
                    neg[odd, imin] = ~neg[odd, imin]
            sbytes[:, unit] = (neg.astype(np.uint8) * bit8).sum(axis=1, dtype=np.uint8)
            dq = db[:, unit // 4]
            for half in range(2):
                j0 = u0 + 4 * half
                ui = np.linalg.inv(U[j0:j0 + 4, j0:j0 + 4])                       # upper triangular
                M = ui @ ui.T
                pat = (neg[:, 4 * half:4 * half + 4] * (1 << np.arange(4))).sum(axis=1)
                sg = _SIG[:, None, :] * grid[None]                               # [16, ng, 4]
                P = np.einsum("pji,ik,pjk->pj", sg, M, sg)
                w = W[:, j0:j0 + 4]
                lin = ((w @ M) * _SIG[pat]) @ grid.T                              # [n, ng]
                j = np.argmin(dq[:, None] ** 2 * P[pat] - 2 * dq[:, None] * lin, axis=1)
                q = dq[:, None] * _SIG[pat] * grid[j]
                e = (w - q) @ ui
                if j0 + 4 < c1:
                    W[:, j0 + 4:c1] -= e @ U[j0:j0 + 4, j0 + 4:c1]
                E[:, j0 - c0:j0 - c0 + 4] = e
                gidx[:, 2 * unit + half] = j
        if c1 < k:
            W[:, c1:] -= E @ U[c0:c1, c1:]
        out[:, b] = _pack(qtype, blk, gidx, sbytes)
    return out.reshape(n, -1)
