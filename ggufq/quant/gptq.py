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
        # U = P L'^-1 P with P H P = L' L'^T (P reverses the order): U is upper triangular with a
        # positive diagonal and U^T U = P (P H P)^-1 P = H^-1, so it is the upper Cholesky factor of
        # H^-1 -- one Cholesky and one triangular inverse, no explicit H^-1 and no second Cholesky
        lo = np.linalg.cholesky(h[::-1, ::-1])
        u = np.linalg.inv(lo)[::-1, ::-1]
        u = np.triu(u)
        return cls(np.maximum(d, 0).astype(np.float32), np.ascontiguousarray(u))

    @property
    def n(self) -> int:
        return self.diag.size


Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]


def sweep_inputs(qtype: T, rows: np.ndarray, h: Hessian, qk: int,
                 importance: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """The checks and inputs every error-feedback sweep starts from (this module's and the
    i-quants' ``iq*_gptq``): ``rows`` as float64 ``W`` [n, k] (a copy the sweep updates) and the
    importance the ``start`` encoder weights by (default ``h.diag``)."""
    W = np.array(rows, np.float64)
    k = W.shape[1]
    if k != h.n or k % qk:
        raise ValueError(f"{qtype.name}: row length {k} vs Hessian {h.n} / block {qk}")
    return W, (h.diag if importance is None else np.asarray(importance, np.float32))


def push_group(W: np.ndarray, E: np.ndarray, U: np.ndarray, ui: np.ndarray, err: np.ndarray,
               j0: int, c0: int, c1: int) -> None:
    """A codebook sweep's step (``iq1_gptq``, ``iq2_gptq``): the rounding error ``err`` [n, g] of
    columns ``[j0, j0 + g)``, times ``ui`` (their ``U`` block's inverse), pushed onto the rest of the
    block-column ``[j0 + g, c1)`` and kept in ``E`` (columns from ``c0``) for the block-column's
    push. NumPy's own loops (einsum): these products are too small for a threaded BLAS call."""
    g = err.shape[1]
    e = np.einsum("ri,ik->rk", err, ui)
    if j0 + g < c1:
        W[:, j0 + g:c1] -= np.einsum("ri,ik->rk", e, U[j0:j0 + g, j0 + g:c1])
    E[:, j0 - c0:j0 - c0 + g] = e


def encode(qtype: T, rows: np.ndarray, h: Hessian, start: Encoder,
           importance: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [n, k] float -> uint8 blocks [n, row_nbytes] of ``qtype``.

    ``start(qtype, cols, importance)`` picks the block scales of one block-column (its bytes, or
    its :class:`~ggufq.quant.layout.Fields` as unpacking them gives); ``importance`` (default
    ``h.diag``) is what it weights by.

    The sweep works on ``W^T`` (one contiguous row per column) and pushes errors in three
    tiers: column by column only inside a sub-block (its scale is fixed, 16 or 32 columns),
    a finished sub-block's errors onto the rest of its block-column in one product, and a
    finished block-column's onto every later column in one product. The arithmetic is
    GPTQ's; only the order of the updates differs.
    """
    tr = TRAITS[qtype]
    qk, sub, zq = tr.qk, tr.sub_len, tr.zq
    lo, hi = (-128, 127) if qtype == T.Q8_0 else (0, tr.qmax)
    n, k = rows.shape
    if k != h.n or k % qk:
        raise ValueError(f"{qtype.name}: row length {k} vs Hessian {h.n} / block {qk}")
    Wt = np.array(np.asarray(rows).T, np.float64, order="C")          # [k, n]
    imp = h.diag if importance is None else np.asarray(importance, np.float32)
    U = h.u
    out = np.empty((n, k // qk, layout._ts(qtype)), np.uint8)
    Et = np.empty((qk, n))             # the block-column's errors, already divided by U[j, j]
    Qt = np.empty((qk, n))             # its codes minus zq
    for b, c0 in enumerate(range(0, k, qk)):
        c1 = c0 + qk
        f = start(qtype, np.ascontiguousarray(Wt[c0:c1].T, np.float32), imp[c0:c1])
        f = f if isinstance(f, layout.Fields) else layout.unpack(qtype, f)
        A, B = layout.affine(f)
        At = np.ascontiguousarray(A.T, np.float64)                     # [n_sub, n]
        Bt = np.ascontiguousarray(B.T, np.float64)
        inv = np.where(At != 0, 1.0 / np.where(At != 0, At, 1.0), 0.0)
        for s in range(tr.n_sub):
            s0, s1 = c0 + s * sub, c0 + (s + 1) * sub
            a, bb, ia = At[s], Bt[s], inv[s]
            for j in range(s0, s1):
                w, q, e = Wt[j], Qt[j - c0], Et[j - c0]
                np.subtract(w, bb, out=q)                  # q = clip(rint((w - B) / A), lo, hi) - zq
                q *= ia
                np.rint(q, out=q)
                np.clip(q, lo - zq, hi - zq, out=q)
                np.multiply(a, q, out=e)                   # e = (w - (A q + B)) / U[j, j]
                e += bb
                np.subtract(w, e, out=e)
                e /= U[j, j]
                if j + 1 < s1:
                    Wt[j + 1:s1] -= U[j, j + 1:s1, None] * e
            if s1 < c1:
                Wt[s1:c1] -= U[s0:s1, s1:c1].T @ Et[s0 - c0:s1 - c0]
        if c1 < k:
            Wt[c1:] -= U[c0:c1, c1:].T @ Et
        f.q = (Qt.T + zq).astype(np.int32)
        out[:, b] = layout.pack(f)
    return out.reshape(n, -1)
