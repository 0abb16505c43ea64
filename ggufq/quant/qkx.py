"""ggml's asymmetric (scale + min) searches, vectorised over many groups.

NumPy counterparts of ``make_qkx2_quants`` and ``make_qkx3_quants`` in
ggml-quants.c. Public functions take ``x`` float32 ``[n_groups, group_size]``
(+ weights of the same shape) and return ``(scale [n], the_min [n], L uint8
[n, group_size])``, ``the_min`` being ggml's ``*the_min`` (the negated offset,
>= 0). :func:`make_qkx_T` works on transposed groups ``[group_size, n]``.

Precision: float32 with the C code's operation order; sums run element after
element over the group (groups laid out ``[group_size, n]`` so that a reduction
over axis 0 adds row after row, like the C loop). The candidate scales of the
search are a Python loop (~20 steps), each step vectorised over all groups, in
preallocated buffers. The codes of the winning candidate are not copied at each
step: the search keeps the (iscale, min) that produced them and rounds once more
at the end, which gives the same codes. Groups go through in chunks so that the
temporaries stay in cache.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np

from .common import clip_ufunc, transpose_f32, transpose_u8

F32 = np.float32
CHUNK_GROUPS = 8192


def _seq_sum(a: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=0)


def _codes(xT, mn, isc, fnmax, out):
    """clamp(nearest_int(iscale*(x - min)), 0, nmax) as float32, into ``out``."""
    np.subtract(xT, mn, out=out)
    out *= isc
    np.rint(out, out=out)
    return clip_ufunc(out, F32(0), fnmax, out=out)


def _error(xT, wT, la, scale, mn, use_mad, out):
    """sum_i w[i] * f(scale*l[i] + min - x[i]), f = |.| or square, summed in C's order."""
    np.multiply(la, scale, out=out)
    out += mn
    out -= xT
    if use_mad:
        np.abs(out, out=out)
    else:
        np.multiply(out, out, out=out)
    out *= wT
    return _seq_sum(out)


def make_qkx_T(xT: np.ndarray, wT: Optional[np.ndarray], nmax: int, rmin: float, rdelta: float,
               nstep: int, use_mad: bool, strict_empty: bool, bufs=None):
    """Shared body of make_qkx2 (``strict_empty=False``: ``max == min``) and
    make_qkx3 (``strict_empty=True``: ``max <= min``). ``wT`` None means x² weights.
    Returns (scale [n], the_min [n], L uint8 [gs, n]).

    ``bufs``: optional three float32 arrays of at least ``xT.size`` elements to work in.

    Long because it transcribes ggml's make_qkx2/3_quants search, step by step, for bit-exact output."""
    gs, n = xT.shape
    if bufs is None:
        bufs = [np.empty(xT.size, F32) for _ in range(3)]
    la, wl, t = (b[:xT.size].reshape(gs, n) for b in bufs)
    if wT is None:
        wT = np.multiply(xT, xT, out=wl).copy()
    mn = np.minimum.reduce(xT, axis=0)
    mx = np.maximum.reduce(xT, axis=0)
    sum_w = _seq_sum(wT)
    sum_x = _seq_sum(np.multiply(wT, xT, out=t))
    z = np.flatnonzero(mn == 0)
    if z.size:                   # C keeps the first of equal minima: the sign of a zero min
        sub = np.take(xT, z, axis=1)
        mn[z] = sub[np.argmin(sub, axis=0), np.arange(z.size)]
    mn[mn > 0] = 0               # ``if (min > 0) min = 0``
    empty = (mx <= mn) if strict_empty else (mx == mn)
    fnmax = F32(nmax)
    best_isc = fnmax / np.where(empty, F32(1), mx - mn)
    scale = F32(1) / best_isc
    best_mn = mn.copy()                      # the min the best codes were rounded against
    _codes(xT, mn, best_isc, fnmax, la)
    best = _error(xT, wT, la, scale, mn, use_mad, t)
    if nstep >= 1:
        frmin, frdelta = F32(rmin), F32(rdelta)
        with np.errstate(divide="ignore", invalid="ignore"):
            for step in range(nstep + 1):
                # ggml reads the running ``min`` here: once a candidate wins, later
                # candidates scale from the new offset
                isc = (frmin + frdelta * F32(step) + fnmax) / (mx - mn)
                _codes(xT, mn, isc, fnmax, la)
                np.multiply(wT, la, out=wl)
                sum_l = _seq_sum(wl)
                sum_l2 = _seq_sum(np.multiply(wl, la, out=t))
                sum_xl = _seq_sum(np.multiply(wl, xT, out=t))
                D = sum_w * sum_l2 - sum_l * sum_l
                this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
                this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
                pos = this_min > 0
                if pos.any():
                    this_min[pos] = F32(0)
                    this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
                err = _error(xT, wT, la, this_scale, this_min, use_mad, t)
                better = err < best
                better &= D > 0
                j = np.flatnonzero(better)
                if j.size:
                    best[j] = err[j]
                    scale[j] = this_scale[j]
                    best_isc[j] = isc[j]
                    best_mn[j] = mn[j]
                    mn[j] = this_min[j]
    L = _codes(xT, best_mn, best_isc, fnmax, la).astype(np.uint8)
    if empty.any():
        L[:, empty] = 0
        scale = np.where(empty, F32(0), scale)
    return scale.astype(F32), (-mn).astype(F32), L


Weights = Union[None, np.ndarray, Callable[[np.ndarray], np.ndarray]]


def search_groups(x: np.ndarray, w: Weights, **kw):
    """make_qkx_T over groups ``x [n, gs]`` in chunks of CHUNK_GROUPS; ``w``: None (x²), weights
    ``[n, gs]`` or a function of the transposed chunk ``xT [gs, c] -> wT [gs, c]``.
    Returns (scale [n], the_min [n], L uint8 [n, gs])."""
    x = np.asarray(x, dtype=F32)
    n, gs = x.shape
    scale = np.empty(n, F32)
    the_min = np.empty(n, F32)
    L = np.empty(x.shape, np.uint8)
    c = min(n, CHUNK_GROUPS)
    bufs = [np.empty(c * gs, F32) for _ in range(3)]
    xT = np.empty(c * gs, F32)
    for lo in range(0, n, CHUNK_GROUPS):
        hi = min(lo + CHUNK_GROUPS, n)
        xt = xT[:(hi - lo) * gs].reshape(gs, hi - lo)
        np.copyto(xt, x[lo:hi].T)
        if w is None or callable(w):
            wt = None if w is None else w(xt)
        else:
            wt = transpose_f32(np.asarray(w[lo:hi], dtype=F32))
        s, m, LT = make_qkx_T(xt, wt, bufs=bufs, **kw)
        scale[lo:hi], the_min[lo:hi], L[lo:hi] = s, m, transpose_u8(LT)
    return scale, the_min, L


def make_qkx2_quants(x: np.ndarray, w: Weights, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
    """ggml's make_qkx2_quants over groups ``x [n, gs]`` with weights ``w [n, gs]``."""
    return search_groups(x, w, nmax=nmax, rmin=rmin, rdelta=rdelta, nstep=nstep, use_mad=use_mad,
                         strict_empty=False)


def make_qkx3_quants(x: np.ndarray, w: Weights, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool):
    """ggml's make_qkx3_quants over groups ``x [n, gs]``; ``w`` None means x² weights."""
    return search_groups(x, w, nmax=nmax, rmin=rmin, rdelta=rdelta, nstep=nstep, use_mad=use_mad,
                         strict_empty=True)
