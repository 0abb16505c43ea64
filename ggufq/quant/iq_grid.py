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
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as T

F32 = np.float32


@dataclass(frozen=True)
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
        r, j = np.nonzero(d2 <= t[:, None])          # row-major: j ascending within a row
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
                   qT: np.ndarray, qsel: np.ndarray | None = None) -> np.ndarray:
    """ggml's neighbour scan for off-grid codes: the first minimum of ``sum_i (w*diff)*diff`` over the list.

    ``diff = scale*q - x``; ``u [m]`` off-grid codes; ``xval``/``weight [m, dim]``;
    ``scale [m]``; ``qT`` float32 ``[dim, n_grid]``: the q of each grid
    coordinate (contiguous, transposed), or ``[dim, k*n_grid]`` holding k tables
    side by side with ``qsel [m]`` choosing one per query. The sum runs over the
    coordinates in order, as in iq2_find_best_neighbour /
    iq1_find_best_neighbour2 (``d2 < best``: the first of equal scores wins).
    Returns grid indices int64 [m].
    """
    m = u.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    row = g.nbr_row[u]
    cnt = g.nbr_count[row]
    seg = np.zeros(m, dtype=np.int64)
    np.cumsum(cnt[:-1], out=seg[1:])
    total = int(seg[-1] + cnt[-1])
    # flat candidate list: query j's neighbours at seg[j] .. seg[j]+cnt[j]
    pos = np.arange(total, dtype=np.int64)
    pos += np.repeat(g.nbr_start[row] - seg, cnt)
    cand = g.nbr_flat[pos]
    if qsel is None:
        q = np.take(qT, cand, axis=1)                                      # [dim, total]
    else:
        q = np.take(qT, cand + np.repeat(qsel.astype(np.int64) * len(g.levels), cnt), axis=1)
    xT = np.repeat(np.ascontiguousarray(xval.T, dtype=F32), cnt, axis=1)
    wT = np.repeat(np.ascontiguousarray(weight.T, dtype=F32), cnt, axis=1)
    s = np.repeat(scale.astype(F32), cnt)
    d2 = np.zeros(total, dtype=F32)
    diff = np.empty(total, dtype=F32)
    for i in range(g.dim):
        np.multiply(s, q[i], out=diff)
        diff -= xT[i]
        wT[i] *= diff
        wT[i] *= diff
        d2 += wT[i]
    d2[np.isnan(d2)] = np.inf                       # NaN never passes ``d2 < best``
    mn = np.minimum.reduceat(d2, seg)
    hit = np.flatnonzero(d2 == np.repeat(mn, cnt))
    qh = np.searchsorted(seg, hit, side="right") - 1
    first = hit[np.r_[True, qh[1:] != qh[:-1]]]
    return cand[first].astype(np.int64)
