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

from .. import blas
from . import layout
from .layout import TRAITS

DAMP = 0.01   # GPTQ's default: add 1% of the mean diagonal before inverting


@dataclass
class Hessian:
    """What the encoder needs to know about a matrix's inputs."""
    diag: np.ndarray            # float32 [n]: E[x_j^2], the importance (imatrix convention), in column order
    u: np.ndarray               # float64 [n, n]: upper Cholesky factor U of (H + damp)^-1 = U^T U, in sweep order
    perm: Optional[np.ndarray] = None   # sweep order: column perm[j] is rounded j-th (None: 0, 1, 2, ...)
    group: int = 0              # perm only reorders columns inside each run of ``group`` columns
    unit: int = 1               # ... and moves them in whole runs of ``unit`` columns, each kept in order
    spill: Optional[str] = None  # a directory: pickled, ``u`` travels as a file there (see __getstate__)
    h: Optional[np.ndarray] = None  # float32 [n, n]: the damped moment H + damp itself, in sweep order (scale refits)

    def __getstate__(self) -> dict:
        """With ``spill``, ``u`` (n^2 float64: 32 MiB at n = 2048, 128 MiB at 4096) and ``h`` are written
        once to files in that directory and pickled as their paths; an encoder process maps them
        read-only. Every row chunk of a matrix is one pickled job, so sending ``u`` itself cost the
        parent a copy per chunk in flight (1.9 GiB RSS at -j 16 on a 1B model) and the pickling time.
        The files go when the parent's object does: the executor holds each job's arguments until its
        result is back."""
        st = dict(self.__dict__)
        paths = st.pop("_paths", {})
        if self.spill is not None:
            for key in ("u", "h"):
                a = getattr(self, key)
                if a is not None and not isinstance(a, np.memmap):
                    st[key] = ("file", paths.get(key) or self._spill(key))
        return st

    def __setstate__(self, st: dict) -> None:
        for key in ("u", "h"):
            a = st.get(key)
            if isinstance(a, tuple) and a[0] == "file":
                st[key] = np.load(a[1], mmap_mode="r")
        st.setdefault("h", None)
        self.__dict__.update(st)

    def _spill(self, key: str) -> str:
        import os
        import tempfile
        import weakref
        fd, path = tempfile.mkstemp(suffix=".npy", prefix=f"hessian-{key}-", dir=self.spill)
        with os.fdopen(fd, "wb") as f:
            np.save(f, getattr(self, key), allow_pickle=False)
        self.__dict__.setdefault("_paths", {})[key] = path
        weakref.finalize(self, _unlink, path)
        return path

    def moment_natural(self) -> np.ndarray:
        """float64 [n, n]: the damped moment ``H`` the sweep works against, in column order (from ``u``
        where ``h`` was not kept: ``H = (UᵀU)⁻¹``)."""
        hm = np.array(self.h, np.float64) if self.h is not None else np.linalg.inv(np.asarray(self.u).T @ self.u)
        if self.perm is None:
            return hm
        inv = np.argsort(self.perm)
        return hm[np.ix_(inv, inv)]

    @classmethod
    def from_moment(cls, m: np.ndarray, damp: Optional[float] = None, group: int = 0, unit: int = 1,
                    keep_h: bool = True) -> "Hessian":
        """``m``: E[x x^T] [n, n]. Dead inputs (never non-zero) get a unit diagonal. ``keep_h``: keep the
        damped moment itself (``h``, for the formats :mod:`~ggufq.quant.scale_refit` or
        :mod:`~ggufq.quant.kq_refit` refit; the others need ``u`` only).

        ``group`` > 0: the sweep takes the columns of each run of ``group`` (an encoder's
        block-column, whose block scales are fixed before its first column is rounded) in order of
        falling ``E[x_j^2]`` -- GPTQ's act-order, kept inside the block-column so that every
        block's scale is still chosen before any of its weights is rounded. The columns rounded
        first push their error onto the less important ones (tinyllama, held-out moments: output
        error 0.831 -> 0.813 of round-to-nearest at Q4_K, 0.806 -> 0.788 at IQ4_XS). ``unit`` > 1: the
        codebook sweeps round ``unit`` columns together (one sign byte, one or two grid points), so whole
        units move, in order of their summed ``E[x_j^2]``."""
        h = np.array(m, np.float64)
        d = np.diag(h).copy()
        dead = d <= 0
        h[dead, dead] = 1.0
        lam = (DAMP if damp is None else damp) * float(d[~dead].mean()) if (~dead).any() else 1.0
        h[np.diag_indices_from(h)] += lam
        perm = None
        if group and len(d) % group == 0 and group > 1 and group % unit == 0:
            # falling importance of the units inside each run of `group` columns (stable: ties keep order)
            per = group // unit
            u_order = np.argsort(-d.reshape(-1, per, unit).sum(axis=2), axis=1, kind="stable")    # [runs, per]
            first = (u_order * unit + np.arange(0, len(d), group)[:, None]).reshape(-1)            # units' first columns
            perm = (first[:, None] + np.arange(unit)).reshape(-1)
            h = h[np.ix_(perm, perm)]
        # U = P L'^-1 P with P H P = L' L'^T (P reverses the order): U is upper triangular with a
        # positive diagonal and U^T U = P (P H P)^-1 P = H^-1, so it is the upper Cholesky factor of
        # H^-1 -- one Cholesky and one triangular inverse, no explicit H^-1 and no second Cholesky
        lo = np.linalg.cholesky(h[::-1, ::-1])
        u = blas.inv_lower(lo)[::-1, ::-1]          # LAPACK's triangular inverse: 1/5 of a general one
        return cls(np.maximum(d, 0).astype(np.float32), np.ascontiguousarray(u), perm,
                   group if perm is not None else 0, unit if perm is not None else 1,
                   h=h.astype(np.float32) if keep_h else None)

    @property
    def n(self) -> int:
        return self.diag.size

    def order(self, qk: int, unit: int = 1) -> np.ndarray:
        """The sweep order for an encoder whose block-columns are ``qk`` wide and which rounds ``unit``
        columns together (ValueError when the order crosses a block-column's edge -- a block's weights
        would be rounded before its scale is chosen -- or splits such a unit)."""
        if self.perm is None:
            return np.arange(self.n)
        if qk % self.group or self.unit % unit:
            raise ValueError(f"sweep order within {self.group} columns in units of {self.unit} vs block-columns "
                             f"of {qk} in units of {unit}")
        return self.perm


def _unlink(path: str) -> None:
    import os
    try:
        os.unlink(path)
    except OSError:
        pass


def sweep_order(qtype: T) -> tuple[int, int]:
    """(group, unit) of :meth:`Hessian.from_moment` for the error-feedback sweep into ``qtype``: 256-wide
    block-columns for the K-quants and IQ4_XS (single columns) and IQ3_XXS/IQ3_S (units of 8: a sign byte
    and two grid points); (0, 1), column order, for the rest. Inside a 32-wide block the order moved
    tinyllama's output error by under 1% either way (Q4_0 0.98, Q4_1 1.00, Q5_0 1.00, IQ4_NL 1.00 of column
    order; Q4_K 0.93, Q6_K 0.94, IQ4_XS 0.95). Paired KLD of tinyllama's calibrated mixtures: IQ3_M 0.1055 -> 0.1034 with the IQ3 units ordered; IQ2_M 0.3125 -> 0.3173 with the IQ2 units
    ordered too (their sweep supports it: ``iq2_gptq`` with a ``unit=8`` Hessian), so IQ2 keeps column order."""
    if (qtype in TRAITS and TRAITS[qtype].qk == 256) or qtype == T.IQ4_XS:
        return 256, 1
    if qtype in (T.IQ3_XXS, T.IQ3_S):
        return 256, 8
    return 0, 1


Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]


def sweep_inputs(qtype: T, rows: np.ndarray, h: Hessian, qk: int, importance: Optional[np.ndarray] = None,
                 unit: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checks and inputs a codebook sweep (``iq*_gptq``) starts from: ``rows`` as float64 ``W``
    [n, k] in ``h``'s sweep order (a copy the sweep updates), the importance the ``start`` encoder
    weights by (default ``h.diag``, column order), and the order (``perm[j]``: the column at sweep
    position ``j``). ``unit``: the columns the sweep rounds together (0: it takes column order only)."""
    k = rows.shape[1]
    if k != h.n or k % qk:
        raise ValueError(f"{qtype.name}: row length {k} vs Hessian {h.n} / block {qk}")
    if not unit and h.perm is not None:
        raise ValueError(f"{qtype.name}: this sweep takes the columns in order; the Hessian is permuted")
    perm = h.order(qk, unit or 1)
    W = np.array(rows if h.perm is None else np.asarray(rows)[:, perm], np.float64)
    return W, (h.diag if importance is None else np.asarray(importance, np.float32)), perm


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

    The sweep works on ``W^T`` (one contiguous row per column), in ``h``'s order (column order,
    or falling importance inside each block-column), and pushes errors in three tiers: column
    by column inside a run of ``sub_len`` columns, a finished run's errors onto the rest of its
    block-column in one product, and a finished block-column's onto every later column in one
    product. The arithmetic is GPTQ's; only the order of the updates differs.

    Long because the three tiers share the block-column's buffers, the sweep order and the scales.
    """
    tr = TRAITS[qtype]
    qk, sub, zq = tr.qk, tr.sub_len, tr.zq
    lo, hi = (-128, 127) if qtype == T.Q8_0 else (0, tr.qmax)
    n, k = rows.shape
    if k != h.n or k % qk:
        raise ValueError(f"{qtype.name}: row length {k} vs Hessian {h.n} / block {qk}")
    perm = h.order(qk)
    Wt = np.asarray(rows).T
    Wt = np.array(Wt if h.perm is None else Wt[perm], np.float64, order="C")   # [k, n], sweep order
    imp = h.diag if importance is None else np.asarray(importance, np.float32)
    U = h.u
    out = np.empty((n, k // qk, layout._ts(qtype)), np.uint8)
    Et = np.empty((qk, n))             # the block-column's errors (sweep order), already divided by U[j, j]
    Qt = np.empty((qk, n))             # its codes minus zq (column order)
    nat = np.empty((qk, n))
    for b, c0 in enumerate(range(0, k, qk)):
        c1 = c0 + qk
        col = perm[c0:c1] - c0                                          # sweep position -> column in block
        nat[col] = Wt[c0:c1]
        f = start(qtype, np.ascontiguousarray(nat.T, np.float32), imp[c0:c1])
        f = f if isinstance(f, layout.Fields) else layout.unpack(qtype, f)
        A, B = layout.affine(f)
        At = np.ascontiguousarray(A.T, np.float64)                     # [n_sub, n]
        Bt = np.ascontiguousarray(B.T, np.float64)
        inv = np.where(At != 0, 1.0 / np.where(At != 0, At, 1.0), 0.0)
        sub_of = col // sub
        for s0 in range(c0, c1, sub):
            s1 = s0 + sub
            for j in range(s0, s1):
                s = sub_of[j - c0]
                w, q, e = Wt[j], Qt[col[j - c0]], Et[j - c0]
                a, bb = At[s], Bt[s]
                np.subtract(w, bb, out=q)                  # q = clip(rint((w - B) / A), lo, hi) - zq
                q *= inv[s]
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
