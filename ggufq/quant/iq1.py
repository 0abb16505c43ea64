"""IQ1_S and IQ1_M: 1.56/1.75-bit codebook quants on the 2048-point grid of iq2xs_init_impl.

Follows ggml-quants.c ``quantize_row_iq1_s_impl`` and ``quantize_row_iq1_m_impl``.
Each group of 32 (S) or 16 (M) weights takes values ``{-1, 0, 1} + shift``
(shift = ±IQ1S_DELTA / ±IQ1M_DELTA, per group for S, per half-group for M):
the weights are sorted (glibc's ``qsort`` is a stable merge sort for these
sizes, so equal values keep their order), every split of the sorted values into
three runs is scored exactly, and the record of the C scan -- first pair
``(i1, i2)`` then shift, ``sumqx^2 > best*sumq2`` -- is kept. The levels are
snapped to the grid (off-grid codes take ``iq1_find_best_neighbour2``'s pick),
the group scale is refitted and stored as 3 bits under an fp16 super scale
(with the 1.125 / 1.1125 fudge factors of ggml).

All groups of a chunk run each step at once; float32 arithmetic keeps the C
expression order so the bytes equal ggml's on x86.

ggml requires an importance matrix for IQ1_S; IQ1_M also works without one
(weights ``x^2``).

block_iq1_s { half d; u8 qs[32]; u16 qh[8]; }       50 bytes
block_iq1_m { u8 qs[32]; u8 qh[16]; u8 scales[8]; }  56 bytes (the fp16 scale in the top nibbles of scales)
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, nonzero2
from .iq2 import QK_K, by_chunks, seq_sum
from .iq_grid import Grid, best_neighbour, iq_grid
from .qx import nearest_int_exact

F32 = np.float32
FLT_MAX = np.finfo(F32).max
IQ1S_DELTA = F32(0.125)
IQ1M_DELTA = F32(0.125)
GROUP_MAX_EPS_IQ1_S = F32(1e-12)
GROUP_MAX_EPS_IQ1_M = F32(1e-7)
# groups per step of the split search (its [candidates, groups] arrays stay a few MiB)
SEARCH_GROUPS = 512

REQUIRES_IMATRIX = frozenset({T.IQ1_S})


def _shifted(delta):
    """x_p, x_m of the C code: {-1 + d, d, 1 + d} and {-1 - d, -d, 1 - d} in float32."""
    one = F32(1)
    return (np.array([-one + delta, delta, one + delta], dtype=F32),
            np.array([-one - delta, -delta, one - delta], dtype=F32))


def _sorted_order(xb: np.ndarray):
    """Stable ascending order of each group [G, n]: (rank [G, n] = position of each weight, idx [G, n])."""
    idx = np.argsort(xb, axis=1, kind="stable")
    rank = np.empty_like(idx)
    np.put_along_axis(rank, idx, np.arange(xb.shape[1])[None, :], axis=1)
    return rank, idx


def _scan_full(sx: np.ndarray, sq: np.ndarray):
    """The C scan, step by step over the candidates, vectorised over groups."""
    n, G = sx.shape
    best = np.full(G, -FLT_MAX, dtype=F32)
    scale = np.zeros(G, dtype=F32)
    win = np.full(G, -1, dtype=np.int64)
    t1 = np.empty(G, dtype=F32)
    t2 = np.empty(G, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for j in range(n):
            a, b = sx[j], sq[j]
            np.multiply(a, a, out=t1)
            np.multiply(best, b, out=t2)
            upd = t1 > t2
            upd &= b > 0
            if upd.any():
                u = np.flatnonzero(upd)
                s = a[u] / b[u]
                scale[u] = s
                best[u] = s * a[u]
                win[u] = j
    return win, scale


# Candidates scoring below (1 - near) of a group's best cannot win; a relative gap of _GAP between the
# kept and the dropped ones (far above float32 rounding, ~3e-7) proves none of them can set a record.
_NEAR = (1e-4, 1e-3, 1e-2, 1e-1)
_GAP = 1e-5


def _record_scan(sx: np.ndarray, sq: np.ndarray):
    """The C scan ``if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale = sumqx/sumq2; best = scale*sumqx; }``.

    sx/sq float32 [n_cand, G] in the C loop order, ``best`` starting at
    -FLT_MAX; returns (winner [G], -1 for none; scale [G]).

    The record holders of that scan are, up to float32 rounding (relative
    ~3e-7), the running maxima of ``sumqx^2/sumq2``. Where the candidates within
    ``near`` of a group's maximum are separated from all others by a relative
    gap of _GAP, the first of them always takes the record and no other
    candidate can ever take it, so the exact float32 scan is replayed over just
    them (the widest fallback keeps every candidate with ``sumq2 > 0``: the
    replay is then the scan itself).

    Long because it transcribes the iq1 scan of ggml's quantize_row_iq1_s_impl."""
    n, G = sx.shape
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        score = sx * sx
        score /= sq                                         # sq <= 0: -inf, nan or huge; checked below
        M = np.fmax.reduce(score, axis=0)                   # nan (0/0) is skipped
        # products best*sumq2 stay in float32's normal range
        sqmin = sq.min(axis=0)
        npos = np.flatnonzero(~(sqmin > 0))                 # (rare) columns with some sumq2 <= 0
        if npos.size:
            sub = sq[:, npos]
            sqmin[npos] = np.where(sub > 0, sub, F32(np.inf)).min(axis=0)
        sane = np.isfinite(M) & (M > 1e-30) & (M * sqmin >= 1e-30) & (M * sq.max(axis=0) <= 1e36)
        near = np.zeros((n, G), dtype=bool)
        todo = np.flatnonzero(sane)
        for t in _NEAR:
            if todo.size == 0:
                break
            sc = score if todo.size == G else score[:, todo]
            thr = M[todo] * F32(1 - t)
            nr = sc >= thr
            lo = np.where(nr, F32(-np.inf), sc)
            lo = np.fmax.reduce(lo, axis=0)
            ok = ~(lo >= thr * F32(1 - _GAP))               # nan: no other candidate
            if todo.size == G:      # every column: take nr whole (a column copy costs more);
                near = nr           # the columns not settled here are all written again below
            else:
                near[:, todo[ok]] = nr[:, ok]
            todo = todo[~ok]
        rest = np.r_[todo, np.flatnonzero(~sane)]
        if rest.size:
            near[:, rest] = sq[:, rest] > 0
    win = np.full(G, -1, dtype=np.int64)
    scale = np.zeros(G, dtype=F32)
    cand, grp = nonzero2(near)                              # ordered by candidate, then group
    if grp.size == 0:
        return win, scale
    order = np.argsort(grp, kind="stable")                  # each group's members, in candidate order
    gs = grp[order]
    start = np.r_[0, np.flatnonzero(gs[1:] != gs[:-1]) + 1]
    k = np.empty(grp.size, dtype=np.int64)
    k[order] = np.arange(grp.size) - np.repeat(start, np.diff(np.r_[start, grp.size]))
    order = np.argsort(k, kind="stable")                    # round r = the r-th member of every group
    grp, cand, k = grp[order], cand[order], k[order]
    bounds = np.searchsorted(k, np.arange(int(k[-1]) + 2))
    best = np.full(G, -FLT_MAX, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for r in range(int(k[-1]) + 1):
            gg, cc = grp[bounds[r]:bounds[r + 1]], cand[bounds[r]:bounds[r + 1]]
            a, b = sx[cc, gg], sq[cc, gg]
            upd = (a * a > best[gg] * b) & (b > 0)
            gg, cc, a, b = gg[upd], cc[upd], a[upd], b[upd]
            sc = a / b
            scale[gg] = sc
            best[gg] = sc * a
            win[gg] = cc
    return win, scale


# --------------------------------------------------------------------------- IQ1_S

_PAIRS33 = np.triu_indices(QK_K // 8 + 1)      # (i1, i2 >= i1) for a block of 32, in the C loop order


def _iq1s_search(xb: np.ndarray, weight: np.ndarray, xp, xm):
    """Best split of each group of 32: (i1 [G], i2 [G], shift [G] in {1, -1, 0 = none}, scale [G], rank [G, 32])."""
    G, n = xb.shape
    rank, idx = _sorted_order(xb)
    xs = np.take_along_axis(xb, idx, axis=1)
    ws = np.take_along_axis(weight, idx, axis=1)
    sumx = np.zeros((n + 1, G), dtype=F32)
    sumw = np.zeros((n + 1, G), dtype=F32)
    np.cumsum((ws * xs).T, axis=0, out=sumx[1:])         # sumx[j+1] = sumx[j] + weight[i]*xb[i]
    np.cumsum(ws.T, axis=0, out=sumw[1:])
    I1, I2 = _PAIRS33
    out_i1 = np.empty(G, dtype=np.int64)
    out_i2 = np.empty(G, dtype=np.int64)
    out_sh = np.zeros(G, dtype=np.int64)
    out_sc = np.empty(G, dtype=F32)
    for lo in range(0, G, SEARCH_GROUPS):
        sl = slice(lo, lo + SEARCH_GROUPS)
        X, W = sumx[:, sl], sumw[:, sl]
        A, B, C = X[I1] - X[0], X[I2] - X[I1], X[n] - X[I2]
        Aw, Bw, Cw = W[I1] - W[0], W[I2] - W[I1], W[n] - W[I2]
        g = X.shape[1]
        sx = np.empty((len(I1), 2, g), dtype=F32)
        sq = np.empty((len(I1), 2, g), dtype=F32)
        for h, v in enumerate((xp, xm)):
            # (s1 - s0)*v0 + (s2 - s1)*v1 + (sN - s2)*v2, and the same with w*v*v, left to right
            sx[:, h] = A * v[0] + B * v[1] + C * v[2]
            sq[:, h] = (Aw * v[0]) * v[0] + (Bw * v[1]) * v[1] + (Cw * v[2]) * v[2]
        win, sc = _record_scan(sx.reshape(-1, g), sq.reshape(-1, g))
        ok = win >= 0
        pair = np.where(ok, win // 2, 0)
        out_i1[sl] = I1[pair]
        out_i2[sl] = I2[pair]
        out_sh[sl] = np.where(ok, np.where(win % 2 == 0, 1, -1), 0)
        out_sc[sl] = sc
    return out_i1, out_i2, out_sh, out_sc, rank


def _split_levels(rank, i1, i2):
    """L[idx[j]] = 0 for j < i1, 1 for j < i2, else 2."""
    return ((rank >= i1[:, None]).astype(np.int8) + (rank >= i2[:, None]).astype(np.int8))


def _snap1(g: Grid, L, xb, weight, scale, sel, xx):
    """Grid indices of each 8 of L [G, m*8]; off-grid codes take iq1_find_best_neighbour2 (q = xx[l], raw xb).

    ``xx`` float32 [2, 3]: x_p and x_m; ``sel [G, m]`` picks one per group of 8.
    Returns (grid index [G, m], all_on_grid [G]).
    """
    G, n = L.shape
    m = n // 8
    u = g.codes(L.reshape(G, m, 8))
    gi = g.kmap[u].astype(np.int64)
    off = gi < 0
    if off.any():
        r, k = nonzero2(off)
        cols = (k * 8)[:, None] + np.arange(8)
        gi[r, k] = best_neighbour(g, u[r, k], xb[r[:, None], cols], weight[r[:, None], cols], scale[r],
                                  xx[sel[r, k]])
    return gi, ~off.any(axis=1)


def _grid_q(g: Grid, gi, sel, xx):
    """q = xx[(pg[j] - 1)/2] of the chosen grid points: gi/sel [G, m] -> [G, m*8]."""
    lv = g.levels[gi].astype(np.int64)                        # [G, m, 8]
    return xx[sel[:, :, None], lv].reshape(gi.shape[0], -1)


def _refit(g: Grid, gi, xb, weight, sel, xx):
    """``sumqx += w*q*xb; sumq2 += w*q*q`` over the group with q = xx[grid level] (C order: (w*q)*x)."""
    q = _grid_q(g, gi, sel, xx)
    wq = weight * q
    return seq_sum(wq * xb), seq_sum(wq * q)


def _encode_iq1_s(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    g = iq_grid(T.IQ1_S)
    xp, xm = _shifted(IQ1S_DELTA)
    xx = np.stack([xp, xm])
    sigma2 = F32(2) * seq_sum(x * x) / F32(QK_K)
    weight = (qw * np.sqrt(sigma2[:, None] + x * x)).reshape(-1, 32)
    xb = x.reshape(-1, 32)
    G = xb.shape[0]
    scales = np.zeros(G, dtype=F32)
    shifts = np.ones(G, dtype=np.int64)
    gidx = np.zeros((G, 4), dtype=np.int64)
    mx = np.abs(xb).max(axis=1)
    act = np.flatnonzero(~(mx < GROUP_MAX_EPS_IQ1_S))
    if act.size:
        i1, i2, sh, sc, rank = _iq1s_search(xb[act], weight[act], xp, xm)
        ok = sh != 0
        act, i1, i2, sh, sc, rank = act[ok], i1[ok], i2[ok], sh[ok], sc[ok], rank[ok]
        L = _split_levels(rank, i1, i2)
        neg = sc < 0
        L[neg] = 2 - L[neg]
        sc = np.abs(sc)
        sh = np.where(neg, -sh, sh)
        xa, wa = xb[act], weight[act]
        sel = np.broadcast_to((sh == -1).astype(np.int64)[:, None], (act.size, 4))
        gi, on = _snap1(g, L, xa, wa, sc, sel, xx)
        if not on.all():
            r = np.flatnonzero(~on)
            sumqx, sumq2 = _refit(g, gi[r], xa[r], wa[r], sel[r], xx)
            with np.errstate(divide="ignore", invalid="ignore"):
                sc[r] = np.where((sumqx > 0) & (sumq2 > 0), sumqx / sumq2, sc[r])
        scales[act], shifts[act], gidx[act] = sc, sh, gi
    scales = scales.reshape(nb, 8)
    max_scale = scales.max(axis=1)
    d = (max_scale / F32(15)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        id_ = F32(1) / d
        l = np.clip(nearest_int_exact(F32(0.5) * (id_[:, None] * scales - F32(1))), 0, 7)
    l = np.where(shifts.reshape(nb, 8) == -1, l | 8, l)
    zero = ~(max_scale > 0)              # ``if (!max_scale) continue``: d = 0, qs/qh as written
    l[zero] = 0
    gidx = gidx.reshape(nb, 8, 4)
    qs = (gidx & 255).astype(np.uint8).reshape(nb, 32)
    hi = gidx >> 8
    qh = (hi[..., 0] | (hi[..., 1] << 3) | (hi[..., 2] << 6) | (hi[..., 3] << 9) | (l << 12)).astype("<u2")
    d = np.where(zero, F32(0), (d * F32(1.125)).astype(F32))
    return np.concatenate([fp16_bytes(d), qs, qh.view(np.uint8)], axis=1)


@register(T.IQ1_S)
def encode_iq1_s(rows: np.ndarray, imatrix=None) -> np.ndarray:
    if imatrix is None:
        raise ValueError("IQ1_S needs an importance matrix (as in llama.cpp)")
    return by_chunks(T.IQ1_S, _encode_iq1_s, rows, imatrix)


# --------------------------------------------------------------------------- IQ1_M

_PAIRS17 = np.triu_indices(QK_K // 16 + 1)     # (i1, i2 >= i1) for a block of 16
_FLIP_K = np.array([3, 2, 1, 0])               # best_k after ``scale < 0``: 0 <-> 3, 1 <-> 2


def _iq1m_search(xb: np.ndarray, weight: np.ndarray, xp, xm):
    """Best split and half-group shifts of each group of 16: (i1, i2, best_k [-1 = none], scale, rank)."""
    G, n = xb.shape
    rank, idx = _sorted_order(xb)
    xs = np.take_along_axis(xb, idx, axis=1)
    ws = np.take_along_axis(weight, idx, axis=1)
    half = (idx >= n // 2)                                   # h of each sorted position
    px = np.zeros((2, n + 1, G), dtype=F32)
    pw = np.zeros((2, n + 1, G), dtype=F32)
    wx = (ws * xs).T
    for h in range(2):
        mine = (half == bool(h)).T
        # px[h][j+1] = px[h][j] + weight[i]*xb[i] when i is in half h, else px[h][j]
        np.cumsum(np.where(mine, wx, F32(0)), axis=0, out=px[h, 1:])
        np.cumsum(np.where(mine, ws.T, F32(0)), axis=0, out=pw[h, 1:])
    txs, tws = px[:, n], pw[:, n]                           # [2, G]
    p2, m2 = xp[2], xm[2]
    cp1 = xp[0] * xp[0] - xp[1] * xp[1]
    cp2 = xp[1] * xp[1] - xp[2] * xp[2]
    cm1 = xm[0] * xm[0] - xm[1] * xm[1]
    cm2 = xm[1] * xm[1] - xm[2] * xm[2]
    I1, I2 = _PAIRS17
    out = (np.empty(G, np.int64), np.empty(G, np.int64), np.empty(G, np.int64), np.empty(G, F32))
    for lo in range(0, G, SEARCH_GROUPS):
        sl = slice(lo, lo + SEARCH_GROUPS)
        g = px[0, 0, sl].size
        qx_p, qx_m, q2_p, q2_m = [], [], [], []
        for h in range(2):
            X, W = px[h][:, sl], pw[h][:, sl]
            sx = X[I1] + X[I2]
            qx_p.append(txs[h, sl] * p2 - sx)
            qx_m.append(txs[h, sl] * m2 - sx)
            q2_p.append((tws[h, sl] * p2) * p2 + W[I1] * cp1 + W[I2] * cp2)
            q2_m.append((tws[h, sl] * m2) * m2 + W[I1] * cm1 + W[I2] * cm2)
        # k = 0: (+,+), 1: (+,-), 2: (-,+), 3: (-,-)
        sumqx = np.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], axis=1)
        sumq2 = np.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], axis=1)
        win, sc = _record_scan(sumqx.reshape(-1, g), sumq2.reshape(-1, g))
        ok = win >= 0
        pair = np.where(ok, win // 4, 0)
        out[0][sl] = I1[pair]
        out[1][sl] = I2[pair]
        out[2][sl] = np.where(ok, win % 4, -1)
        out[3][sl] = sc
    return (*out, rank)


def _iq1m_sel(k: np.ndarray) -> np.ndarray:
    """Which of x_p (0) / x_m (1) each half uses: half 0 ``best_k < 2 ? x_p : x_m``, half 1 ``best_k%2 == 0 ? ...``."""
    return np.stack([(k >= 2), (k % 2 == 1)], axis=1).astype(np.int64)


def _encode_iq1_m(x: np.ndarray, qw: Optional[np.ndarray]) -> np.ndarray:
    """Long because it transcribes ggml's quantize_row_iq1_m_impl."""
    nb = x.shape[0]
    g = iq_grid(T.IQ1_M)
    xp, xm = _shifted(IQ1M_DELTA)
    xx = np.stack([xp, xm])
    sigma2 = F32(2) * seq_sum(x * x) / F32(QK_K)
    if qw is not None:
        weight = qw * np.sqrt(sigma2[:, None] + x * x)
    else:
        weight = x * x
    weight = weight.reshape(-1, 16)
    xb = x.reshape(-1, 16)
    G = xb.shape[0]
    scales = np.zeros(G, dtype=F32)
    shifts = np.zeros(G, dtype=np.int64)
    gidx = np.zeros((G, 2), dtype=np.int64)
    mx = np.abs(xb).max(axis=1)
    act = np.flatnonzero(~(mx < GROUP_MAX_EPS_IQ1_M))
    if act.size:
        i1, i2, bk, sc, rank = _iq1m_search(xb[act], weight[act], xp, xm)
        ok = bk >= 0
        act, i1, i2, bk, sc, rank = act[ok], i1[ok], i2[ok], bk[ok], sc[ok], rank[ok]
        L = _split_levels(rank, i1, i2)
        neg = sc < 0
        L[neg] = 2 - L[neg]
        sc = np.abs(sc)
        bk = np.where(neg, _FLIP_K[bk], bk)
        xa, wa = xb[act], weight[act]
        sel = _iq1m_sel(bk)
        gi, on = _snap1(g, L, xa, wa, sc, sel, xx)
        if not on.all():
            r = np.flatnonzero(~on)
            sumqx, sumq2 = _refit(g, gi[r], xa[r], wa[r], sel[r], xx)
            with np.errstate(divide="ignore", invalid="ignore"):
                sc[r] = np.where((sumqx > 0) & (sumq2 > 0), sumqx / sumq2, sc[r])
        scales[act], shifts[act], gidx[act] = sc, bk, gi
    scales = scales.reshape(nb, 16)
    max_scale = scales.max(axis=1)
    d = (max_scale / F32(15)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        id_ = F32(1) / d
        l = np.clip(nearest_int_exact(F32(0.5) * (id_[:, None] * scales - F32(1))), 0, 7)   # [nb, 16]
        # the super scale is refitted over the whole block, groups that were skipped included
        # (they decode as grid point 0 with x_p): sumqx_f += w*q*xb, q = xx[l]*(2*l+1), in block order
        sel = _iq1m_sel(shifts)
        q = _grid_q(g, gidx, sel, xx).reshape(nb, 16, 16)                              # [nb, 16 groups, 16]
        q = q * (F32(2) * l.astype(F32) + F32(1))[:, :, None]
        q = q.reshape(nb, QK_K)
        wq = weight.reshape(nb, QK_K) * q
        sumqx_f = seq_sum(wq * x)
        sumq2_f = seq_sum(wq * q)
        d = np.where(sumq2_f > 0, sumqx_f / sumq2_f, d).astype(F32)
    zero = ~(max_scale > 0)              # ``if (!max_scale) continue``: scales stay 0, qs/qh as written
    masks = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.uint8)
    gidx = gidx.reshape(nb, 16, 2)
    qs = (gidx & 255).astype(np.uint8).reshape(nb, 32)
    qh = ((gidx[..., 0] >> 8) | ((gidx[..., 1] >> 8) << 4)).astype(np.uint8)
    qh = np.where(zero[:, None], qh, qh | masks[shifts.reshape(nb, 16)])
    l = l.astype(np.uint16).reshape(nb, 4, 4)
    sc = l[..., 0] | (l[..., 1] << 3) | (l[..., 2] << 6) | (l[..., 3] << 9)             # [nb, 4] uint16
    s = (d * F32(1.1125)).astype(F32).astype(np.float16).view(np.uint16)
    sc = sc | (((s[:, None] >> (4 * np.arange(4, dtype=np.uint16))) & 0xF) << 12)
    sc[zero] = 0
    return np.concatenate([qs, qh, sc.astype("<u2").view(np.uint8)], axis=1)


@register(T.IQ1_M)
def encode_iq1_m(rows: np.ndarray, imatrix=None) -> np.ndarray:
    return by_chunks(T.IQ1_M, _encode_iq1_m, rows, imatrix)
