"""Codebook grids of the i-quants: grid -> kmap -> neighbour lists, as ggml builds them.

Follows ``iq2xs_init_impl`` (and, with ``bits=3, dim=4``, ``iq3xs_init_impl``) of
ggml-quants.c. A grid point is ``dim`` small integers ``l`` packed ``bits`` bits
each into a code ``u``; ggml places it at ``pos = 2*l + 1``. ``kmap[u]`` is the
grid index of code ``u`` or -1 when ``u`` is off the grid; for an off-grid code
the neighbour list holds every grid point whose squared distance to ``u`` is
among the ``nwant`` smallest distinct distances, ordered as ggml's ``qsort`` on
(distance, index) pairs leaves them (the comparison is total, so the order is
unique).

The grids come from gguf-py (``gguf.quants.<TYPE>.grid_hex`` holds ggml's
``kgrid_*`` uint16/uint32 codes as little-endian hex); each table is built once
per process (:func:`iq_grid` is cached).

The neighbour lists are stored padded to a rectangle ``nbrs [n_off, width]``:
row ``nbr_row[u]`` lists the neighbours of ``u``, padded with copies of its last
entry. A padded copy scores exactly like the entry it repeats, so a
first-minimum search over the whole row (``np.argmin``) returns what ggml's
``if (d2 < best) ...`` scan over the true list returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from gguf import GGMLQuantizationType as T

from .common import nonzero2

F32 = np.float32


@dataclass(frozen=True, eq=False)
class Grid:
    levels: np.ndarray      # int8 [n_grid, dim]: l of each coordinate (ggml's pos = 2*l + 1)
    kmap: np.ndarray        # int32 [kmap_size]: grid index of code u, -1 off the grid
    nbr_row: np.ndarray     # int32 [kmap_size]: which neighbour list belongs to an off-grid u, -1 on the grid
    nbr_start: np.ndarray   # int64 [n_off]: start of each list in nbr_flat
    nbr_count: np.ndarray   # int64 [n_off]: length of each list
    nbr_flat: np.ndarray    # int32 [sum(nbr_count)]: the lists, back to back (ggml's kneighbors_q2xs without the counts)
    bits: int

    @property
    def dim(self) -> int:
        return self.levels.shape[1]

    @cached_property
    def n_levels(self) -> int:
        return int(self.levels.max()) + 1

    @cached_property
    def flat_terms(self) -> np.ndarray:
        """int8 [dim, n_flat]: ``i*n_levels + level`` of coordinate i of every neighbour-list entry."""
        lv = self.levels[self.nbr_flat].T.astype(np.int16)                 # [dim, n_flat]
        off = (np.arange(self.dim, dtype=np.int16) * self.n_levels)[:, None]
        return np.ascontiguousarray(lv + off).astype(np.int8 if self.dim * self.n_levels < 128 else np.int16)

    @lru_cache(maxsize=None)
    def flat_prefix(self, P: int) -> np.ndarray:
        """int16 [n_flat]: each neighbour-list entry's first P levels as one index (l0 most significant)."""
        lv = self.levels[self.nbr_flat].astype(np.int16)
        c = np.zeros(lv.shape[0], dtype=np.int16)
        for i in range(P):
            c = c * self.n_levels + lv[:, i]
        return c

    def codes(self, L: np.ndarray) -> np.ndarray:
        """Pack levels ``L [..., dim]`` (0 <= l < 2**bits) into codes u, as ``u |= l << bits*i``."""
        sh = np.arange(self.dim, dtype=np.int64) * self.bits
        return np.bitwise_or.reduce(L.astype(np.int64) << sh, axis=-1)


def decode_grid_hex(grid_hex: bytes, n: int, dim: int, bits: int) -> np.ndarray:
    """gguf-py's ``grid_hex`` -> levels int8 [n, dim] (coordinate i of code c is ``(c >> bits*i) & mask``)."""
    width = dim * bits // 8
    raw = np.frombuffer(bytes.fromhex(grid_hex.decode()), dtype=np.uint8)
    if raw.size != n * width:
        raise ValueError(f"grid_hex holds {raw.size} bytes, expected {n}x{width}")
    codes = np.zeros(n, dtype=np.int64)
    for b in range(width):                       # little-endian
        codes |= raw.reshape(n, width)[:, b].astype(np.int64) << (8 * b)
    sh = np.arange(dim, dtype=np.int64) * bits
    return ((codes[:, None] >> sh) & ((1 << bits) - 1)).astype(np.int8)


def build_grid(levels: np.ndarray, bits: int, kmap_size: int, nwant: int) -> Grid:
    """kmap and neighbour lists of ``levels [n_grid, dim]`` exactly as ggml's init builds them."""
    n_grid, dim = levels.shape
    sh = np.arange(dim, dtype=np.int64) * bits
    gcodes = np.bitwise_or.reduce(levels.astype(np.int64) << sh, axis=1)
    kmap = np.full(kmap_size, -1, dtype=np.int32)
    kmap[gcodes] = np.arange(n_grid, dtype=np.int32)   # later duplicates win, as in the C loop
    off = np.flatnonzero(kmap < 0)
    gpos = (2 * levels.astype(np.int32) + 1)                                   # [n_grid, dim]
    upos = 2 * ((off[:, None] >> sh) & ((1 << bits) - 1)).astype(np.int32) + 1  # [n_off, dim]
    gsq = (gpos * gpos).sum(axis=1)
    flat, counts = [], []
    step = max(1, (1 << 22) // n_grid)
    big = np.iinfo(np.int32).max
    for lo in range(0, off.size, step):
        p = upos[lo:lo + step]
        # integer squared distances through an exact float32 matmul (all terms are small integers)
        d2 = (p * p).sum(axis=1)[:, None] + gsq[None, :] - 2 * (p.astype(F32) @ gpos.T.astype(F32)).astype(np.int32)
        # threshold = the nwant-th smallest distinct distance of each row (or its largest when there are fewer)
        t = d2.min(axis=1)
        for _ in range(nwant - 1):
            nxt = np.where(d2 > t[:, None], d2, big).min(axis=1)
            t = np.where(nxt == big, t, nxt)
        r, j = nonzero2(d2 <= t[:, None])          # row-major: j ascending within a row
        # qsort on (d2, j): a stable sort on (row, d2) keeps j ascending among equal distances
        order = np.argsort(r.astype(np.int64) * 4096 + d2[r, j], kind="stable")
        flat.append(j[order].astype(np.int32))
        counts.append(np.bincount(r, minlength=p.shape[0]))
    nbr_flat = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    nbr_count = np.concatenate(counts).astype(np.int64) if counts else np.zeros(0, np.int64)
    nbr_start = np.concatenate(([0], np.cumsum(nbr_count)[:-1])).astype(np.int64)
    nbr_row = np.full(kmap_size, -1, dtype=np.int32)
    nbr_row[off] = np.arange(off.size, dtype=np.int32)
    return Grid(levels=levels, kmap=kmap, nbr_row=nbr_row, nbr_start=nbr_start, nbr_count=nbr_count,
                nbr_flat=nbr_flat, bits=bits)


# ggml's iq2xs_init_impl: grid size, nwant; kmap_size = 43692 for all
_IQ2 = {
    T.IQ2_XXS: ("IQ2_XXS", 2),
    T.IQ2_XS: ("IQ2_XS", 2),
    T.IQ2_S: ("IQ2_S", 1),
    T.IQ1_S: ("IQ1_S", 3),
    T.IQ1_M: ("IQ1_S", 3),      # IQ1_M shares IQ1_S's grid (iq2_data_index)
}
_IQ2_KMAP_SIZE = 43692


@lru_cache(maxsize=None)
def iq_grid(qtype: T) -> Grid:
    """The grid, kmap and neighbour lists ggml uses for ``qtype`` (built once per process)."""
    from gguf import quants as gq

    name, nwant = _IQ2[qtype]
    cls = getattr(gq, name)
    n, dim = cls.grid_shape
    levels = decode_grid_hex(cls.grid_hex, n, dim, 2)
    return build_grid(levels, 2, _IQ2_KMAP_SIZE, nwant)


def best_neighbour(g: Grid, u: np.ndarray, xval: np.ndarray, weight: np.ndarray, scale: np.ndarray,
                   qv: np.ndarray) -> np.ndarray:
    """ggml's neighbour scan for off-grid codes: the first minimum of ``sum_i (w*diff)*diff`` over the list.

    ``diff = scale*q - x`` with ``q = qv[l]`` for a coordinate at level l;
    ``u [m]`` off-grid codes; ``xval``/``weight [m, dim]``; ``scale [m]``;
    ``qv`` float32 ``[n_levels]`` (shared) or ``[m, n_levels]`` (per query). The
    sum runs over the coordinates in order, as in iq2_find_best_neighbour /
    iq1_find_best_neighbour2 (``d2 < best``: the first of equal scores wins).
    Returns grid indices int64 [m].

    Every term ``(w*diff)*diff`` depends only on the query, the coordinate and
    its level, so the terms are tabulated per query ([m, dim, n_levels]) and so
    are the running sums over the first few coordinates (one entry per
    combination of their levels); each candidate then costs one lookup of that
    partial sum plus the remaining terms, added in the C order -- the same
    float32 operations on the same values.

    Long because the scan is one flat vectorised pass over every query's list (tables, lookups,
    first minimum per list), each step kept in ggml's float32 order.
    """
    m = u.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    dim, nlev = g.dim, g.n_levels
    row = g.nbr_row[u]
    cnt = g.nbr_count[row]
    seg = np.zeros(m, dtype=np.int64)
    np.cumsum(cnt[:-1], out=seg[1:])
    total = int(seg[-1] + cnt[-1])
    # tabulate more leading coordinates when the lists are long (tables cost nlev**P per query)
    per_q = total / m
    P = 1
    while P < dim and nlev ** (P + 1) <= 128 and nlev ** (P + 1) < 4 * per_q:
        P += 1
    # flat candidate list: query j's neighbours at seg[j] .. seg[j]+cnt[j]; pos indexes the neighbour table
    pos = np.arange(total, dtype=np.int64)
    pos += np.repeat(g.nbr_start[row] - seg, cnt)
    # terms[j, i, l] = (w*diff)*diff, diff = scale*q(l) - x; computed with the queries along the
    # last axis (long inner loops over 3-8 levels would cost more than the arithmetic), then
    # transposed once to [m, dim, nlev] for the per-candidate lookups
    qv = np.asarray(qv, dtype=F32)
    sc = scale.astype(F32)
    sq = (sc[None, :] * qv[:, None]) if qv.ndim == 1 else np.ascontiguousarray((sc[:, None] * qv).T)  # [nlev, m]
    with np.errstate(invalid="ignore", over="ignore"):
        diffT = sq[None, :, :] - np.ascontiguousarray(xval.astype(F32).T)[:, None, :]   # [dim, nlev, m]
        termsT = np.ascontiguousarray(weight.astype(F32).T)[:, None, :] * diffT
        termsT *= diffT
        np.copyto(termsT, np.inf, where=np.isnan(termsT))   # NaN never passes ``d2 < best``; inf neither
        # running sums over the first P coordinates for every combination of their levels
        partT = np.zeros((1, m), dtype=F32) + termsT[0]                   # d2 = 0; d2 += t0
        for i in range(1, P):
            partT = (partT[:, None, :] + termsT[i][None, :, :]).reshape(-1, m)
        part = np.ascontiguousarray(partT.T)                              # [m, nlev**P]
        terms = np.ascontiguousarray(termsT.transpose(2, 0, 1))          # [m, dim, nlev]
        d2 = np.take(part, np.repeat(np.arange(0, m * part.shape[1], part.shape[1], dtype=np.int64), cnt)
                     + g.flat_prefix(P)[pos])
        base = np.repeat(np.arange(0, m * dim * nlev, dim * nlev, dtype=np.int64), cnt)
        tflat = terms.reshape(-1)
        ft = g.flat_terms
        for i in range(P, dim):
            d2 += np.take(tflat, base + ft[i][pos])
    mn = np.minimum.reduceat(d2, seg)
    hit = np.flatnonzero(d2 == np.repeat(mn, cnt))
    qh = np.searchsorted(seg, hit, side="right")
    first = hit[np.r_[True, qh[1:] != qh[:-1]]]
    return g.nbr_flat[pos[first]].astype(np.int64)
