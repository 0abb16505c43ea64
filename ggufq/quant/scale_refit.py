"""Refit an i-quant row's block scales to its codes under the full input moment.

The error-feedback sweeps (:mod:`ggufq.quant.iq4_gptq`, :mod:`ggufq.quant.iq2_gptq`,
:mod:`ggufq.quant.iq3_gptq`) choose the codes of a block-column under scales that the ggml
encoder picked beforehand, on ``diag(H)`` and the weights as updated so far. Once the codes are
fixed, a row decodes as ``V s``: ``V`` [k, nb] holds each weight's decoded value at unit scale
(a table value or a signed grid value) in its sub-block's column, ``s`` the sub-block scales. The
product error of the row is then the quadratic ``f(s) = (w - V s)ᵀ H (w - V s) =
sᵀ G s - 2 rᵀ s + wᵀ H w`` with ``G = Vᵀ H V`` and ``r = Vᵀ H w`` -- the whole row at once, across
super-blocks.

The scales are stored as ``s_b = d_t · (alpha + beta · l_b)``: an fp16 ``d_t`` per 256-block and a
small integer ``l_b`` per sub-block (IQ4_XS: ``d (l - 32)``, 6 bits per 32 weights; IQ3_S: ``d (1 +
2 l)``, 4 bits per 32; IQ2_S: ``d (0.5 + l) / 4``, 4 bits per 16). :func:`refit` minimises ``f`` over
those fields, starting from the sweep's: coordinate descent over the ``l_b`` (each step is the exact
integer minimum of a convex quadratic in one variable, so ``f`` never rises), then the least-squares
``d`` per super-block under the new ``l``, rounded to fp16 and kept only where ``f`` drops, then
another descent.

With the scales refitted the codes are no longer the best for them: :func:`polish_codes` (IQ4_XS,
one table step up or down per weight) and :func:`polish_grid` (IQ2_S, IQ3_S, the whole grid per
unit of 8 or 4 weights, signs kept) are coordinate descents over the codes under the full ``H``,
each step taken only where it lowers ``f``. :func:`encode` chains sweep, refit and a format's preset
number of (descent, refit) rounds; ``f`` never rises along the chain. The file keeps the format's
bytes layout and size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .gptq import Hessian

QK_K = 256
SMALL = 1024     # up to this many columns the refit runs on one BLAS thread (as calib.SMALL_FACTOR)
BATCH = 64       # columns per lazy update of the error's product with H in the code descents


@dataclass(frozen=True)
class Scheme:
    """Where a format keeps its scales: ``s = d · (alpha + beta · l)``, ``l`` in ``[0, lmax]``, one per
    ``sub`` weights, ``d`` fp16 in bytes 0:2 of each ``bsz``-byte block of ``qk`` weights; ``l`` as
    4-bit nibbles at bytes ``lo`` (two per byte, low first) or, with ``stride``, as the high nibble of
    byte ``lo + stride · b`` (the top bits of IQ2_XXS's and IQ3_XXS's sign words); for 6-bit ``l``
    its top two bits packed in the 16-bit word at bytes 2:4. ``lmax = 0``: no ``l`` (one fp16 scale
    per block: IQ4_NL). ``l_unit``: an ``l`` with a non-zero multiplier (decoding the
    codes at unit scale)."""
    bsz: int
    sub: int
    alpha: float
    beta: float
    lmax: int
    lo: int
    l_unit: int
    stride: int = 0
    qk: int = QK_K

    @property
    def per(self) -> int:
        return self.qk // self.sub

    def mult(self, ls: np.ndarray) -> np.ndarray:
        return self.alpha + self.beta * ls.astype(np.float64)

    def _at(self) -> np.ndarray:
        return self.lo + self.stride * np.arange(self.per)

    def read(self, blk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """blocks [n, ns, bsz] -> d [n, ns] float64, l [n, ns, per] int64."""
        d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
        if self.lmax == 0:
            return d, np.zeros((*blk.shape[:-1], self.per), np.int64)
        if self.stride:
            return d, (blk[..., self._at()] >> 4).astype(np.int64)
        nib = blk[..., self.lo:self.lo + self.per // 2].astype(np.int64)
        ls = np.stack([nib & 15, nib >> 4], axis=-1).reshape(*blk.shape[:-1], self.per)
        if self.lmax > 15:
            sh = blk[..., 2:4].copy().view("<u2")[..., 0].astype(np.int64)
            ls = ls | (((sh[..., None] >> (2 * np.arange(self.per))) & 3) << 4)
        return d, ls

    def write(self, blk: np.ndarray, d: np.ndarray, ls: np.ndarray) -> None:
        """Store d [n, ns] and l [n, ns, per] into blocks [n, ns, bsz] in place."""
        blk[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
        if self.lmax == 0:
            return
        if self.stride:
            at = self._at()
            blk[..., at] = (blk[..., at] & 15) | (ls.astype(np.uint8) << 4)
            return
        low = (ls & 15).astype(np.uint8)
        blk[..., self.lo:self.lo + self.per // 2] = low[..., 0::2] | (low[..., 1::2] << 4)
        if self.lmax > 15:
            sh = ((ls >> 4) << (2 * np.arange(self.per))).sum(axis=-1).astype("<u2")
            blk[..., 2:4] = sh[..., None].view(np.uint8)


SCHEMES = {
    T.IQ4_XS: Scheme(136, 32, -32.0, 1.0, 63, 4, 33),
    T.IQ3_S: Scheme(110, 32, 1.0, 2.0, 15, 106, 0),
    T.IQ2_S: Scheme(82, 16, 0.125, 0.25, 15, 74, 0),
    T.IQ2_XS: Scheme(74, 16, 0.125, 0.25, 15, 66, 0),
    T.IQ2_XXS: Scheme(66, 32, 0.125, 0.25, 15, 9, 0, stride=8),
    T.IQ3_XXS: Scheme(98, 32, 0.25, 0.5, 15, 69, 0, stride=4),
    T.IQ4_NL: Scheme(18, 32, 1.0, 0.0, 0, 0, 0, qk=32),
}


@dataclass(frozen=True)
class Codes:
    """One code per weight, decoding to ``values[code]`` at unit scale: the low nibbles of bytes
    ``off .. off + qk/2`` hold weights 0-15 of each 32, the high ones 16-31 (ggml's order)."""
    values: np.ndarray
    off: int

    def read(self, blk: np.ndarray, qk: int) -> np.ndarray:
        """blocks [n, ns, bsz] of ``qk`` weights -> codes [n, ns * qk] int64 in column order."""
        n, ns, _ = blk.shape
        qs = blk[..., self.off:self.off + qk // 2].reshape(n, ns, qk // 32, 16).astype(np.int64)
        return np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, -1)

    def write(self, blk: np.ndarray, q: np.ndarray, qk: int) -> None:
        """Store codes [n, ns * qk] into blocks [n, ns, bsz] of ``qk`` weights in place."""
        from .iq4_gptq import _pack_codes
        n, ns, _ = blk.shape
        blk[..., self.off:self.off + qk // 2] = _pack_codes(q.reshape(n, ns, qk // 32, 32)).reshape(n, ns, qk // 2)


def _codes() -> dict:
    from .iq4 import KVALUES
    kv = KVALUES.astype(np.float64)
    return {T.IQ4_XS: Codes(kv, 8), T.IQ4_NL: Codes(kv, 2)}


CODES = _codes()


@dataclass(frozen=True)
class RefitParams:
    passes: int = 3          # coordinate-descent passes over the l of a row, per round
    rounds: int = 2          # (descent, fp16 d refit) rounds
    polish: int = 0          # (code descent, refit) rounds after the first refit
    chunk: int = 1 << 22     # rows per G computation: at most this many float64 in G


REFIT = RefitParams()
# per format, as measured (paired KLD on tinyllama, docs/IQ.md): the code descents pay at every type
PRESETS = {t: RefitParams(polish=2) for t in SCHEMES}


def _unit_values(qtype: T, sch: Scheme, blk: np.ndarray) -> np.ndarray:
    """What each weight decodes to at unit scale: [n, k] float64 (d = 1, every l = l_unit)."""
    n, ns, _ = blk.shape
    b = blk.copy()
    sch.write(b, np.ones((n, ns)), np.full((n, ns, sch.per), sch.l_unit, np.int64))
    v = gq.dequantize(b.reshape(n, -1), qtype).astype(np.float64)
    return v / float(sch.mult(np.array(sch.l_unit)))


def _moments(V: np.ndarray, w: np.ndarray, H: np.ndarray, sub: int) -> tuple[np.ndarray, np.ndarray]:
    """G [n, nb, nb] = Vᵀ H V and r [n, nb] = Vᵀ H w for rows' unit values V [n, k] (sub-blocks of
    ``sub`` consecutive columns) and weights w [n, k]."""
    n, k = V.shape
    nb = k // sub
    r = (V * (w @ H)).reshape(n, nb, sub).sum(axis=2)
    G = np.empty((n, nb, nb))
    for c in range(nb):
        t = V[:, c * sub:(c + 1) * sub] @ H[c * sub:(c + 1) * sub]           # [n, k]
        G[:, :, c] = (V * t).reshape(n, nb, sub).sum(axis=2)
    return G, r


def _cost(G: np.ndarray, r: np.ndarray, s: np.ndarray) -> np.ndarray:
    """f(s) - wᵀ H w per row."""
    return np.einsum("nb,nbc,nc->n", s, G, s) - 2 * (r * s).sum(axis=1)


def refit_fields(sch: Scheme, G: np.ndarray, r: np.ndarray, d: np.ndarray, ls: np.ndarray,
                 prm: RefitParams = REFIT) -> tuple[np.ndarray, np.ndarray]:
    """The fields' minimum of ``f`` near the given ones: d [n, ns] (fp16 values), l [n, nb] ints.
    ``f`` at the result is never above ``f`` at the start."""
    n, nb = ls.shape
    ns = d.shape[1]
    per = nb // ns
    ls = ls.copy()
    d = d.astype(np.float16).astype(np.float64)
    dd = np.repeat(d, per, axis=1)                                          # [n, nb]
    s = dd * sch.mult(ls)
    diag = np.einsum("nbb->nb", G)
    for _ in range(prm.rounds):
        for _ in range(prm.passes if sch.lmax else 0):
            for b in range(nb):
                ok = (diag[:, b] > 0) & (dd[:, b] != 0)
                # the row's exact minimum in s_b given the rest, then the nearest stored l
                sb = (r[:, b] - np.einsum("nc,nc->n", G[:, b], s) + diag[:, b] * s[:, b]) / np.where(ok, diag[:, b], 1.0)
                lb = np.rint((sb / np.where(ok, dd[:, b], 1.0) - sch.alpha) / sch.beta)
                lb = np.clip(lb, 0, sch.lmax).astype(np.int64)
                lb = np.where(ok, lb, ls[:, b])
                ls[:, b] = lb
                s[:, b] = dd[:, b] * sch.mult(lb)
        # least-squares d per super-block under these l: s = A d, A [nb, ns] per row
        a = sch.mult(ls).reshape(n, ns, per)
        Ga = G.reshape(n, ns, per, ns, per)
        Gd = np.einsum("nsi,nsitj,ntj->nst", a, Ga, a)
        rd = np.einsum("nsi,nsi->ns", a, r.reshape(n, ns, per))
        Gd = Gd + np.eye(ns) * (1e-12 * np.abs(Gd).max(axis=(1, 2), keepdims=True) + 1e-300)
        dn = np.linalg.solve(Gd, rd[..., None])[..., 0]
        with np.errstate(over="ignore", invalid="ignore"):
            dn = dn.astype(np.float16).astype(np.float64)
        fin = np.isfinite(dn).all(axis=1)
        dn = np.where(fin[:, None], dn, d)
        sn = np.repeat(dn, per, axis=1) * sch.mult(ls)
        better = _cost(G, r, sn) < _cost(G, r, s)
        d = np.where(better[:, None], dn, d)
        dd = np.repeat(d, per, axis=1)
        s = np.where(better[:, None], sn, s)
    return d, ls


def refit(qtype: T, rows: np.ndarray, H: np.ndarray, blocks: np.ndarray,
          prm: RefitParams = REFIT) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, k] (natural column order), ``H`` [k, k] their input moment, ``blocks`` [n, bytes] of
    ``qtype`` -> (the blocks with refitted scale fields, ``f - wᵀHw`` per row after the refit)."""
    sch = SCHEMES[qtype]
    n, k = rows.shape
    ns, nb = k // sch.qk, k // sch.sub
    out = np.array(blocks, np.uint8).reshape(n, ns, sch.bsz)
    cost = np.empty(n)
    step = max(1, prm.chunk // (nb * nb))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        blk = out[r0:r1]
        w = np.asarray(rows[r0:r1], np.float64)
        G, r = _moments(_unit_values(qtype, sch, blk), w, H, sch.sub)
        d, ls = sch.read(blk)
        d, ls = refit_fields(sch, G, r, d, ls.reshape(r1 - r0, nb), prm)
        sch.write(blk, d, ls.reshape(r1 - r0, ns, sch.per))
        cost[r0:r1] = _cost(G, r, np.repeat(d, sch.per, axis=1) * sch.mult(ls))
    return out.reshape(n, -1), cost


def polish_codes(qtype: T, rows: np.ndarray, H: np.ndarray, blocks: np.ndarray,
                 passes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """IQ4_XS, IQ4_NL (``CODES``, one table code per weight): coordinate descent
    over the codes under the stored scales: each weight in turn takes the table entry next to its
    own (one up, one down) where that lowers ``f`` for its row, the error's product with ``H`` kept
    up to date. ``f`` never rises. Returns (blocks, ``f - wᵀHw``)."""
    sch, cod = SCHEMES[qtype], CODES[qtype]
    kv = cod.values
    top = len(kv) - 1
    n, k = rows.shape
    ns = k // sch.qk
    blk = np.array(blocks, np.uint8).reshape(n, ns, sch.bsz)
    q = cod.read(blk, sch.qk)
    d, ls = sch.read(blk)
    sc = np.repeat((d[..., None] * sch.mult(ls)).reshape(n, -1), sch.sub, axis=1)      # [n, k]
    w = np.asarray(rows, np.float64)
    e = w - sc * kv[q]
    g = e @ H
    hd = np.diag(H)
    for _ in range(passes):
        for j0 in range(0, k, BATCH):             # GPTQ's lazy batch: g of the batch's columns kept
            j1 = min(k, j0 + BATCH)               # exact, the rest updated once per batch
            gl = g[:, j0:j1].copy()
            D = np.zeros((n, j1 - j0))
            for j in range(j0, j1):
                qj, c, gj = q[:, j], sc[:, j], gl[:, j - j0]
                dn = c * (kv[np.maximum(qj - 1, 0)] - kv[qj])      # change of the decoded weight
                up = c * (kv[np.minimum(qj + 1, top)] - kv[qj])
                gd = dn * dn * hd[j] - 2 * dn * gj
                gu = up * up * hd[j] - 2 * up * gj
                take_up = gu < np.minimum(gd, 0)
                take_dn = ~take_up & (gd < 0)
                dl = np.where(take_up, up, np.where(take_dn, dn, 0.0))
                q[:, j] = qj + take_up - take_dn
                e[:, j] -= dl
                gl -= dl[:, None] * H[j, j0:j1]
                D[:, j - j0] = dl
            g[:, :j0] -= D @ H[j0:j1, :j0]
            g[:, j1:] -= D @ H[j0:j1, j1:]
            g[:, j0:j1] = gl
    cod.write(blk, q, sch.qk)
    cost = np.einsum("ni,ni->n", e, g) - np.einsum("ni,ni->n", w @ H, w)
    return blk.reshape(n, -1), cost


def polish_grid(qtype: T, rows: np.ndarray, H: np.ndarray, blocks: np.ndarray,
                 passes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: coordinate descent over the grid points under the stored
    scales and signs: each unit of ``g`` weights (8 or 4) in turn takes the grid point that minimises
    ``f`` for its row with every other weight's error as it stands (the current point is a candidate,
    so ``f`` never rises). For a unit ``J`` with decoded values ``q``, error product ``gJ = (H e)_J`` and a candidate ``q'``,
    ``f`` changes by ``q'ᵀH_JJ q' - 2 q'ᵀ(H_JJ q + gJ)`` plus terms that do not depend on ``q'``;
    the sign-pattern tabulation is that of :mod:`ggufq.quant.iq2_gptq`. Returns (blocks, ``f - wᵀHw``).

    Long because the grid search, the lazy batch update and the two formats' packing share its arrays."""
    from . import iq2_gptq, iq3_gptq
    sch = SCHEMES[qtype]
    cls = getattr(gq, qtype.name)
    cls.init_grid()
    grid = cls.grid.reshape(cls.grid_shape).astype(np.float64)           # [ng, gs]
    gs = grid.shape[1]
    gT = np.ascontiguousarray(grid.T)
    g2T = np.ascontiguousarray((grid[:, :, None] * grid[:, None, :]).reshape(grid.shape[0], gs * gs).T)
    sig = np.where((np.arange(1 << gs)[:, None] >> np.arange(gs)) & 1, -1.0, 1.0)
    sig2 = (sig[:, :, None] * sig[:, None, :]).reshape(-1, gs * gs)
    bits = (1 << np.arange(gs)).astype(np.int64)
    n, k = rows.shape
    ns = k // sch.qk
    blk = np.array(blocks, np.uint8).reshape(n, ns, sch.bsz)
    V = _unit_values(qtype, sch, blk)
    d, ls = sch.read(blk)
    sc = np.repeat((d[..., None] * sch.mult(ls)).reshape(n, -1), sch.sub, axis=1)   # [n, k]
    w = np.asarray(rows, np.float64)
    x = V * sc
    e = w - x
    g = e @ H
    pat = (V < 0).reshape(n, -1, gs).astype(np.int64) @ bits                       # [n, k / gs]
    gidx = np.empty((n, k // gs), np.int64)
    P = np.empty((1 << gs, grid.shape[0]))
    for _ in range(passes):
        for j0 in range(0, k, BATCH):             # lazy batch, as in polish_codes
            j1 = min(k, j0 + BATCH)
            gl = g[:, j0:j1].copy()
            D = np.zeros((n, j1 - j0))
            for u in range(j0 // gs, j1 // gs):
                J = slice(gs * u, gs * u + gs)
                L = slice(gs * u - j0, gs * u - j0 + gs)
                HJ = H[J, J]
                pu = pat[:, u]
                up = np.unique(pu)
                P[up] = np.einsum("pm,mj->pj", sig2[up] * HJ.reshape(1, -1), g2T)
                dq = sc[:, gs * u]
                q = x[:, J]
                b = np.einsum("ri,ik->rk", q, HJ) + gl[:, L]
                cost = P[pu] * (dq * dq)[:, None]
                cost -= (2 * dq)[:, None] * np.einsum("ri,ij->rj", b * sig[pu], gT)
                j = np.argmin(cost, axis=1)
                qn = dq[:, None] * sig[pu] * grid[j]
                dl = qn - q
                e[:, J] -= dl
                gl -= np.einsum("ri,ik->rk", dl, H[J, j0:j1])
                D[:, L] = dl
                x[:, J] = qn
                gidx[:, u] = j
            g[:, :j0] -= D @ H[j0:j1, :j0]
            g[:, j1:] -= D @ H[j0:j1, j1:]
            g[:, j0:j1] = gl
    per = QK_K // gs
    flat = blk.reshape(n * ns, -1)
    gi = gidx.reshape(n * ns, per)
    if qtype in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S):      # IQ2_XXS/XS: the kept signs keep their even parity
        new = iq2_gptq._pack(qtype, flat, gi, pat.reshape(n * ns, per).astype(np.uint8))
    else:
        p2 = pat.reshape(n * ns, 32, 2)
        new = iq3_gptq._pack(qtype, flat, gi, (p2[..., 0] | (p2[..., 1] << 4)).astype(np.uint8))
    cost = np.einsum("ni,ni->n", e, g) - np.einsum("ni,ni->n", w @ H, w)
    return new.reshape(n, -1), cost


Sweep = Callable[..., np.ndarray]


def encode(sweep: Sweep, qtype: T, rows: np.ndarray, h: Hessian, start, importance: Optional[np.ndarray] = None,
           prm: Optional[RefitParams] = None) -> np.ndarray:
    """``sweep(qtype, rows, h, start, importance)`` (an ``iq*_gptq.encode``), then :func:`refit`, then
    ``prm.polish`` rounds of the code descent (:func:`polish_codes` or :func:`polish_grid`) each
    followed by a refit; ``prm`` defaults to the format's preset (``PRESETS``)."""
    import contextlib

    from .. import blas
    prm = PRESETS[qtype] if prm is None else prm
    H = h.moment_natural()
    swept = sweep(qtype, rows, h, start, importance)
    # the refit's and the descents' products are [n, 32..64] x [.., k]: below ~1k columns BLAS threads
    # spin more than they compute on a busy machine (tinyllama IQ4_XS, encoder CPU-s: 13.9 with the
    # default two threads vs 6.7 with one for sweep + refit; 47.2 vs 16.7 with two descents)
    with blas.threads(1) if h.n <= SMALL else contextlib.nullcontext():
        out, _ = refit(qtype, rows, H, swept, prm)
        polish = polish_codes if qtype in CODES else polish_grid
        for _ in range(prm.polish):
            out, _ = refit(qtype, rows, H, polish(qtype, rows, H, out)[0], prm)
    return out
