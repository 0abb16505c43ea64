"""IQ2_XXS, IQ2_XS, IQ2_S: 2-bit codebook quants on the E8-style grids of iq2xs_init_impl.

Follows ggml-quants.c ``quantize_row_iq2_xxs_impl``, ``quantize_row_iq2_xs_impl``
and ``quantize_row_iq2_s_impl``: per group of 8 weights the signs are split
off (XXS/XS: an odd count of negatives flips the least important one,
``ksigns_iq2xs`` keeps 7 bits), the magnitudes are rounded to levels
``2*l + 1`` and snapped to the grid (off-grid codes take the best of their
neighbour list), and a scan of trial scales keeps the one with the best
weighted fit. Each 32 (XXS) or 16 (XS, S) weights get a 4-bit scale under an
fp16 super-block scale.

Every block's search is independent, so the code runs each step for all blocks
of the chunk at once; float32 arithmetic keeps the C expression order
(``w*xval[i]*q`` is ``(w*x)*q``, sums run element after element) so the bytes
equal ggml's on x86 (ggml-base builds without FMA contraction).

ggml requires an importance matrix for IQ2_XXS and IQ2_XS
(``ggml_quantize_requires_imatrix``); their encoders raise ``ValueError``
without one. IQ2_S also works without (weights ``0.25*sigma2 + x^2``).

block_iq2_xxs { half d; u16 qs[32]; }                      66 bytes
block_iq2_xs  { half d; u16 qs[32]; u8 scales[8]; }        74 bytes
block_iq2_s   { half d; u8 qs[64]; u8 qh[8]; u8 scales[8]; } 82 bytes
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register, row_nbytes
from .common import fp16_bytes, nonzero2, transpose_f32
from .iq_grid import Grid, best_neighbour, iq_grid
from .qx import make_qp_quants, nearest_int_exact

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
GROUP_MAX_EPS_IQ2_S = F32(1e-8)
# super-blocks per internal chunk (bounds the working set)
CHUNK_SUPERBLOCKS = 4096

REQUIRES_IMATRIX = frozenset({T.IQ2_XXS, T.IQ2_XS})


def seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum ``a [G, n]`` over n element after element (the C loop; NumPy's inner-axis sum is pairwise)."""
    return np.add.reduce(transpose_f32(a), axis=0)


def _qw(imatrix: np.ndarray, n_rows: int) -> np.ndarray:
    """The imatrix as quant_weights of every super-block of ``n_rows`` rows: [n_rows * k/256, 256]."""
    per_row = imatrix.reshape(-1, QK_K)
    return np.broadcast_to(per_row[None], (n_rows, *per_row.shape)).reshape(-1, QK_K)


def _sigma2(xbl: np.ndarray) -> np.ndarray:
    """``sumx2/QK_K`` per super-block, ``sumx2 += x*x`` in order."""
    return seq_sum(xbl * xbl) / F32(QK_K)


def split_signs(xb: np.ndarray, weight: np.ndarray, parity: bool):
    """Magnitudes and sign bytes of groups of 8: xb/weight [G, m*8] -> (xval [G, m*8], signs uint8 [G, m]).

    ``xb >= 0`` keeps the value (also -0.0), else the bit is set. With ``parity``
    (XXS/XS), an odd count of negatives flips back the first position with the
    smallest ``weight*x*x`` and the byte keeps 7 bits.
    """
    G, n = xb.shape
    neg = ~(xb >= 0)
    xval = np.where(neg, -xb, xb)
    bit = (np.uint16(1) << np.arange(8, dtype=np.uint16))
    neg8 = neg.reshape(G, n // 8, 8)
    s = (neg8 * bit).sum(axis=2, dtype=np.uint16)
    if parity:
        odd = (neg8.sum(axis=2) & 1).astype(bool)
        if odd.any():
            gi, ki = nonzero2(odd)
            x8 = xb.reshape(G, n // 8, 8)[gi, ki]
            w8 = weight.reshape(G, n // 8, 8)[gi, ki]
            imin = np.argmin((w8 * x8) * x8, axis=1)        # ``ax < min``: first of equal values
            col = ki * 8 + imin
            xval[gi, col] = -xval[gi, col]
            s[gi, ki] ^= (np.uint16(1) << imin.astype(np.uint16))
        s &= 127
    return xval, s.astype(np.uint8)


def snap(g: Grid, l: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray):
    """Levels ``l [G, m*8]`` -> grid indices [G, m]; off-grid codes take iq2_find_best_neighbour with ``scale [G]``.

    Returns ``(grid index [G, m], on_grid bool [G, m])``.
    """
    G, n = l.shape
    m = n // 8
    u = g.codes(l.reshape(G, m, 8))
    gi = g.kmap[u].astype(np.int64)
    on = gi >= 0
    if not on.all():
        r, k = nonzero2(~on)
        cols = (k * 8)[:, None] + np.arange(8)
        gi[r, k] = best_neighbour(g, u[r, k], xval[r[:, None], cols], waux[r[:, None], cols], scale[r], _qtab(g))
    return gi, on


def _qtab(g: Grid) -> np.ndarray:
    """q of each level: ggml's grid coordinate ``2*l + 1``."""
    return 2 * np.arange(g.n_levels, dtype=F32) + F32(1)


def _levels(g: Grid, gi: np.ndarray) -> np.ndarray:
    """Grid indices [G, m] -> levels [G, m*8] (``(pg[i] - 1)/2``)."""
    return g.levels[gi].reshape(gi.shape[0], -1)


def _fit(w: np.ndarray, xval: np.ndarray, L: np.ndarray):
    """``sumqx += w*xval[i]*q; sumq2 += w*q*q`` with ``q = 2*L[i] + 1``."""
    q = 2 * L.astype(F32) + F32(1)
    return seq_sum((w * xval) * q), seq_sum((w * q) * q)


def _round_levels(id_: np.ndarray, xval: np.ndarray, kmax: int) -> np.ndarray:
    """``MAX(0, MIN(kMaxQ-1, nearest_int(0.5f*(id*xval-1))))``."""
    l = nearest_int_exact(F32(0.5) * (id_[:, None] * xval - F32(1)))
    return np.clip(l, 0, kmax - 1).astype(np.int8)


def _trial_id(i_s: int, base: np.ndarray) -> np.ndarray:
    """``(2*kMaxQ-1+is*0.1f)/base`` with kMaxQ = 3 (int 5 plus the float is*0.1f)."""
    return (F32(5) + F32(i_s) * F32(0.1)) / base


def _xxs_groups(xb, weight, g: Grid):
    """The per-32 search of quantize_row_iq2_xxs_impl: xb/weight [G, 32] -> (scale [G], grid idx [G, 4], signs [G, 4])."""
    G = xb.shape[0]
    kmax = 3
    waux = np.sqrt(weight)
    xval, signs = split_signs(xb, weight, parity=True)
    scale = np.zeros(G, dtype=F32)
    gidx = np.zeros((G, 4), dtype=np.int64)
    mx = xval.max(axis=1)
    act = np.flatnonzero(~(mx < GROUP_MAX_EPS))
    if act.size:
        xv, w, wa = xval[act], weight[act], waux[act]
        s0, _ = make_qp_quants(xv, kmax + 1, w)
        eff_max = s0 * F32(kmax)
        ok = eff_max > 0
        act, xv, w, wa, s, eff_max = act[ok], xv[ok], w[ok], wa[ok], s0[ok], eff_max[ok]
        best = np.zeros(act.size, dtype=F32)
        L = np.zeros(xv.shape, dtype=np.int8)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i_s in range(-6, 7):
                id_ = _trial_id(i_s, eff_max)
                this_scale = F32(1) / id_
                gi, _ = snap(g, _round_levels(id_, xv, kmax), xv, wa, this_scale)
                Laux = _levels(g, gi)
                sumqx, sumq2 = _fit(w, xv, Laux)
                upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                s = np.where(upd, sumqx / sumq2, s).astype(F32)
                best = np.where(upd, s * sumqx, best).astype(F32)
                L[upd] = Laux[upd]
            pos = s > 0
            if pos.any():
                # the final pass: levels at 1/scale, snapped with ``scale``
                p = np.flatnonzero(pos)
                gi, _ = snap(g, _round_levels(F32(1) / s[p], xv[p], kmax), xv[p], wa[p], s[p])
                Lp = _levels(g, gi)
                L[p] = Lp
                sumqx, sumq2 = _fit(w[p], xv[p], Lp)
                s[p] = np.where(sumq2 > 0, sumqx / sumq2, s[p])
        neg = s < 0
        if neg.any():                   # "should never happen": flip the scale and the signs
            s[neg] = -s[neg]
            signs[act[neg]] = ~signs[act[neg]] & 127
        u = g.codes(L.reshape(-1, 4, 8))
        gi = g.kmap[u]
        if (gi < 0).any():
            raise RuntimeError("IQ2_XXS: a point off the grid (ggml aborts here)")
        scale[act] = s
        gidx[act] = gi
    done = np.zeros(G, dtype=bool)
    done[act] = True
    signs[~done] = 0                    # skipped groups write nothing
    return scale, gidx, signs


def _super_scales(scales: np.ndarray):
    """``d = max_scale/31`` and the 4-bit ``nearest_int(0.5f*(id*scale-1))`` of each sub-block: scales [nb, ns]."""
    max_scale = scales.max(axis=1)
    d = (max_scale / F32(31)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        id_ = F32(1) / d
        l = nearest_int_exact(F32(0.5) * (id_[:, None] * scales - F32(1)))
    l = np.clip(l, 0, 15)
    return max_scale, d, l.astype(np.uint32)


def _encode_iq2_xxs(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    g = iq_grid(T.IQ2_XXS)
    sigma2 = _sigma2(x)
    weight = qw * np.sqrt(sigma2[:, None] + x * x)
    scales, gidx, signs = _xxs_groups(x.reshape(-1, 32), weight.reshape(-1, 32), g)
    scales = scales.reshape(nb, 8)
    max_scale, d, l = _super_scales(scales)
    gidx = gidx.reshape(nb, 8, 4).astype(np.uint32)
    signs = signs.reshape(nb, 8, 4).astype(np.uint32)
    q2 = np.empty((nb, 8, 2), dtype=np.uint32)
    q2[:, :, 0] = gidx[..., 0] | (gidx[..., 1] << 8) | (gidx[..., 2] << 16) | (gidx[..., 3] << 24)
    q2[:, :, 1] = signs[..., 0] | (signs[..., 1] << 7) | (signs[..., 2] << 14) | (signs[..., 3] << 21) | (l << 28)
    zero = ~(max_scale > 0)             # ``if (!max_scale)``: d = 0 and qs all zero
    q2[zero] = 0
    d = np.where(zero, F32(0), d)
    return np.concatenate([fp16_bytes(d), q2.astype("<u4").view(np.uint8).reshape(nb, 64)], axis=1)


def by_chunks(qtype, fn, rows: np.ndarray, imatrix: Optional[np.ndarray], *args) -> np.ndarray:
    """Run ``fn(x [nb, 256], qw [nb, 256] or None, *args) -> bytes [nb, type_size]`` over chunks of super-blocks."""
    n, k = rows.shape
    nbytes = row_nbytes(qtype, k)                   # raises unless k is a multiple of 256
    if n == 0:
        return np.zeros((0, nbytes), dtype=np.uint8)
    x = rows.reshape(-1, QK_K)
    qw = None if imatrix is None else _qw(imatrix, n)
    parts = []
    for lo in range(0, x.shape[0], CHUNK_SUPERBLOCKS):
        hi = lo + CHUNK_SUPERBLOCKS
        parts.append(fn(x[lo:hi], None if qw is None else qw[lo:hi], *args))
    return np.concatenate(parts).reshape(n, -1)


def _need_imatrix(qtype, imatrix):
    if imatrix is None:
        raise ValueError(f"{qtype.name} needs an importance matrix (as in llama.cpp)")


@register(T.IQ2_XXS)
def encode_iq2_xxs(rows: np.ndarray, imatrix=None) -> np.ndarray:
    _need_imatrix(T.IQ2_XXS, imatrix)
    return by_chunks(T.IQ2_XXS, _encode_iq2_xxs, rows, imatrix)


def _xs_groups(xb, weight, g: Grid, parity: bool, eps):
    """The per-16 search shared by quantize_row_iq2_xs_impl and quantize_row_iq2_s_impl.

    xb/weight [G, 16] -> (scale [G], grid idx [G, 2], signs [G, 2]).
    """
    G = xb.shape[0]
    kmax = 3
    waux = np.sqrt(weight)
    xval, signs = split_signs(xb, weight, parity=parity)
    scale = np.zeros(G, dtype=F32)
    gidx = np.zeros((G, 2), dtype=np.int64)
    mx = xval.max(axis=1)
    act = np.flatnonzero(~(mx < eps))
    if act.size:
        xv, w, wa, mx = xval[act], weight[act], waux[act], mx[act]
        best = np.zeros(act.size, dtype=F32)
        s = (mx / F32(5)).astype(F32)                       # scale = max/(2*kMaxQ-1)
        L = np.zeros(xv.shape, dtype=np.int8)               # memset(L, 0, 16): code 0 is on both grids
        on = np.ones((act.size, 2), dtype=bool)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i_s in range(-9, 10):
                id_ = _trial_id(i_s, mx)
                this_scale = F32(1) / id_
                gi, on_aux = snap(g, _round_levels(id_, xv, kmax), xv, wa, this_scale)
                Laux = _levels(g, gi)
                sumqx, sumq2 = _fit(w, xv, Laux)
                upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
                s = np.where(upd, sumqx / sumq2, s).astype(F32)
                best = np.where(upd, s * sumqx, best).astype(F32)
                L[upd] = Laux[upd]
                on[upd] = on_aux[upd]
            redo = ~on.all(axis=1) & (s > 0)
            if redo.any():
                # only the halves that were off the grid are redone, at 1/scale and snapped with ``scale``
                p = np.flatnonzero(redo)
                gi, _ = snap(g, _round_levels(F32(1) / s[p], xv[p], kmax), xv[p], wa[p], s[p])
                Lp = _levels(g, gi).reshape(-1, 2, 8)
                Lold = L[p].reshape(-1, 2, 8)
                Lnew = np.where(on[p][:, :, None], Lold, Lp).reshape(-1, 16)
                L[p] = Lnew
                sumqx, sumq2 = _fit(w[p], xv[p], Lnew)
                s[p] = np.where(sumq2 > 0, sumqx / sumq2, s[p])
        neg = s < 0
        if neg.any():                   # flip the scale and the signs
            s[neg] = -s[neg]
            flipped = ~signs[act[neg]]
            signs[act[neg]] = flipped & 127 if parity else flipped
        gi = g.kmap[g.codes(L.reshape(-1, 2, 8))]
        if (gi < 0).any():
            raise RuntimeError("IQ2_XS/IQ2_S: a point off the grid (ggml aborts here)")
        scale[act] = s
        gidx[act] = gi
    done = np.zeros(G, dtype=bool)
    done[act] = True
    signs[~done] = 0                    # skipped groups write nothing
    return scale, gidx, signs


def _nibbles(l: np.ndarray) -> np.ndarray:
    """4-bit scales [nb, 16] -> bytes [nb, 8]: even sub-block in the low nibble."""
    l = l.astype(np.uint8)
    return l[:, 0::2] | (l[:, 1::2] << 4)


def _encode_iq2_xs(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    g = iq_grid(T.IQ2_XS)
    sigma2 = _sigma2(x)
    weight = qw * np.sqrt(sigma2[:, None] + x * x)
    scales, gidx, signs = _xs_groups(x.reshape(-1, 16), weight.reshape(-1, 16), g, True, GROUP_MAX_EPS)
    max_scale, d, l = _super_scales(scales.reshape(nb, 16))
    q2 = (gidx.astype(np.uint16) | (signs.astype(np.uint16) << 9)).reshape(nb, 32)
    sc = _nibbles(l)
    zero = ~(max_scale > 0)             # ``if (!max_scale)``: d = 0, qs zeroed, scales stay 0
    q2[zero] = 0
    sc[zero] = 0
    d = np.where(zero, F32(0), d)
    return np.concatenate([fp16_bytes(d), q2.astype("<u2").view(np.uint8), sc], axis=1)


def _encode_iq2_s(x: np.ndarray, qw: Optional[np.ndarray]) -> np.ndarray:
    nb = x.shape[0]
    g = iq_grid(T.IQ2_S)
    sigma2 = F32(2) * seq_sum(x * x) / F32(QK_K)            # 2*sumx2/QK_K
    if qw is not None:
        weight = qw * np.sqrt(sigma2[:, None] + x * x)
    else:
        weight = F32(0.25) * sigma2[:, None] + x * x
    scales, gidx, signs = _xs_groups(x.reshape(-1, 16), weight.reshape(-1, 16), g, False, GROUP_MAX_EPS_IQ2_S)
    max_scale, d, l = _super_scales(scales.reshape(nb, 16))
    gidx = gidx.reshape(nb, 32)
    qs = (gidx & 255).astype(np.uint8)
    hi = (gidx >> 8).astype(np.uint8).reshape(nb, 8, 4)
    qh = hi[..., 0] | (hi[..., 1] << 2) | (hi[..., 2] << 4) | (hi[..., 3] << 6)
    sc = _nibbles(l)
    zero = ~(max_scale > 0)             # ``if (!max_scale) continue``: d and scales stay 0, qs/qh/signs are kept
    sc[zero] = 0
    d = np.where(zero, F32(0), (d * F32(0.9875)).astype(F32))
    return np.concatenate([fp16_bytes(d), qs, signs.reshape(nb, 32), qh, sc], axis=1)


@register(T.IQ2_XS)
def encode_iq2_xs(rows: np.ndarray, imatrix=None) -> np.ndarray:
    _need_imatrix(T.IQ2_XS, imatrix)
    return by_chunks(T.IQ2_XS, _encode_iq2_xs, rows, imatrix)


@register(T.IQ2_S)
def encode_iq2_s(rows: np.ndarray, imatrix=None) -> np.ndarray:
    return by_chunks(T.IQ2_S, _encode_iq2_s, rows, imatrix)
