"""Error-feedback rounding (GPTQ) into the IQ4_NL and IQ4_XS blocks.

IQ4_NL and IQ4_XS decode weight ``j`` of a 32-weight block as ``dl * kvalues_iq4nl[q_j]``
(``dl`` the fp16 block scale of IQ4_NL, or ``d * (ls - 32)`` of IQ4_XS's fp16 super-scale and
6-bit block multiplier): a scale per block and a non-uniform 16-entry table, but still one code
per weight. So GPTQ's column sweep applies as :func:`ggufq.quant.gptq.encode` runs it for the
affine formats: when the sweep reaches a block-column (32 columns for IQ4_NL, 256 for IQ4_XS),
the block scales are chosen by ``start`` (the ggml-identical encoder, weighted by ``diag(H)``)
on the weights *as updated by the errors pushed so far*; then each column is rounded to the
nearest table value under its block's scale, and its error ``(w - q) / U_jj`` is pushed onto the
columns not yet quantized along ``U``'s row (``U`` the upper Cholesky factor of ``H^-1``); a
block-column's errors reach the later ones in one product.

With a permuted Hessian (:meth:`ggufq.quant.gptq.Hessian.order`) the columns of each block-column
are taken in its order (falling importance) instead of left to right; the scales are still chosen
on the whole block-column before its first weight is rounded.

Only the codes change; the scale bytes are those ``start`` wrote, so the file is read as any
IQ4 file is.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from .gptq import Hessian
from .iq4 import KVALUES

Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]
_KV = KVALUES.astype(np.float64)
_MID = (_KV[:-1] + _KV[1:]) / 2          # nearest table entry by value: searchsorted on the midpoints
# qtype: (weights per block-column, bytes per block-column, offset of the codes in a 32-block's bytes)
_FMT = {T.IQ4_NL: (32, 18), T.IQ4_XS: (256, 136)}


def _scales(qtype: T, blk: np.ndarray) -> np.ndarray:
    """Decoded 32-block scales [n, qk/32] of a block-column's bytes [n, bytes]."""
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float64)
    if qtype == T.IQ4_NL:
        return d
    sh = blk[:, 2:4].copy().view("<u2").astype(np.int64)                 # [n, 1]
    sl = blk[:, 4:8].astype(np.int64)
    lo = np.stack([sl & 15, sl >> 4], axis=2).reshape(-1, 8)
    hi = (sh >> (2 * np.arange(8))) & 3
    return d * ((lo | (hi << 4)) - 32).astype(np.float64)


def _pack_codes(L: np.ndarray) -> np.ndarray:
    """codes [n, nb, 32] -> [n, nb, 16]: byte j holds L[j] | L[j+16] << 4 (ggml's order)."""
    return (L[..., :16] | (L[..., 16:] << 4)).astype(np.uint8)


def encode(qtype: T, rows: np.ndarray, h: Hessian, start: Encoder,
           importance: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, k] -> uint8 [n, k/qk * block bytes] of IQ4_NL or IQ4_XS, the contract of
    :func:`ggufq.quant.gptq.encode` (``start(qtype, cols, importance)`` gives the scales; the
    columns in ``h``'s sweep order)."""
    qk, bsz = _FMT[qtype]
    n, k = rows.shape
    if k != h.n or k % qk:
        raise ValueError(f"{qtype.name}: row length {k} vs Hessian {h.n} / block {qk}")
    perm = h.order(qk)
    W = np.array(rows if h.perm is None else np.asarray(rows)[:, perm], np.float64)    # sweep order
    imp = h.diag if importance is None else np.asarray(importance, np.float32)
    U = h.u
    nb = qk // 32
    out = np.empty((n, k // qk, bsz), np.uint8)
    L = np.empty((n, nb, 32), np.uint8)
    nat = np.empty((n, qk))
    for b, c0 in enumerate(range(0, k, qk)):
        c1 = c0 + qk
        col = perm[c0:c1] - c0                               # sweep position -> column in the block-column
        nat[:, col] = W[:, c0:c1]
        blk = start(qtype, nat.astype(np.float32), imp[c0:c1])
        dl = _scales(qtype, blk).reshape(n, nb)
        E = np.empty((n, qk))
        for c in range(qk):
            j, cc = c0 + c, col[c]
            s = cc // 32
            w = W[:, j]
            d = dl[:, s]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(d != 0, w / np.where(d != 0, d, 1.0), 0.0)
            q = np.searchsorted(_MID, t, side="right")           # ties to the upper entry, as ggml
            e = (w - d * _KV[q]) / U[j, j]
            if c + 1 < qk:
                W[:, j + 1:c1] -= np.outer(e, U[j, j + 1:c1])
            E[:, c] = e
            L[:, s, cc % 32] = q
        if c1 < k:
            W[:, c1:] -= E @ U[c0:c1, c1:]
        o = out[:, b]
        head = bsz - 16 * nb
        o[:, :head] = blk[:, :head]
        o[:, head:] = _pack_codes(L).reshape(n, 16 * nb)
    return out.reshape(n, -1)
