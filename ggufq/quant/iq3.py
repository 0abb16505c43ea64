"""IQ3_XXS and IQ3_S: 256-weight super-blocks of 8 groups x 32, each group 8 quads on a 3-bit grid.

Follows ggml-quants.c of the llama.cpp in llama-cpp-python 0.3.36:
``iq3xs_init_impl`` (grid -> ``kmap``, neighbour lists of the off-grid points),
``quantize_row_iq3_xxs_impl`` (grid of 256 quads, 7 stored signs per 8 weights with an
even number of negatives) and ``quantize_row_iq3_s_impl`` (grid of 512 quads, 8 signs),
``iq3_find_best_neighbour`` and the per-group scale search. Both work with and
without an imatrix (``quantize_iq3_xxs``/``quantize_iq3_s`` pass NULL through; the
weights are then ``x²``).

The grids come from gguf-py's dequantizers (``gguf.quants.IQ3_XXS/IQ3_S.grid_hex``):
a quad's level ``l`` (0..7) per weight is the index of its value in ``grid_map``;
ggml's encoder works with ``2l+1``.

Every group of 32 is independent until the super-block scale, so the search runs
over all groups of a chunk and all trial scales at once. Arithmetic is float32 in
the C operation order (ggml-base on x86-64 is built without FMA contraction); sums
over a group run element after element (arrays laid out ``[32, groups, trials]``
so that NumPy's reduction over axis 0 is sequential).

block_iq3_xxs { ggml_half d; uint8 qs[64 grid indices + 32 scales_and_signs]; }   (98 bytes)
block_iq3_s   { ggml_half d; uint8 qs[64]; qh[8]; signs[32]; scales[4]; }          (110 bytes)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from . import register
from .common import fp16_bytes, nonzero2, transpose_f32
from .qx import F32, nearest_int_exact

QK_K = 256
KMAX_Q = 8                     # levels per weight
GROUP_MAX_EPS_IQ3_XXS = F32(1e-8)
# super-blocks per internal chunk: the search holds [32, 8*CHUNK_BLOCKS, 31] arrays
CHUNK_BLOCKS = 64
_SHIFTS = np.array([0, 3, 6, 9], dtype=np.int32)


@dataclass(frozen=True)
class Grid:
    """One IQ3 grid as ``iq3xs_init_impl`` lays it out.

    ``levels[j]``: the 4 levels (0..7) of grid point j; ``values = 2*levels + 1`` as float32
    (what the encoder compares against); ``kmap[u]``: grid index of the quad code
    ``u = l0 | l1<<3 | l2<<6 | l3<<9``, or -1 off the grid; ``nb_idx[u, :nb_cnt[u]]``: the
    off-grid quad's neighbours in ggml's order (distance², then grid index), padded with
    the first neighbour.
    """
    levels: np.ndarray      # int8 [n, 4]
    values: np.ndarray      # float32 [n, 4]
    kmap: np.ndarray        # int32 [4096]
    nb_idx: np.ndarray      # int16 [4096, max_nb]
    nb_cnt: np.ndarray      # int32 [4096]
    nb_vals: np.ndarray     # float32 [max_nb, 4096, 4]: nb_vals[j, u] = values[nb_idx[u, j]]


@lru_cache(maxsize=None)
def grid(grid_size: int) -> Grid:
    """The IQ3_XXS (256) or IQ3_S (512) grid with ggml's neighbour lists, built once per process."""
    cls, nwant = {256: (gq.IQ3_XXS, 2), 512: (gq.IQ3_S, 3)}[grid_size]
    cls.init_grid()
    vals = cls.grid.reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), vals).astype(np.int32)
    assert levels.shape == (grid_size, 4) and levels.max() < KMAX_Q
    codes = (levels << _SHIFTS).sum(axis=1)
    kmap = np.full(4096, -1, dtype=np.int32)
    kmap[codes] = np.arange(grid_size, dtype=np.int32)
    # every point of the 8^4 cube: distance² to each grid point in the odd-integer coordinates
    u = np.arange(4096, dtype=np.int32)
    pos = 2 * ((u[:, None] >> _SHIFTS) & 7) + 1
    gpos = 2 * levels + 1
    d2 = ((gpos[None, :, :] - pos[:, None, :]) ** 2).sum(axis=2)
    # qsort with iq3_compare_func orders by (d2, index): a total order, i.e. a stable sort by d2
    order = np.argsort(d2, axis=1, kind="stable")
    sd2 = np.take_along_axis(d2, order, axis=1)
    # keep the points at the nwant smallest distinct distances
    rank = np.concatenate([np.zeros((4096, 1), dtype=np.int64), np.cumsum(np.diff(sd2, axis=1) > 0, axis=1)], axis=1)
    cnt = (rank < nwant).sum(axis=1).astype(np.int32)
    cnt[kmap >= 0] = 0
    width = int(cnt.max())
    col = np.arange(width)
    nb = np.where(col[None, :] < cnt[:, None], order[:, :width], order[:, :1]).astype(np.int16)
    vals = np.ascontiguousarray(gpos[nb].transpose(1, 0, 2), dtype=np.float32)
    return Grid(levels.astype(np.int8), gpos.astype(np.float32), kmap, nb, cnt, vals)


def _best_neighbour(g: Grid, u: np.ndarray, qi: np.ndarray, x4: np.ndarray, w4: np.ndarray,
                    scale: np.ndarray) -> np.ndarray:
    """iq3_find_best_neighbour for many off-grid quads -> grid index [m] (the first neighbour with
    the smallest weighted distance). u: the quads' codes [m]; qi: their rows in the per-quad tables
    x4 (xval) and w4 (waux), both [n_quads, 4]; scale: [m]."""
    m = u.shape[0]
    cnt = g.nb_cnt[u]
    # longest neighbour lists first: neighbour j is then tried by a prefix of the quads
    order = np.argsort(np.uint8(255) - cnt.astype(np.uint8), kind="stable")      # a radix sort
    us, qo = u.take(order), qi.take(order)
    x, w = x4.take(qo, axis=0), w4.take(qo, axis=0)                               # [m, 4]
    sc = np.repeat(scale.take(order), 4).reshape(m, 4)
    n_gt = m - np.cumsum(np.bincount(cnt, minlength=g.nb_idx.shape[1] + 1))     # quads with > j neighbours
    best = np.full(m, np.finfo(F32).max, dtype=F32)                           # float best_d2 = FLT_MAX;
    pick = np.zeros(m, dtype=np.int32)
    d2 = np.empty(m, dtype=F32)
    diff, t = np.empty((m, 4), dtype=F32), np.empty((m, 4), dtype=F32)
    for j in range(int(cnt.max())):
        n = int(n_gt[j])
        q = g.nb_vals[j].take(us[:n], axis=0)                                     # [n, 4]
        # float diff = scale*q - xval[i]; d2 += weight[i]*diff*diff;   (i = 0..3, in order)
        df, tt, d = diff[:n], t[:n], d2[:n]
        np.multiply(sc[:n], q, out=df)
        np.subtract(df, x[:n], out=df)
        np.multiply(w[:n], df, out=tt)
        np.multiply(tt, df, out=tt)
        np.add(tt[:, 0], tt[:, 1], out=d)
        np.add(d, tt[:, 2], out=d)
        np.add(d, tt[:, 3], out=d)
        better = d < best[:n]                                                     # if (d2 < best_d2)
        np.copyto(best[:n], d, where=better)
        np.copyto(pick[:n], j, where=better)
    out = np.empty(m, dtype=np.int32)
    out[order] = g.nb_idx.reshape(-1).take(us * g.nb_idx.shape[1] + pick)
    return out


def _quad_table(aT: np.ndarray) -> np.ndarray:
    """[32, n] (element 4k+i of group g) -> [8*n, 4] (element i of quad k*n + g)."""
    return np.ascontiguousarray(aT.reshape(8, 4, -1).transpose(0, 2, 1)).reshape(-1, 4)


def _codes(L: np.ndarray) -> np.ndarray:
    """Levels [8, 4, ...] (quad k, element i) -> quad codes [8, ...]: u |= L << 3*i."""
    L = L.astype(np.int32)
    return L[:, 0] | (L[:, 1] << 3) | (L[:, 2] << 6) | (L[:, 3] << 9)


def _round_levels(v: np.ndarray) -> np.ndarray:
    """MAX(0, MIN(kMaxQ-1, nearest_int(v)))."""
    return np.clip(nearest_int_exact(v), 0, KMAX_Q - 1).astype(np.int8)


def _sums(wx: np.ndarray, w: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sumqx += w*xval[i]*q; sumq2 += w*q*q with q = 2*L+1, over axis 0 in order."""
    q = (F32(2) * L.astype(F32) + F32(1))
    sumqx = np.add.reduce(np.ascontiguousarray(wx * q), axis=0)
    sumq2 = np.add.reduce(np.ascontiguousarray((w * q) * q), axis=0)
    return sumqx, sumq2


def _group_search(g: Grid, xvT: np.ndarray, wT: np.ndarray, waT: np.ndarray, mx: np.ndarray,
                  xxs: bool) -> tuple[np.ndarray, np.ndarray]:
    """The scale search of one group of 32 for all groups at once (the ``for (int is ...)`` loop and
    the requantization of the off-grid quads that follows). xvT/wT/waT: [32, n] (xval, weight,
    waux); mx: [n] the group maxima. Returns (scale [n] float32, L [32, n] int8).

    Long because it transcribes the grid search of ggml's iq3 encoders."""
    n = mx.shape[0]
    nis = 15 if xxs else 9
    trials = np.arange(-nis, nis + 1)
    # float id = (2*kMaxQ-1+is*0.2f)/max; float this_scale = 1/id;
    id_ = (F32(2 * KMAX_Q - 1) + trials.astype(F32) * F32(0.2))[None, :] / mx[:, None]       # [n, S]
    this_scale = F32(1) / id_
    # int l = nearest_int(0.5f*(id*xval[4*k+i]-1)); Laux = MAX(0, MIN(kMaxQ-1, l));
    Laux = _round_levels(F32(0.5) * (id_[None] * xvT[:, :, None] - F32(1)))                 # [32, n, S]
    L4 = Laux.reshape(8, 4, n, id_.shape[1])
    u = _codes(L4)                                                                          # [8, n, S]
    offg = g.kmap[u] < 0                                                                # [8, n, S]
    off = np.flatnonzero(offg)                      # quad k of group gi at trial si: ((k*n + gi)*S + si)
    x4, w4 = _quad_table(xvT), _quad_table(waT)                                          # [8*n, 4]
    if off.size:
        nS = n * id_.shape[1]
        gs = off % nS                                                                    # gi*S + si
        best = _best_neighbour(g, u.reshape(-1).take(off), off // id_.shape[1], x4, w4,
                               this_scale.reshape(-1).take(gs))
        # Laux[4k+i, gi, si] is at (4k+i)*nS + gs = 4*(off - gs) + i*nS + gs
        pos = 4 * (off - gs) + gs
        lv = g.levels.take(best, axis=0)
        flat = Laux.reshape(-1)
        for i in range(4):
            flat[pos + i * nS] = lv[:, i]
    sumqx, sumq2 = _sums((wT * xvT)[:, :, None], wT[:, :, None], Laux)                    # [n, S]

    # if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale = sumqx/sumq2; best = scale*sumqx; ... }
    best = np.zeros(n, dtype=F32)
    scale = mx / F32(2 * KMAX_Q - 1)
    pick = np.full(n, -1, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in range(id_.shape[1]):
            qx, q2 = sumqx[:, s], sumq2[:, s]
            better = (q2 > 0) & (qx * qx > best * q2)
            scale = np.where(better, qx / q2, scale)
            best = np.where(better, scale * qx, best)
            pick = np.where(better, s, pick)
    found = pick >= 0
    cols = np.arange(n)
    L = np.zeros((32, n), dtype=np.int8)                       # memset(L, 0, 32)
    L[:, found] = Laux[:, cols[found], pick[found]]
    # is_on_grid starts true for IQ3_XXS, false for IQ3_S
    on_grid = np.full((8, n), xxs)
    on_grid[:, found] = ~offg[:, cols[found], pick[found]]

    # quads off the grid are requantized with the chosen scale (IQ3_S: every quad of such a group)
    redo = (~on_grid).any(axis=0) & (scale > 0)
    if redo.any():
        r = np.flatnonzero(redo)
        rq = np.ones((8, r.size), dtype=bool) if not xxs else ~on_grid[:, r]
        k, j = nonzero2(rq)
        gidx = r[j]
        sc = scale[gidx]
        id2 = F32(1) / sc                                      # float id = 1/scale;  (scale > 0)
        qi = k * n + gidx
        Lq = _round_levels(F32(0.5) * (id2[:, None] * x4[qi] - F32(1)))         # [m, 4]
        uq = _codes(Lq.T[None])[0]
        gidq = g.kmap[uq]
        o = gidq < 0
        if o.any():
            gidq[o] = _best_neighbour(g, uq[o], qi[o], x4, w4, sc[o])
        L4 = L.reshape(8, 4, n)
        L4[k, :, gidx] = g.levels[gidq]
        wr, xr = wT[:, r], xvT[:, r]
        qx, q2 = _sums(wr * xr, wr, L[:, r])
        with np.errstate(divide="ignore", invalid="ignore"):
            scale[r] = np.where(q2 > 0, qx / q2, scale[r])     # if (sumq2 > 0) scale = sumqx/sumq2;
    return scale, L


def _encode_blocks(xb: np.ndarray, qw: Optional[np.ndarray], xxs: bool) -> np.ndarray:
    """Long because it transcribes ggml's quantize_row_iq3_xxs/iq3_s_impl block loop."""
    g = grid(256 if xxs else 512)
    nblk = xb.shape[0]
    ng = nblk * 8
    # float sumx2 = 0; for (i...) sumx2 += xbl[i]*xbl[i]; float sigma2 = 2*sumx2/QK_K;
    xbT = transpose_f32(xb)                                            # [256, nblk]
    sigma2 = (F32(2) * np.add.reduce(xbT * xbT, axis=0)) / F32(QK_K)
    x = xb.reshape(ng, 32)
    if qw is not None:
        w = qw.reshape(ng, 32) * np.sqrt(np.repeat(sigma2, 8)[:, None] + x * x)
    else:
        w = x * x
    neg = ~(x >= 0)                                                    # if (xb >= 0) ... else flip
    xval = np.where(neg, -x, x)
    neg8 = neg.reshape(ng, 4, 8)
    bits = np.uint8(1) << np.arange(8, dtype=np.uint8)
    signs = (neg8.astype(np.uint8) * bits).sum(axis=2, dtype=np.uint8)          # [ng, 4]
    if xxs:
        # an odd number of negatives: flip the weight with the smallest weight[i]*xb[i]*xb[i] back
        odd = (neg8.sum(axis=2) % 2) == 1
        if odd.any():
            x8 = x.reshape(ng, 4, 8)
            imin = np.argmin((w.reshape(ng, 4, 8) * x8) * x8, axis=2)      # first minimum, as `<`
            gi, k = nonzero2(odd)
            pos = 8 * k + imin[gi, k]
            xval[gi, pos] = -xval[gi, pos]
            signs[gi, k] ^= (np.uint8(1) << imin[gi, k].astype(np.uint8))
        signs &= np.uint8(127)
    mx = xval.max(axis=1)
    active = (mx >= GROUP_MAX_EPS_IQ3_XXS) if xxs else (mx != 0)

    scales = np.zeros(ng, dtype=F32)
    L = np.zeros((32, ng), dtype=np.int8)
    a = np.flatnonzero(active)
    if a.size:
        xvT = np.ascontiguousarray(xval[a].T)
        wT = np.ascontiguousarray(w[a].T)
        waT = np.sqrt(wT)                                              # waux[i] = sqrtf(weight[i])
        sc, La = _group_search(g, xvT, wT, waT, mx[a], xxs)
        neg_sc = sc < 0                                                # "should never happen": flip
        if neg_sc.any():
            sc = np.where(neg_sc, -sc, sc)
            flipped = ~signs[a[neg_sc]]
            signs[a[neg_sc]] = flipped & np.uint8(127) if xxs else flipped
        scales[a] = sc
        L[:, a] = La
    gidx = g.kmap[_codes(L.reshape(8, 4, ng))].T.astype(np.int32)      # [ng, 8]
    assert (gidx >= 0).all(), "IQ3: a quad off the grid"
    signs[~active] = 0

    max_scale = scales.reshape(nblk, 8).max(axis=1)
    nz = max_scale != 0
    d = max_scale / F32(31)
    with np.errstate(divide="ignore"):
        id_ = np.where(nz, F32(1) / d, F32(0)).astype(F32)
    # int l = nearest_int(0.5f*(id*scales[ib]-1)); l = MAX(0, MIN(15, l));
    ls = np.clip(nearest_int_exact(F32(0.5) * (id_[:, None] * scales.reshape(nblk, 8) - F32(1))), 0, 15)
    ls = np.where(nz[:, None], ls, 0).astype(np.uint32)

    if xxs:
        out = np.zeros((nblk, 98), dtype=np.uint8)
        out[:, 0:2] = fp16_bytes(np.where(nz, d * F32(1.0125), F32(0)))
        s32 = signs.astype(np.uint32)
        sas = s32[:, 0] | (s32[:, 1] << 7) | (s32[:, 2] << 14) | (s32[:, 3] << 21)
        sas = sas.reshape(nblk, 8) | (ls << 28)
        q = np.concatenate([gidx.astype(np.uint8).reshape(nblk, 64), sas.astype("<u4").view(np.uint8)], axis=1)
        out[:, 2:] = np.where(nz[:, None], q, 0)                          # memset(qs, 0) when !max_scale
        return out
    out = np.zeros((nblk, 110), dtype=np.uint8)
    out[:, 0:2] = fp16_bytes(np.where(nz, d * F32(1.033), F32(0)))
    hb = (gidx >> 8).astype(np.uint8) << np.arange(8, dtype=np.uint8)    # qh[ib] |= (grid_index >> 8) << k
    out[:, 66:74] = np.bitwise_or.reduce(hb, axis=1).reshape(nblk, 8)
    # `qs += bs4; signs += bs8` run only for groups that were not skipped (`if (!max) continue;`), so
    # the groups after an all-zero one are written one slot earlier and the last slots stay zero
    act = active.reshape(nblk, 8)
    slot = np.cumsum(act, axis=1) - 1
    b, ib = nonzero2(act)
    qs = out[:, 2:66].reshape(nblk, 8, 8)
    qs[b, slot[b, ib]] = (gidx.reshape(nblk, 8, 8)[b, ib] & 255).astype(np.uint8)
    sg = out[:, 74:106].reshape(nblk, 8, 4)
    sg[b, slot[b, ib]] = signs.reshape(nblk, 8, 4)[b, ib]
    out[:, 106:110] = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    return out


def _encode(rows: np.ndarray, imatrix: Optional[np.ndarray], xxs: bool) -> np.ndarray:
    n, k = rows.shape
    bsz = 98 if xxs else 110
    nb = k // QK_K
    blocks = rows.reshape(-1, QK_K)
    qw = None if imatrix is None else imatrix.reshape(nb, QK_K)
    out = np.empty((blocks.shape[0], bsz), dtype=np.uint8)
    for lo in range(0, blocks.shape[0], CHUNK_BLOCKS):
        hi = min(lo + CHUNK_BLOCKS, blocks.shape[0])
        out[lo:hi] = _encode_blocks(blocks[lo:hi], None if qw is None else qw[np.arange(lo, hi) % nb], xxs)
    return out.reshape(n, nb * bsz)


@register(T.IQ3_XXS)
def encode_iq3_xxs(rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    return _encode(rows, imatrix, True)


@register(T.IQ3_S)
def encode_iq3_s(rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    return _encode(rows, imatrix, False)
