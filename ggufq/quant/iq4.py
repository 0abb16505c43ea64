"""IQ4_NL and IQ4_XS: 4-bit codes into the non-linear ``kvalues_iq4nl`` table.

Follows ggml-quants.c's ``quantize_row_iq4_nl_impl`` as ``ggml_quantize_chunk``
calls it (``quantize_iq4_nl`` / ``quantize_iq4_xs``, ``ntry = 7``, with or
without quant weights):

* per 32-weight block: weights ``x*x`` (``qw * sqrt(sigma2 + x*x)`` with an
  imatrix, sigma2 = 2/n * sum x*x over the super-block), a first scale
  ``max/127`` and 15 more trial scales ``(itry - 127)/max``, each one a least
  squares fit ``sumqx/sumq2`` over the codes it rounds to, keeping the best;
* IQ4_NL stores that scale as fp16; IQ4_XS stores ``-max_scale/32`` as fp16 and
  one signed 6-bit multiplier per block, then re-rounds every block's codes to
  its quantized scale.

float32 in the C operation order (ggml-base builds without FMA contraction);
sums over the 32 weights of a block run element after element.
``best_index_int8`` (nearest table entry, ties to the upper one) is a table
lookup on ``floor(2*x)``: the table's midpoints are multiples of 1/2, and near
them C's ``x - lo < hi - x`` is exact, so the two agree for every float.

block_iq4_nl { half d; u8 qs[16]; }                                    18 bytes
block_iq4_xs { half d; u16 scales_h; u8 scales_l[4]; u8 qs[128]; }   136 bytes
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ4_NL as _GGUF_IQ4_NL

from . import register
from .common import fp16_bytes, transpose_f32

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
NTRY = 7
KVALUES = np.array(_GGUF_IQ4_NL.kvalues, dtype=np.int8)          # kvalues_iq4nl, ascending
_KV = KVALUES.astype(np.int32)
# blocks per internal chunk: [32, 1024] float32 = 128 KiB per temporary, so a pass stays in cache
CHUNK_BLOCKS = 1024

# best_index_int8 as a lookup on t = floor(2*x), t in [-_OFF, _OFF): x < midpoint(k, k+1) <=> t < 2*midpoint
_OFF = 1024
_T = np.arange(-_OFF, _OFF)
_LUT_L = np.searchsorted(_KV[:-1] + _KV[1:], _T, side="right").astype(np.uint8)   # index into KVALUES
_LUT_Q = KVALUES[_LUT_L].astype(F32)                                              # the value itself
_CLIP = F32(_OFF - 1)


def _t_index(al2: np.ndarray) -> np.ndarray:
    """floor(al2) + _OFF as intp, for |al2| < _OFF (callers clip where that is not certain)."""
    t = np.floor(al2, out=al2).astype(np.intp)
    t += _OFF
    return t


def best_index(x: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, x) for float32 ``x`` (any shape) -> uint8 codes."""
    al2 = np.clip(np.asarray(x, dtype=F32) * F32(2), -_CLIP, _CLIP)
    return np.take(_LUT_L, _t_index(al2), mode="clip")


def _seq_sum0(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of a C-contiguous array, row after row (the C loop order)."""
    return np.add.reduce(a, axis=0)


def _search(xT: np.ndarray, wT: np.ndarray) -> np.ndarray:
    """The scale search of quantize_row_iq4_nl_impl for blocks laid out [32, c]; returns d [c]
    (0 for blocks whose |x| stays under GROUP_MAX_EPS)."""
    c = xT.shape[1]
    idx = np.abs(xT).argmax(axis=0)
    mx = xT[idx, np.arange(c)]
    skip = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(skip, F32(1), mx).astype(F32)
    al2 = np.empty_like(xT)
    wq = np.empty_like(xT)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (-mx) / F32(-127)
        id2 = (F32(1) / d) * F32(2)

        def sums(id2):
            np.multiply(xT, id2, out=al2)
            q = np.take(_LUT_Q, _t_index(al2), mode="clip")
            np.multiply(wT, q, out=wq)
            sumqx = _seq_sum0(np.multiply(wq, xT, out=al2))
            sumq2 = _seq_sum0(np.multiply(wq, q, out=q))
            return sumqx, sumq2

        sumqx, sumq2 = sums(id2)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            idt = F32(itry + int(KVALUES[0])) / mx
            sumqx, sumq2 = sums(idt * F32(2))
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            if better.any():
                dn = sumqx / sumq2
                d = np.where(better, dn, d)
                best = np.where(better, dn * sumqx, best)
    return np.where(skip, F32(0), d).astype(F32)


def _codes(x: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """best_index_int8 of inv*x per 32-block: x [nb, 32], inv [nb] -> uint8 [nb, 32]."""
    al2 = x * (inv * F32(2))[:, None]
    np.clip(al2, -_CLIP, _CLIP, out=al2)
    return np.take(_LUT_L, _t_index(al2), mode="clip")


def _pack(L: np.ndarray) -> np.ndarray:
    """codes [nb, 32] -> [nb, 16]: q4[j] = L[j] | L[j+16] << 4."""
    return L[:, :16] | (L[:, 16:] << 4)


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


@register(T.IQ4_NL)
def encode_iq4_nl(rows: np.ndarray, imatrix=None) -> np.ndarray:
    n, k = rows.shape
    x = rows.reshape(-1, 32)
    d = _search_all(x, imatrix, 32)
    L = _codes(x, _inv(d))
    out = np.concatenate([fp16_bytes(d), _pack(L)], axis=1)
    return out.reshape(n, k // 32 * 18)


@register(T.IQ4_XS)
def encode_iq4_xs(rows: np.ndarray, imatrix=None) -> np.ndarray:
    n, k = rows.shape
    x = rows.reshape(-1, 32)
    scales = _search_all(x, imatrix, QK_K).reshape(-1, 8)      # [nsb, 8]
    nsb = scales.shape[0]
    amax_i = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nsb), amax_i]
    d = -max_scale / F32(32)
    idd = _inv(d)
    ls = np.clip(np.rint(idd[:, None] * scales), -32, 31).astype(np.int32)
    dl = d[:, None] * ls.astype(F32)
    L = _codes(x, _inv(dl.reshape(-1)))
    lu = (ls + 32).astype(np.uint16)                             # 6-bit multipliers, biased
    lo4 = (lu & 0xF).astype(np.uint8)
    scales_l = lo4[:, 0::2] | (lo4[:, 1::2] << 4)                # [nsb, 4]
    scales_h = np.bitwise_or.reduce((lu >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype("<u2")
    out = np.concatenate([fp16_bytes(d), scales_h.reshape(-1, 1).view(np.uint8), scales_l,
                          _pack(L).reshape(nsb, 128)], axis=1)
    return out.reshape(n, k // QK_K * 136)


def _search_all(x: np.ndarray, imatrix, sb: int) -> np.ndarray:
    """Scales of all blocks x [nb, 32] (rows cut into 32-blocks), in chunks of whole super-blocks;
    imatrix: one weight per column of the rows, or None."""
    nb = x.shape[0]
    qw = None if imatrix is None else imatrix.reshape(-1, 32)
    per_row = 0 if imatrix is None else qw.shape[0]
    out = np.empty(nb, dtype=F32)
    per = sb // 32
    step = max(per, CHUNK_BLOCKS // per * per)
    for lo in range(0, nb, step):
        hi = min(lo + step, nb)
        xs = x[lo:hi]
        if qw is None:
            ws = xs * xs
        else:
            sup = xs.reshape(-1, sb)
            sq = sup * sup
            sigma2 = _seq_sum0(transpose_f32(sq)) * (F32(2) / F32(sb))
            qb = qw[np.arange(lo, hi) % per_row]
            ws = (qb.reshape(-1, sb) * np.sqrt(sigma2[:, None] + sq)).reshape(-1, 32)
        out[lo:hi] = _search(transpose_f32(xs), transpose_f32(ws))
    return out
