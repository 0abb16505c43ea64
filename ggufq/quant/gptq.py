"""Error-feedback rounding into ggml blocks (GPTQ's solver, written for fixed block formats).

Rounding each weight to its nearest code minimises the error of every weight on
its own; what the model sees is the error of the matrix product ``W x``, whose
expected square is ``e^T H e`` per row with ``H = E[x x^T]`` the second moment of
the matrix's inputs. GPTQ (Frantar et al., 2022) quantizes the columns of a row
one at a time and pushes each column's rounding error onto the columns not yet
quantized, in the direction ``H^-1`` says cancels it best. Rows are independent,
so any chunk of rows can be encoded on its own.

Block formats fix a scale (and min) per block of ``qk`` columns, so the columns
are taken one block-column at a time: when the sweep reaches a block-column, the
block scales are chosen for the weights *as updated by the errors pushed so far*
by the ``start`` encoder (the k-quant or HQQ-refined search, weighted by
``diag(H)``), then its columns are rounded under those scales with error
feedback, and the block's accumulated error is pushed onto the remaining columns
in one matrix product (GPTQ's lazy batch update).

``H`` comes from :mod:`ggufq.calib` (the model's own generated text); nothing
here depends on where it came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import layout
from .layout import TRAITS

DAMP = 0.01   # GPTQ's default: add 1% of the mean diagonal before inverting


@dataclass
class Hessian:
    """What the encoder needs to know about a matrix's inputs."""
    diag: np.ndarray            # float32 [n]: E[x_j^2], the importance (imatrix convention)
    u: np.ndarray               # float64 [n, n]: upper Cholesky factor U of (H + damp)^-1 = U^T U

    @classmethod
    def from_moment(cls, m: np.ndarray, damp: Optional[float] = None) -> "Hessian":
        """``m``: E[x x^T] [n, n]. Dead inputs (never non-zero) get a unit diagonal."""
        h = np.array(m, np.float64)
        d = np.diag(h).copy()
        dead = d <= 0
        h[dead, dead] = 1.0
        lam = (DAMP if damp is None else damp) * float(d[~dead].mean()) if (~dead).any() else 1.0
        h[np.diag_indices_from(h)] += lam
        # (H)^-1 = L^-T L^-1 with H = L L^T; its upper factor is chol((H)^-1)^T
        lo = np.linalg.cholesky(h)
        li = np.linalg.solve(lo, np.eye(h.shape[0]))       # L^-1 (lower)
        u = np.linalg.cholesky(li.T @ li).T
        return cls(np.maximum(d, 0).astype(np.float32), u)

    @property
    def n(self) -> int:
        return self.diag.size


Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]


def encode(qtype: T, rows: np.ndarray, h: Hessian, start: Encoder,
           importance: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, k] float -> uint8 blocks [n, row_nbytes] of ``qtype``.

    ``start(qtype, cols, importance)`` picks the block scales of one block-column;
    ``importance`` (default ``h.diag``) is what it weights by.
    """
    tr = TRAITS[qtype]
    qk, sub, zq = tr.qk, tr.sub_len, tr.zq
    lo, hi = (-128, 127) if qtype == T.Q8_0 else (0, tr.qmax)
    W = np.array(rows, np.float64)
    n, k = W.shape
    if k != h.n or k % qk:
        raise ValueError(f"{qtype.name}: row length {k} vs Hessian {h.n} / block {qk}")
    imp = h.diag if importance is None else np.asarray(importance, np.float32)
    U = h.u
    out = np.empty((n, k // qk, layout._ts(qtype)), np.uint8)
    for b, c0 in enumerate(range(0, k, qk)):
        c1 = c0 + qk
        f = layout.unpack(qtype, start(qtype, W[:, c0:c1].astype(np.float32), imp[c0:c1]))
        A, B = layout.affine(f)
        A = A.astype(np.float64)
        B = B.astype(np.float64)
        inv = np.where(A != 0, 1.0 / np.where(A != 0, A, 1.0), 0.0)
        E = np.empty((n, qk))
        for c in range(qk):
            s, j = c // sub, c0 + c
            w = W[:, j]
            q = np.clip(np.rint((w - B[:, s]) * inv[:, s]) + zq, lo, hi)
            e = (w - (A[:, s] * (q - zq) + B[:, s])) / U[j, j]
            if c + 1 < qk:
                W[:, j + 1:c1] -= np.outer(e, U[j, j + 1:c1])
            E[:, c] = e
            f.q[:, c] = q.astype(np.int32)
        if c1 < k:
            W[:, c1:] -= E @ U[c0:c1, c1:]
        out[:, b] = layout.pack(f)
    return out.reshape(n, -1)
