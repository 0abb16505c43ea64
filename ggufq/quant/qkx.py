"""ggml's asymmetric (scale + min) searches, vectorised over many groups.

NumPy counterparts of ``make_qkx2_quants`` and ``make_qkx3_quants`` in
ggml-quants.c. Public functions take ``x`` float32 ``[n_groups, group_size]``
(+ weights of the same shape) and return ``(scale [n], the_min [n], L uint8
[n, group_size])``, ``the_min`` being ggml's ``*the_min`` (the negated offset,
>= 0). The ``*_T`` variants work on transposed groups ``[group_size, n]``.

Precision: float32 with the C code's operation order; sums run element after
element over the group (groups laid out ``[group_size, n]`` so that a reduction
over axis 0 adds row after row, like the C loop). The candidate scales of the
search are a Python loop (~20 steps), each step vectorised over all groups.
Groups go through in chunks so that the temporaries stay in cache.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

F32 = np.float32
CHUNK_GROUPS = 8192


def _seq_sum(a: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=0)


def make_qkx_T(xT: np.ndarray, wT: Optional[np.ndarray], nmax: int, rmin: float, rdelta: float,
               nstep: int, use_mad: bool, strict_empty: bool):
    """Shared body of make_qkx2 (``strict_empty=False``: ``max == min``) and
    make_qkx3 (``strict_empty=True``: ``max <= min``). ``wT`` None means x² weights."""
    gs, n = xT.shape
    if wT is None:
        wT = xT * xT
    mn = np.minimum.reduce(xT, axis=0)
    mx = np.maximum.reduce(xT, axis=0)
    sum_w = _seq_sum(wT)
    sum_x = _seq_sum(wT * xT)
    mn = np.minimum(mn, F32(0))
    empty = (mx <= mn) if strict_empty else (mx == mn)
    rng = np.where(empty, F32(1), mx - mn)
    fnmax = F32(nmax)
    xm = xT - mn                           # x[i] - min
    iscale = fnmax / rng
    scale = F32(1) / iscale
    L = np.rint(xm * iscale)
    np.clip(L, F32(0), fnmax, out=L)
    diff = scale * L + mn - xT
    diff = np.abs(diff) if use_mad else diff * diff
    best = _seq_sum(wT * diff)
    if nstep >= 1:
        frmin, frdelta = F32(rmin), F32(rdelta)
        la = np.empty_like(xT)
        wl = np.empty_like(xT)
        t = np.empty_like(xT)
        with np.errstate(divide="ignore", invalid="ignore"):
            for step in range(nstep + 1):
                # ggml reads the running ``min`` here: once a candidate wins, later
                # candidates scale from the new offset
                isc = (frmin + frdelta * F32(step) + fnmax) / (mx - mn)
                np.subtract(xT, mn, out=la)
                la *= isc
                np.rint(la, out=la)
                np.clip(la, F32(0), fnmax, out=la)
                np.multiply(wT, la, out=wl)
                sum_l = _seq_sum(wl)
                np.multiply(wl, la, out=t)
                sum_l2 = _seq_sum(t)
                np.multiply(wl, xT, out=t)
                sum_xl = _seq_sum(t)
                D = sum_w * sum_l2 - sum_l * sum_l
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                pos = this_min > 0
                if pos.any():
                    this_min = np.where(pos, F32(0), this_min)
                    this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
                np.multiply(la, this_scale, out=t)
                t += this_min
                t -= xT
                if use_mad:
                    np.abs(t, out=t)
                else:
                    np.multiply(t, t, out=t)
                t *= wT
                err = _seq_sum(t)
                better = (D > 0) & (err < best)
                if better.any():
                    best = np.where(better, err, best)
                    scale = np.where(better, this_scale, scale)
                    mn = np.where(better, this_min, mn)
                    np.copyto(L, la, where=better)
    scale = np.where(empty, F32(0), scale).astype(F32)
    L = np.where(empty, F32(0), L)
    return scale, (-mn).astype(F32), L.astype(np.uint8)


def _chunked(x, w, **kw):
    x = np.asarray(x, dtype=F32)
    n = x.shape[0]
    scale = np.empty(n, F32)
    the_min = np.empty(n, F32)
    L = np.empty(x.shape, np.uint8)
    for lo in range(0, n, CHUNK_GROUPS):
        hi = min(lo + CHUNK_GROUPS, n)
        xT = np.ascontiguousarray(x[lo:hi].T)
        wT = None if w is None else np.ascontiguousarray(np.asarray(w[lo:hi], dtype=F32).T)
        s, m, LT = make_qkx_T(xT, wT, **kw)
        scale[lo:hi], the_min[lo:hi], L[lo:hi] = s, m, LT.T
    return scale, the_min, L


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
    """ggml's make_qkx2_quants over groups ``x [n, gs]`` with weights ``w [n, gs]``."""
    return _chunked(x, w, nmax=nmax, rmin=rmin, rdelta=rdelta, nstep=nstep, use_mad=use_mad, strict_empty=False)


def make_qkx3_quants(x: np.ndarray, w: Optional[np.ndarray], nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
    """ggml's make_qkx3_quants over groups ``x [n, gs]``; ``w`` None means x² weights."""
    return _chunked(x, w, nmax=nmax, rmin=rmin, rdelta=rdelta, nstep=nstep, use_mad=use_mad, strict_empty=True)
