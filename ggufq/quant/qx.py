"""ggml's symmetric scale searches, vectorised over many groups at once.

NumPy counterparts of ``make_qx_quants``, ``make_qp_quants`` and
``make_q3_quants`` in ggml-quants.c. Every function takes ``x`` as float32
``[n_groups, group_size]`` (plus optional weights of the same shape) and returns
``(scale float32 [n_groups], L [n_groups, group_size])`` with the codes exactly
as the C function leaves them in its ``L`` buffer.

Precision: arithmetic is float32 in the same operation order as the C code
(ggml-base is built without FMA contraction), and sums run sequentially over
the group: internally groups are laid out ``[group_size, n]`` so that NumPy's
reduction over axis 0 adds element after element, exactly like the C loop.
Groups are processed in chunks so that the working set stays in cache.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .common import clip_ufunc, transpose_f32, transpose_u8

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
_MAGIC = F32(12582912.0)
_BIAS = 0x00400000      # nearest_int(v) = (bits(v + 12582912.f) & 0x7FFFFF) - _BIAS (any float v)
_MANT = np.int32(0x007FFFFF)
# groups per internal chunk: [16, 16384] float32 = 1 MiB per temporary
CHUNK_GROUPS = 16384


def nearest_int_exact(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit (the 12582912.f trick), int32.

    Equals round-half-to-even for |v| <= 4194303 and reproduces C's wrapped
    result beyond that (ggml builds without asserts), where an unbounded ratio
    such as ``x*sl2/slx`` can land.
    """
    s = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (s & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def nearest_f(q: np.ndarray, lo, hi, tmp: np.ndarray) -> np.ndarray:
    """``clamp(nearest_int(q), lo, hi)`` as float32 (``lo`` None: no lower bound).

    Where every finite ``|q|`` is at most 4194303 (ggml's own bound), nearest_int is
    round-half-even, done here in float (``(q + 12582912) - 12582912``); otherwise
    (rare: a ratio with a divisor close to 0) the bit-exact integer path. ``tmp``
    (scratch of q's shape) may hold the result."""
    np.abs(q, out=tmp)
    if np.fmax.reduce(tmp, axis=None) <= F32(4194303):
        r = np.add(q, _MAGIC, out=tmp)
        r -= _MAGIC
    else:
        r = nearest_int_exact(q).astype(F32)
    if lo is None:
        return clip_ufunc(r, F32(-np.inf), hi, out=r)   # (clip is ~3x faster than np.minimum by a scalar)
    return clip_ufunc(r, lo, hi, out=r)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0, element after element (C's ``for`` loop order).

    Only for C-contiguous ``a``: on a transposed view NumPy reorders the loops
    and sums pairwise.
    """
    assert a.flags.c_contiguous
    return np.add.reduce(a, axis=0)


def _chunked(fn, arrays, n_groups, l_dtype=np.int8):
    """Run ``fn`` on transposed chunks [group_size, c] and stitch (scale, L)."""
    out_s = np.empty(n_groups, dtype=F32)
    out_l = None
    for lo in range(0, n_groups, CHUNK_GROUPS):
        hi = min(lo + CHUNK_GROUPS, n_groups)
        parts = [None if a is None else transpose_f32(np.asarray(a[lo:hi], dtype=F32)) for a in arrays]
        s, LT = fn(*parts)
        if out_l is None:
            out_l = np.empty((n_groups, LT.shape[0]), dtype=LT.dtype)
        out_s[lo:hi] = s
        out_l[lo:hi] = transpose_u8(LT.view(np.uint8)).view(LT.dtype)
    if out_l is None:
        out_l = np.empty((0, arrays[0].shape[1]), dtype=l_dtype)
    return out_s, out_l


def _check(x, w):
    x = np.asarray(x, dtype=F32)
    if x.ndim != 2:
        raise ValueError(f"groups must be 2-D [n_groups, group_size], got {x.shape}")
    if w is not None:
        w = np.asarray(w, dtype=F32)
        if w.shape != x.shape:
            w = np.broadcast_to(w, x.shape)
    return x, w


def _absmax_signed(xT: np.ndarray):
    """(amax, signed value of the first element with the largest |x|) per column.

    Column-wise argmax is slow in NumPy; the sign is found from max/min and
    only columns holding both +amax and -amax look up which comes first.
    """
    hi = xT.max(axis=0)
    lo = xT.min(axis=0)
    amax = np.maximum(hi, -lo)
    mx = np.where(hi >= amax, hi, lo)
    both = np.flatnonzero((hi == amax) & (lo == -amax) & (amax > 0))
    if both.size:
        sub = np.take(xT, both, axis=1)
        first = np.argmax(np.abs(sub), axis=0)
        mx[both] = sub[first, np.arange(both.size)]
    return amax, mx


# ---------------------------------------------------------------- coordinate search

def _refine(xT, wT, wxT, L, sumlx, suml2, nmax: int, qp: bool, p1=None, p2=None) -> None:
    """ggml's ``for itry < 5: for i < n: try new_l = nearest_int(x[i]*sl2/slx)`` loop, in place.

    ``L`` float32 [gs, n] holds the codes (for make_qp_quants: the uint8 buffer's
    value), ``sumlx``/``suml2`` [n] the running sums; all are updated in place.
    ``p1``/``p2``: optional ``wx*L`` and ``w*L*L`` for the starting codes.

    Position after position, as in C, each step vectorised over the groups: a group's
    state changes only at its own position ``i``, so the sums seen at ``i`` are those the
    sequential loop sees. ``wx*L`` and ``w*L*L`` are computed for every position at the
    start of a pass (``L[i]`` is only written at step ``i``). Groups that changed nothing
    in a pass stop, as in C; the others go on in a compacted copy.

    Long because it transcribes one C loop of ggml's make_qx_quants (vectorized over groups) and
    keeps its operation order.
    """
    gs, n = xT.shape
    x, w, wx, Lc = xT, wT, wxT, L
    sx, s2 = sumlx.copy(), suml2.copy()
    cols = None                                 # columns of the compacted copy (None: all)
    fz = F32(0)
    lo, hi = (None, F32(nmax)) if qp else (F32(-nmax), F32(nmax - 1))
    bufs = np.empty((4, n), F32)
    okbuf = np.empty((2, n), bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            if p1 is None:
                p1 = wx * Lc
                p2 = w * Lc
                p2 *= Lc
            m = x.shape[1]
            changed = np.zeros(m, dtype=bool)
            sxx = sx * sx
            slx, sl2, q, t = (buf[:m] for buf in bufs)
            ok, pos = okbuf[0][:m], okbuf[1][:m]
            for i in range(gs):
                np.subtract(sx, p1[i], out=slx)
                np.subtract(s2, p2[i], out=sl2)
                np.multiply(x[i], sl2, out=q)
                q /= slx
                nlf = nearest_f(q, lo, hi, t)
                Li = Lc[i]
                np.not_equal(nlf, Li, out=ok)
                np.greater(slx, fz, out=pos)
                ok &= pos
                if qp:
                    np.greater(sl2, fz, out=pos)
                    ok &= pos
                j = np.flatnonzero(ok)               # the few positions whose code would change
                if j.size == 0:
                    continue
                nlj = nlf[j]
                slx_n = wx[i][j] * nlj
                slx_n += slx[j]
                sl2_n = w[i][j] * nlj
                sl2_n *= nlj
                sl2_n += sl2[j]
                a = slx_n * slx_n
                a *= s2[j]
                acc = a > sxx[j] * sl2_n
                if not qp:
                    acc &= sl2_n > fz
                if not acc.any():
                    continue
                j = j[acc]
                # make_qp_quants stores the code in a uint8 buffer
                Li[j] = (nlj[acc].astype(np.int32) & 0xFF).astype(F32) if qp else nlj[acc]
                sx[j] = slx_n[acc]
                s2[j] = sl2_n[acc]
                sxx[j] = sx[j] * sx[j]
                changed[j] = True
            if cols is None:
                sumlx[:], suml2[:] = sx, s2
            else:
                L[:, cols] = Lc
                sumlx[cols], suml2[cols] = sx, s2
            sel = np.flatnonzero(changed)
            if sel.size == 0:
                break
            p1 = p2 = None
            if sel.size < changed.size:
                cols = sel if cols is None else cols[sel]
                x, w, wx, Lc = (np.take(a, sel, axis=1) for a in (x, w, wx, Lc))
                sx, s2 = sx[sel], s2[sel]


# ---------------------------------------------------------------- make_qx_quants

def _rmse_weights(xT: np.ndarray, rmse_type: int) -> np.ndarray:
    if rmse_type == 1:
        return xT * xT
    if rmse_type == 2:
        return np.ones_like(xT)
    if rmse_type == 3:
        return np.abs(xT)
    return np.sqrt(np.abs(xT))


def make_qx_quants_T(xT: np.ndarray, nmax: int, rmse_type: int = 1, wT: Optional[np.ndarray] = None):
    """make_qx_quants on transposed groups ``xT [group_size, n]``; returns (scale [n], L int8 [group_size, n]).

    Long because it transcribes ggml's make_qx_quants, step by step, for bit-exact output."""
    amax, mx = _absmax_signed(xT)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    fnmax = F32(nmax)
    lo, hi = F32(-nmax), F32(nmax - 1)
    iscale0 = (-fnmax) / mx

    lbuf = np.empty_like(xT)

    def codes(isc):
        t = np.multiply(xT, isc, out=lbuf)
        np.rint(t, out=t)
        return clip_ufunc(t, lo, hi, out=t)

    if rmse_type == 0:
        best_isc = iscale0
        scale = F32(1) / iscale0
    else:
        return_early = rmse_type < 0
        w = wT if wT is not None else _rmse_weights(xT, abs(rmse_type))
        wx = w * xT
        tbuf = np.empty_like(xT)

        def sums(isc):
            l = codes(isc)
            slx = _seq_sum(np.multiply(wx, l, out=tbuf))
            l2 = np.multiply(w, l, out=tbuf)
            l2 *= l
            return slx, _seq_sum(l2)

        sumlx, suml2 = sums(iscale0)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        if return_early:
            scale = np.where(suml2 > 0, F32(0.5) * (scale + F32(1) / iscale0), F32(1) / iscale0).astype(F32)
            best_isc = iscale0
        else:
            best = scale * sumlx
            best_isc = iscale0
            with np.errstate(divide="ignore", invalid="ignore"):
                for i_s in range(-9, 10):
                    if i_s == 0:
                        continue
                    isc = -(fnmax + F32(0.1) * F32(i_s)) / mx
                    slx, sl2 = sums(isc)
                    upd = slx * slx > best * sl2
                    upd &= sl2 > 0
                    j = np.flatnonzero(upd)
                    if j.size:
                        new_scale = slx[j] / sl2[j]
                        scale[j] = new_scale
                        best[j] = new_scale * slx[j]
                        best_isc[j] = isc[j]
    L = codes(best_isc)
    L += fnmax
    L = L.astype(np.int8)
    if zero.any():
        L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def make_qx_quants(x: np.ndarray, nmax: int, rmse_type: int = 1, qw: Optional[np.ndarray] = None):
    """ggml's make_qx_quants over groups ``x [n_groups, group_size]``.

    ``qw``: optional weights ``[n_groups, group_size]`` (broadcastable); without
    them ``rmse_type`` picks the weights (1: x², 2: 1, 3: |x|, else sqrt|x|;
    0: plain absmax rounding; negative: one refinement step, then return).
    Returns ``(scale float32 [n_groups], L int8 [n_groups, group_size])`` with
    ``L = l + nmax`` in ``[0, 2*nmax-1]`` (0 for all-zero groups).
    """
    x, qw = _check(x, qw)
    return _chunked(lambda xt, wt: make_qx_quants_T(xt, nmax, rmse_type, wt), [x, qw], x.shape[0])


# ---------------------------------------------------------------- make_q3_quants

def make_q3_quants_T(xT: np.ndarray, nmax: int, do_rmse: bool = True):
    """make_q3_quants on transposed groups ``xT [group_size, n]``; returns (scale [n], L int8 [group_size, n])."""
    gs, n = xT.shape
    amax, mx = _absmax_signed(xT)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    fnmax = F32(nmax)
    lo, hi = F32(-nmax), F32(nmax - 1)
    iscale = (-fnmax) / mx
    L = xT * iscale
    np.rint(L, out=L)
    clip_ufunc(L, lo, hi, out=L)
    if not do_rmse:
        scale = F32(1) / iscale
    else:
        w = xT * xT
        wx = w * xT
        p1 = wx * L
        sumlx = _seq_sum(p1)
        p2 = w * L
        p2 *= L
        suml2 = _seq_sum(p2)
        _refine(xT, w, wx, L, sumlx, suml2, nmax, qp=False, p1=p1, p2=p2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = (L + fnmax).astype(np.int8)
    if zero.any():
        L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int, do_rmse: bool = True):
    """ggml's make_q3_quants over groups ``x [n_groups, group_size]``.

    Returns ``(scale float32 [n_groups], L int8 [n_groups, group_size])``,
    ``L = l + nmax`` (0 for all-zero groups).
    """
    x, _ = _check(x, None)
    return _chunked(lambda xt: make_q3_quants_T(xt, nmax, do_rmse), [x], x.shape[0])


# ---------------------------------------------------------------- make_qp_quants

def make_qp_quants_T(xT: np.ndarray, nmax: int, wT: np.ndarray):
    """make_qp_quants on transposed groups ``xT [group_size, n]``; returns (scale [n], L uint8 [group_size, n])."""
    gs, n = xT.shape
    mx = np.maximum(_seq_max0(xT), F32(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    fnmax = F32(nmax)
    iscale = fnmax / mx
    # first pass stores nearest_int in a uint8 buffer without clamping
    L0 = nearest_int_exact(xT * iscale) & 0xFF
    scale = F32(1) / iscale
    d = xT - scale * L0.astype(F32)
    best_mse = _seq_sum((wT * d) * d)
    for i_s in range(-4, 5):
        if i_s == 0:
            continue
        isc = (F32(0.1) * F32(i_s) + fnmax) / mx
        sc = F32(1) / isc
        l = np.minimum(nearest_int_exact(xT * isc), nmax).astype(F32)
        d = xT - sc * l
        mse = _seq_sum((wT * d) * d)
        upd = mse < best_mse
        best_mse = np.where(upd, mse, best_mse)
        iscale = np.where(upd, isc, iscale)
    li = np.minimum(nearest_int_exact(xT * iscale), nmax)
    lf = li.astype(F32)
    wx = wT * xT
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum((wT * lf) * lf)
    Lu = (li & 0xFF).astype(F32)  # what the uint8 buffer holds
    _refine(xT, wT, wx, Lu, sumlx, suml2, nmax, qp=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = Lu.astype(np.uint8)
    if zero.any():
        L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def _seq_max0(xT):
    return np.max(xT, axis=0)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray):
    """ggml's make_qp_quants (non-negative values, weighted) over groups ``x [n_groups, group_size]``.

    ``qw``: weights ``[n_groups, group_size]`` (required, as in ggml).
    Returns ``(scale float32 [n_groups], L uint8 [n_groups, group_size])``, L in ``[0, nmax]``.
    """
    if qw is None:
        raise ValueError("make_qp_quants needs weights")
    x, qw = _check(x, qw)
    return _chunked(lambda xt, wt: make_qp_quants_T(xt, nmax, wt), [x, qw], x.shape[0], np.uint8)
