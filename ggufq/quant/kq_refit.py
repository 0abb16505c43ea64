"""Refit the scales and mins of the k-quant and legacy blocks to their codes under the full input moment.

The error-feedback sweep (:func:`ggufq.quant.gptq.encode`) rounds the codes of a block-column under
scales that the start encoder chose beforehand, on ``diag(H)`` and the weights as updated so far.
Once the codes are fixed, a block decodes linearly in its fields: weight ``j`` of sub-block ``s``
is ``A_s (q_j - zq) + B_s`` (:func:`ggufq.quant.layout.affine`), with ``A_s = d · sc_s`` and ``B_s =
-dmin · mn_s`` (Q2_K, Q4_K, Q5_K), ``A_s = d · sc_s`` (Q3_K, Q6_K: signed ``sc``, no min), ``A = d``
and ``B = m`` (Q4_1, Q5_1) or ``A = d`` (Q4_0, Q5_0). So the row's product error ``f = eᵀ H e``
(``e = w - x``) is a quadratic in a block's ``(A, B)`` when the rest of the row is held: changing
the block's decode by ``δ`` changes ``f`` by ``δᵀ H_JJ δ - 2 δᵀ (H e)_J``.

:func:`improve` passes over a row's blocks in order (all rows at once; ``RefitParams.sweeps`` passes,
each from the exact ``H e``). At each block it refits the fields: coordinate descent over the integer
``sc_s`` and ``mn_s`` (each step the exact integer minimum of a convex quadratic in one variable, clipped
to the field's range), then the least-squares fp16 ``d`` and ``dmin`` (or ``m``) under those integers,
kept only where the change drops; then a coordinate descent over the block's codes (one step up or down
per weight, GPTQ's lazy batches for ``H e``); then the refit again; then its change reaches the later
blocks' ``H e`` in one product. ``f`` never rises; the bytes keep the format's layout and size (ggml's
decode, gguf-py's dequantizer).

The i-quants have the same refit over their scale fields in :mod:`ggufq.quant.scale_refit`, whole rows
at once (their scale fields are few); a k-quant row has 16 scales and 16 mins per 256 weights, so a
block at a time keeps the work at one ``[n, 256] x [256, 256]`` product per block.

Paired KLD on tinyllama (60x512 held-out tokens, ``--method calibrated`` with every k-quant refit, as
``calibrated-max`` does), sweep only -> one pass -> two (``RefitParams.sweeps``, the default): Q4_K_M 0.02777
-> 0.02714 -> 0.02702, Q3_K_M 0.09636 -> 0.09310 -> 0.09261, Q2_K 0.3590 -> 0.3410 -> 0.3362. Which types
each method refits: ``CALIBRATED``, ``FORMATS`` below.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import layout
from .gptq import Hessian
from .layout import TRAITS

SMALL = 1024       # up to this many columns the products run on one BLAS thread (as scale_refit.SMALL)
GRAM_ROWS = 2048   # rows per float32 Gram product in a refit (S x rows x 256 floats of scratch)
BATCH = 32         # columns per lazy update of the error's product with H in the code descent


@dataclass(frozen=True)
class RefitParams:
    passes: int = 3          # coordinate-descent passes over a block's integer fields, per round
    rounds: int = 2          # (integer descent, fp16 least squares) rounds per refit
    sweeps: int = 2          # passes over the row's block-columns (refit, code descent, refit at each)


DEFAULT = RefitParams()
# every TRAITS type but Q8_0 (whose 8-bit codes leave nothing measurable to refit): --method calibrated-max
FORMATS = frozenset(t for t in TRAITS if t != T.Q8_0)
# --method calibrated: the 2-3-bit k-quants, where the refit pays most (tinyllama Q3_K_M -3.9%, Q2_K -6.4%),
# and the legacy types (the fallbacks of rows not a multiple of 256). At Q4_K/Q5_K/Q6_K it gains 2-3% of
# KLD for about the sweep's time again: the 1B synthetic model's Q4_K_M on the device went from 164 s to
# 238 s with one pass (the bound is 180 s), so those are calibrated-max's
CALIBRATED = frozenset((T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1))


def _ranges(qtype: T) -> tuple[tuple[int, int], tuple[int, int]]:
    """Allowed (lo, hi) of sc and mn, as :func:`ggufq.quant.layout.pack` checks them."""
    tr = TRAITS[qtype]
    sc = ((-(1 << (tr.sc_bits - 1)), (1 << (tr.sc_bits - 1)) - 1) if tr.sc_signed else (0, (1 << tr.sc_bits) - 1)) \
        if tr.sc_bits else (0, 0)
    mn = (0, (1 << tr.mn_bits) - 1) if tr.mn_bits else (0, 0)
    return sc, mn


def _fp16(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return a.astype(np.float16).astype(np.float64)


def _block_gram(u: np.ndarray, HJ: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a block's unit codes ``u = q - zq`` [n, S, L] and its moment ``HJ`` [qk, qk]:
    ``Gaa`` [n, S, S] = ``Σ u_i H_ij u_j`` over sub-block pairs, ``Gab`` [n, S, S] = ``Σ u_i H_ij``
    (the min's unit is 1 on its sub-block) and ``Gbb`` [S, S] = ``Σ H_ij``."""
    n, S, L = u.shape
    Hr = HJ.astype(np.float32).reshape(S, L, S * L)                           # [t, l, qk]
    Hs = HJ.reshape(S * L, S, L).sum(axis=2)                                  # [qk, S]: Σ_{j in t} H_ij
    Hs3 = Hs.astype(np.float32).reshape(S, L, S)
    Gaa = np.empty((n, S, S))
    Gab = np.empty((n, S, S))
    for r0 in range(0, n, GRAM_ROWS):       # float32 products (u are small integers), S batched GEMMs
        r1 = min(n, r0 + GRAM_ROWS)
        us = np.ascontiguousarray(u[r0:r1].transpose(1, 0, 2), np.float32)     # [S, rows, L]
        Y = np.matmul(us, Hr).reshape(S, r1 - r0, S, L)                        # Y[t, n, s, l] = (H_J,t u_t)_(s,l)
        Gaa[r0:r1] = np.einsum("snl,tnsl->nst", us, Y)
        Gab[r0:r1] = np.matmul(us, Hs3).transpose(1, 0, 2)
    Gbb = Hs.reshape(S, L, S).sum(axis=1)
    return Gaa, Gab, Gbb


class _Block:
    """One block-column's fields for all rows, as float64/int64 arrays: ``u = q - zq`` [n, S, L], ``d``,
    ``dmin`` [n], ``sc``, ``mn`` [n, S] (ones where the format has none), and the decode."""

    def __init__(self, qtype: T, q, d, dmin, sc, mn):
        self.tr, self.q, self.d, self.dmin, self.sc, self.mn = TRAITS[qtype], q, d, dmin, sc, mn
        self.ranges = _ranges(qtype)
        self.kmin = self.tr.mn_bits > 0             # B = -dmin * mn (K-quants); B = m (Q4_1, Q5_1)
        self.bsign = -1.0 if self.kmin else 1.0

    @property
    def u(self) -> np.ndarray:
        tr = self.tr
        return (self.q - tr.zq).astype(np.float64).reshape(len(self.d), tr.n_sub, tr.sub_len)

    def A(self) -> np.ndarray:
        return self.d[:, None] * self.sc

    def B(self) -> np.ndarray:
        return self.bsign * self.dmin[:, None] * self.mn if self.tr.has_min else np.zeros(self.sc.shape)

    def decode(self) -> np.ndarray:
        n = len(self.d)
        return (self.A()[..., None] * self.u + self.B()[..., None]).reshape(n, -1)


@dataclass
class _Quad:
    """A block's objective in ``theta = (A, B)`` (its decode ``A_s u + B_s``) with the rest of the row held:
    ``theta' G theta - 2 theta' r``, ``G`` from :func:`_block_gram`, ``r`` from ``c = H_JJ xb + g_J`` (``xb``
    the block's decode, ``g_J`` the row error's product with ``H`` on its columns)."""
    Gaa: np.ndarray
    Gab: np.ndarray
    Gbb: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    has_min: bool

    @classmethod
    def of(cls, blk: "_Block", HJ: np.ndarray, xb: np.ndarray, gJ: np.ndarray) -> "_Quad":
        u = blk.u
        n, S, L = u.shape
        c = (xb @ HJ + gJ).reshape(n, S, L)
        return cls(*_block_gram(u, HJ), (u * c).sum(axis=2), c.sum(axis=2), blk.tr.has_min)

    def cost(self, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        q = np.einsum("ns,nst,nt->n", A, self.Gaa, A) - 2 * (A * self.ra).sum(axis=1)
        if self.has_min:
            q += 2 * np.einsum("ns,nst,nt->n", A, self.Gab, B) + np.einsum("ns,st,nt->n", B, self.Gbb, B) \
                - 2 * (B * self.rb).sum(axis=1)
        return q

    def scalars(self, a1: np.ndarray, b1: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The least-squares fp16 ``d`` (and ``dmin`` or ``m`` with a min) of ``A = d a1``, ``B = m b1``;
        rows whose system is singular keep ``d``, ``m``."""
        g11 = np.einsum("ns,nst,nt->n", a1, self.Gaa, a1)
        r1 = (a1 * self.ra).sum(axis=1)
        if not self.has_min:
            return _fp16(np.where(g11 > 0, r1 / np.where(g11 > 0, g11, 1.0), d)), m
        g12 = np.einsum("ns,nst,nt->n", a1, self.Gab, b1)
        g22 = np.einsum("ns,st,nt->n", b1, self.Gbb, b1)
        r2 = (b1 * self.rb).sum(axis=1)
        det = g11 * g22 - g12 * g12
        ok = det > 1e-12 * g11 * g22
        sdet = np.where(ok, det, 1.0)
        return (_fp16(np.where(ok, (r1 * g22 - r2 * g12) / sdet, d)),
                _fp16(np.where(ok, (g11 * r2 - g12 * r1) / sdet, m)))


def _refit_block(blk: _Block, HJ: np.ndarray, xb: np.ndarray, gJ: np.ndarray, prm: RefitParams) -> None:
    """The block's fields (in place) that lower ``δᵀ H_JJ δ - 2 δᵀ g_J`` (``δ`` the change of its decode
    ``xb``, ``g_J`` the row error's product with ``H`` on its columns) from the current ones: integer
    coordinate descent, then least-squares fp16 scalars; rows keep their fields where nothing is lower."""
    tr = blk.tr
    S = blk.sc.shape[1]
    (slo, shi), (mlo, mhi) = blk.ranges
    Q = _Quad.of(blk, HJ, xb, gJ)
    Gaa, Gab, Gbb, ra, rb = Q.Gaa, Q.Gab, Q.Gbb, Q.ra, Q.rb
    has_min, kmin = tr.has_min, blk.kmin
    A0, B0 = blk.A(), blk.B()
    A, B = A0.copy(), B0.copy()
    db, mb = blk.d.copy(), blk.dmin.copy()
    scb, mnb = blk.sc.copy(), blk.mn.copy()
    diag_a = np.einsum("nss->ns", Gaa)
    diag_b = np.diag(Gbb)
    for _ in range(prm.rounds):
        for _ in range(prm.passes if (tr.sc_bits or kmin) else 0):
            for s in range(S):
                if tr.sc_bits:        # A_s's exact minimum given the rest, then the nearest integer sc_s
                    ok = (diag_a[:, s] > 0) & (db != 0)
                    num = ra[:, s] - np.einsum("nt,nt->n", Gaa[:, s], A) + diag_a[:, s] * A[:, s]
                    if has_min:
                        num -= np.einsum("nt,nt->n", Gab[:, s], B)
                    l = np.clip(np.rint(num / np.where(ok, diag_a[:, s] * db, 1.0)), slo, shi).astype(np.int64)
                    scb[:, s] = np.where(ok, l, scb[:, s])
                    A[:, s] = db * scb[:, s]
                if kmin:              # the same for B_s = -dmin * mn_s
                    ok = (diag_b[s] > 0) & (mb != 0)
                    num = rb[:, s] - B @ Gbb[s] + diag_b[s] * B[:, s] - np.einsum("nt,nt->n", Gab[:, :, s], A)
                    l = np.clip(np.rint(num / np.where(ok, -mb * diag_b[s], 1.0)), mlo, mhi).astype(np.int64)
                    mnb[:, s] = np.where(ok, l, mnb[:, s])
                    B[:, s] = -mb * mnb[:, s]
        # least squares over the fp16 scalars under the integers: A = d a1, B = dmin b1
        a1 = scb.astype(np.float64)
        b1 = blk.bsign * mnb.astype(np.float64)
        dn, mnew = Q.scalars(a1, b1, db, mb)
        fin = np.isfinite(dn) & np.isfinite(mnew)
        dn, mnew = np.where(fin, dn, db), np.where(fin, mnew, mb)
        An, Bn = dn[:, None] * a1, (mnew[:, None] * b1 if has_min else B)
        better = Q.cost(An, Bn) < Q.cost(A, B)
        db, mb = np.where(better, dn, db), np.where(better, mnew, mb)
        A = np.where(better[:, None], An, A)
        B = np.where(better[:, None], Bn, B)
    keep = Q.cost(A, B) < Q.cost(A0, B0)
    blk.d = np.where(keep, db, blk.d)
    blk.dmin = np.where(keep, mb, blk.dmin)
    blk.sc = np.where(keep[:, None], scb, blk.sc)
    blk.mn = np.where(keep[:, None], mnb, blk.mn)


def _polish_block(blk: _Block, HJ: np.ndarray, gJ: np.ndarray) -> None:
    """Coordinate descent over the block's codes under its fields: each weight in turn moves one code
    up or down (within ``0 .. 2^bits - 1``) where that lowers the row's error, ``gJ`` [n, qk] (the
    error's product with ``H`` on the block's columns) kept exact as it goes; ``blk.q`` and ``gJ`` are
    updated in place."""
    tr = blk.tr
    n = len(blk.d)
    step = np.repeat(blk.A(), tr.sub_len, axis=1).T.copy()                  # [qk, n]: value per code step
    qT = blk.q.T.copy()                                                     # [qk, n], rows contiguous
    gT = gJ.T.copy()
    hh = step * step * np.diag(HJ)[:, None]
    D = np.zeros((tr.qk, n))
    for j0 in range(0, tr.qk, BATCH):           # GPTQ's lazy batch: the batch's own H e kept exact,
        j1 = j0 + BATCH                         # the block's other columns updated once per batch
        for j in range(j0, j1):
            qj, c, gj = qT[j], step[j], gT[j]
            # f changes by dl^2 H_jj - 2 dl g_j for a change dl = +-c of the decoded weight
            gu = np.where(qj < tr.qmax, hh[j] - 2 * c * gj, np.inf)
            gd = np.where(qj > 0, hh[j] + 2 * c * gj, np.inf)
            up = gu < np.minimum(gd, 0)
            dn = ~up & (gd < 0)
            dl = np.where(up, c, np.where(dn, -c, 0.0))
            qT[j] = qj + up - dn
            gT[j0:j1] -= HJ[j0:j1, j][:, None] * dl
            D[j] = dl
        gT[:j0] -= HJ[:j0, j0:j1] @ D[j0:j1]
        gT[j1:] -= HJ[j1:, j0:j1] @ D[j0:j1]
    blk.q = qT.T.copy()
    gJ[:] = gT.T


def _refit_and_update(blk: _Block, HJ: np.ndarray, gJ: np.ndarray, prm: RefitParams) -> None:
    """:func:`_refit_block`, then ``gJ`` (in place) as the block's new decode leaves it."""
    before = blk.decode()
    _refit_block(blk, HJ, before, gJ, prm)
    gJ -= (blk.decode() - before) @ HJ


def improve(qtype: T, rows: np.ndarray, H: np.ndarray, blocks: np.ndarray, prm: RefitParams = DEFAULT,
            refit: bool = True, polish: bool = True) -> np.ndarray:
    """Rows [n, k] (column order), ``H`` [k, k] their input moment, ``blocks`` [n, bytes] of ``qtype``
    -> blocks with a lower ``tr(E H Eᵀ)`` per row (never higher). ``prm.sweeps`` passes over the
    block-columns in order; at each, its fields are refit, its codes descended, its fields refit again
    (``refit``/``polish`` False: that step left out), then its change is pushed onto the later columns'
    ``H e``; each pass starts from the exact ``H e``."""
    tr = TRAITS[qtype]
    n, k = rows.shape
    nb, S, qk = k // tr.qk, tr.n_sub, tr.qk
    f = layout.unpack(qtype, blocks)
    blk_q = f.q.reshape(n, nb, qk).astype(np.int64)
    d = f.d.reshape(n, nb).astype(np.float64)
    dmin = f.dmin.reshape(n, nb).astype(np.float64) if tr.has_min else np.zeros((n, nb))
    sc = f.sc.reshape(n, nb, S).astype(np.int64) if tr.sc_bits else np.ones((n, nb, S), np.int64)
    mn = f.mn.reshape(n, nb, S).astype(np.int64) if tr.mn_bits else np.ones((n, nb, S), np.int64)
    w = np.asarray(rows, np.float64)
    blks = [_Block(qtype, blk_q[:, b], d[:, b], dmin[:, b], sc[:, b], mn[:, b]) for b in range(nb)]
    x = np.concatenate([bl.decode() for bl in blks], axis=1)
    for _ in range(prm.sweeps):
        g = (w - x) @ H
        for b, bl in enumerate(blks):
            J = slice(b * qk, (b + 1) * qk)
            HJ = H[J, J]
            xb = x[:, J].copy()
            gJ = g[:, J].copy()
            if refit:
                _refit_and_update(bl, HJ, gJ, prm)
            if polish:
                _polish_block(bl, HJ, gJ)
                if refit:
                    _refit_and_update(bl, HJ, gJ, prm)
            delta = bl.decode() - xb
            x[:, J] += delta
            if J.stop < k:
                g[:, J.stop:] -= delta @ H[J, J.stop:]
    f.q = np.stack([bl.q for bl in blks], axis=1).reshape(-1, qk).astype(np.int32)
    f.d = np.stack([bl.d for bl in blks], axis=1).reshape(-1).astype(np.float32)
    if tr.has_min:
        f.dmin = np.stack([bl.dmin for bl in blks], axis=1).reshape(-1).astype(np.float32)
    if tr.sc_bits:
        f.sc = np.stack([bl.sc for bl in blks], axis=1).reshape(-1, S).astype(np.int32)
    if tr.mn_bits:
        f.mn = np.stack([bl.mn for bl in blks], axis=1).reshape(-1, S).astype(np.int32)
    return layout.pack(f).reshape(n, -1)


Sweep = Callable[..., np.ndarray]


def encode(sweep: Sweep, qtype: T, rows: np.ndarray, h: Hessian, start, importance: Optional[np.ndarray] = None,
           prm: RefitParams = DEFAULT) -> np.ndarray:
    """``sweep(qtype, rows, h, start, importance)`` (:func:`ggufq.quant.gptq.encode`), then :func:`improve`."""
    from .. import blas
    out = np.asarray(sweep(qtype, rows, h, start, importance)).reshape(rows.shape[0], -1)
    with blas.threads(1) if h.n <= SMALL else contextlib.nullcontext():
        return improve(qtype, rows, h.moment_natural(), out, prm)
