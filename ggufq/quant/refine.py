"""Refine a block encoding in place of its fields, never worse per block.

Start from any valid encoding (ggml's own, or HQQ's) and alternate, vectorised
over all blocks:

1. codes given the scales (nearest code under the block's affine decode);
2. weighted least-squares refit of each sub-block's continuous (scale, min);
3. integer sub-scales / sub-mins: search round(.) + {-2..2} per sub-block
   (codes re-chosen for every candidate), the best per sub-block wins;
4. weighted least-squares refit of the fp16 super-scales (d, dmin) given the
   integer fields, codes re-chosen;

and keep a block's new fields only when its weighted error
``sum_j w_j (x_j - xhat_j)^2`` dropped. ``w`` is the importance per column
(ones without one), so the result is never worse than the start, block by block.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import layout
from .layout import TRAITS, Fields

EPS = np.float32(1e-30)


def _code_range(qtype: T) -> tuple[int, int]:
    tr = TRAITS[qtype]
    return (-128, 127) if qtype == T.Q8_0 else (0, tr.qmax)


def _int_range(qtype: T, field: str) -> tuple[int, int]:
    tr = TRAITS[qtype]
    if field == "sc":
        return (-(1 << (tr.sc_bits - 1)), (1 << (tr.sc_bits - 1)) - 1) if tr.sc_signed else (0, (1 << tr.sc_bits) - 1)
    return 0, (1 << tr.mn_bits) - 1


def codes(qtype: T, xs: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Nearest codes for sub-block values xs [..., L] under x = A (q - zq) + B (A, B [...])."""
    tr = TRAITS[qtype]
    lo, hi = _code_range(qtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(A != 0, np.float32(1) / A, np.float32(0)).astype(np.float32)
    q = np.rint((xs - B[..., None]) * inv[..., None]) + tr.zq
    return np.clip(q, lo, hi).astype(np.int32)


def sub_err(qtype: T, xs, ws, A, B, q) -> np.ndarray:
    """Weighted squared error per sub-block."""
    tr = TRAITS[qtype]
    r = xs - (A[..., None] * (q - tr.zq).astype(np.float32) + B[..., None])
    return (ws * r * r).sum(-1)


def block_err(f: Fields, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    r = x - layout.dequant(f)
    return (w * r * r).sum(-1)


def _recode(f: Fields, xs: np.ndarray) -> None:
    A, B = layout.affine(f)
    f.q = codes(f.qtype, xs, A, B).reshape(f.n, -1)


def _wls_line(u: np.ndarray, x: np.ndarray, w: np.ndarray, v: Optional[np.ndarray] = None):
    """Weighted LS of x ~ a*u + b*v (v=1 when None) over the last axis -> (a, b, ok)."""
    if v is None:
        v = np.ones_like(u)
    suu = (w * u * u).sum(-1); svv = (w * v * v).sum(-1); suv = (w * u * v).sum(-1)
    sux = (w * u * x).sum(-1); svx = (w * v * x).sum(-1)
    det = suu * svv - suv * suv
    ok = np.abs(det) > 1e-12 * np.maximum(suu * svv, EPS)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(ok, (sux * svv - svx * suv) / det, 0).astype(np.float32)
        b = np.where(ok, (svx * suu - sux * suv) / det, 0).astype(np.float32)
    return a, b, ok


def _wls_scale(u, x, w):
    suu = (w * u * u).sum(-1); sux = (w * u * x).sum(-1)
    ok = suu > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, sux / suu, 0).astype(np.float32), ok


def _fp16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def fit_super(f: Fields, xs: np.ndarray, ws: np.ndarray) -> Fields:
    """LS refit of the fp16 d (and dmin / m) given integer fields and codes; codes re-chosen."""
    tr = TRAITS[f.qtype]
    g = f.copy()
    qv = (f.q - tr.zq).astype(np.float32).reshape(f.n, tr.n_sub, tr.sub_len)
    if f.sc is not None:
        u = (f.sc[..., None] * qv).reshape(f.n, -1)
    else:
        u = qv.reshape(f.n, -1)
    x, w = xs.reshape(f.n, -1), ws.reshape(f.n, -1)
    if f.mn is not None:
        v = -np.repeat(f.mn.astype(np.float32), tr.sub_len, 1)
        a, b, ok = _wls_line(u, x, w, v)
        g.d = np.where(ok, _fp16(a), f.d)
        g.dmin = np.where(ok, _fp16(b), f.dmin)
    elif f.dmin is not None:
        a, b, ok = _wls_line(u, x, w)
        g.d = np.where(ok, _fp16(a), f.d)
        g.dmin = np.where(ok, _fp16(b), f.dmin)
    else:
        a, ok = _wls_scale(u, x, w)
        g.d = np.where(ok, _fp16(a), f.d)
    g.d = np.where(np.isfinite(g.d), g.d, f.d)
    if g.dmin is not None:
        g.dmin = np.where(np.isfinite(g.dmin), g.dmin, f.dmin)
    _recode(g, xs)
    return g


def search_ints(f: Fields, xs: np.ndarray, ws: np.ndarray, radius: int = 2, separable: bool = False) -> Fields:
    """Per sub-block: continuous WLS (scale, min) -> integer sc/mn candidates round(.)+-radius, best wins.

    ``separable``: search sc (mn at its rounded value), then mn given the best sc:
    2(2r+1) candidates instead of (2r+1)^2."""
    tr = TRAITS[f.qtype]
    if f.sc is None:
        return f
    g = f.copy()
    qv = (f.q - tr.zq).astype(np.float32).reshape(f.n, tr.n_sub, tr.sub_len)
    d = f.d[:, None]
    A0, B0 = layout.affine(f)
    if f.mn is not None:
        a, b, ok = _wls_line(qv, xs, ws)
        a = np.where(ok, a, A0); b = np.where(ok, b, B0)
        dm = f.dmin[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            mn0 = np.where(dm != 0, np.rint(-b / dm), f.mn)
    else:
        a, ok = _wls_scale(qv, xs, ws)
        a = np.where(ok, a, A0)
        mn0 = None
    with np.errstate(divide="ignore", invalid="ignore"):
        sc0 = np.where(d != 0, np.rint(a / d), f.sc)
    sc0 = np.nan_to_num(sc0).astype(np.int64)
    best = sub_err(f.qtype, xs, ws, A0, B0, f.q.reshape(xs.shape))
    best_sc, best_mn = f.sc.copy(), None if f.mn is None else f.mn.copy()
    slo, shi = _int_range(f.qtype, "sc")
    deltas = range(-radius, radius + 1)
    mdeltas = deltas if f.mn is not None else [0]
    if mn0 is not None:
        mn0 = np.nan_to_num(mn0).astype(np.int64)
        mlo, mhi = _int_range(f.qtype, "mn")
    if separable and mn0 is not None:
        cands = [(ds, 0) for ds in deltas] + [(None, dmn) for dmn in deltas if dmn != 0]
    else:
        cands = [(ds, dmn) for ds in deltas for dmn in mdeltas]
    for ds, dmn in cands:
        sc = best_sc if ds is None else np.clip(sc0 + ds, slo, shi)
        A = d * sc.astype(np.float32)
        if mn0 is not None:
            mn = np.clip(mn0 + dmn, mlo, mhi)
            B = -dm * mn.astype(np.float32)
        else:
            B = B0
        q = codes(f.qtype, xs, A, B)
        e = sub_err(f.qtype, xs, ws, A, B, q)
        better = e < best
        best = np.where(better, e, best)
        best_sc = np.where(better, sc, best_sc)
        if mn0 is not None:
            best_mn = np.where(better, mn, best_mn)
    g.sc = best_sc.astype(np.int32)
    if best_mn is not None:
        g.mn = best_mn.astype(np.int32)
    _recode(g, xs)
    return g


def _keep_better(cur: Fields, cur_err: np.ndarray, new: Fields, x, w):
    e = block_err(new, x, w)
    better = e < cur_err
    if not better.any():
        return cur, cur_err
    out = cur.copy()
    sel = better
    out.d = np.where(sel, new.d, cur.d)
    out.q = np.where(sel[:, None], new.q, cur.q)
    if cur.dmin is not None:
        out.dmin = np.where(sel, new.dmin, cur.dmin)
    if cur.sc is not None:
        out.sc = np.where(sel[:, None], new.sc, cur.sc)
    if cur.mn is not None:
        out.mn = np.where(sel[:, None], new.mn, cur.mn)
    return out, np.where(sel, e, cur_err)


def refine_fields(f: Fields, x: np.ndarray, w: np.ndarray, iters: int = 3, radius: int = 2,
                  separable: bool = False) -> Fields:
    """x, w: float32 [n_blocks, QK]. Returns fields with block_err <= that of f, block by block."""
    tr = TRAITS[f.qtype]
    xs = x.reshape(f.n, tr.n_sub, tr.sub_len)
    ws = w.reshape(f.n, tr.n_sub, tr.sub_len)
    cur, err = f, block_err(f, x, w)
    for _ in range(iters):
        g = cur.copy()
        _recode(g, xs)                           # 1. codes given scales (nearest: never worse)
        cur, err = _keep_better(cur, err, g, x, w)
        g = search_ints(cur, xs, ws, radius, separable)   # 2+3. sub-block WLS + integer search
        cur, err = _keep_better(cur, err, g, x, w)
        g = fit_super(cur, xs, ws)               # 4. fp16 super-scales
        cur, err = _keep_better(cur, err, g, x, w)
    return cur


def weights_for(rows: np.ndarray, imatrix: Optional[np.ndarray], qk: int) -> np.ndarray:
    """Per-weight importance [n_blocks, qk] from a per-column imatrix (ones when None)."""
    n, k = rows.shape
    if imatrix is None:
        return np.ones((n * k // qk, qk), np.float32)
    im = np.asarray(imatrix, np.float32).reshape(1, k)
    return np.broadcast_to(im, (n, k)).reshape(-1, qk)


def refine(qtype: T, rows: np.ndarray, start: np.ndarray, imatrix: Optional[np.ndarray] = None,
           iters: int = 3, radius: int = 2) -> np.ndarray:
    """Refine encoded bytes ``start`` [n, row_nbytes] of ``rows`` [n, k]; same shape out."""
    tr = TRAITS[qtype]
    x = np.ascontiguousarray(rows, np.float32).reshape(-1, tr.qk)
    w = weights_for(rows, imatrix, tr.qk)
    f = layout.unpack(qtype, start)
    f = refine_fields(f, x, w, iters, radius)
    return layout.pack(f).reshape(start.shape)
