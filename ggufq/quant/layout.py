"""Field-level view of ggml's block formats: unpack bytes into (d, dmin, integer
sub-scales, sub-mins, codes), pack them back, and dequantize.

Every block is described by the same fields, so searches (``refine``, ``hqq``)
work on all types with one code path:

* ``d``    float32 [n]        the block's fp16 scale (value as stored)
* ``dmin`` float32 [n] | None fp16 min scale (K-quants) or the fp16 min ``m`` (Q4_1/Q5_1)
* ``sc``   int32 [n, S] | None integer sub-block scales (signed for Q3_K/Q6_K)
* ``mn``   int32 [n, S] | None integer sub-block mins (Q2_K/Q4_K/Q5_K)
* ``q``    int32 [n, QK]      codes as stored, 0..2^bits-1 (Q8_0: -128..127)

and decoded with one affine form per sub-block (see :func:`affine`)::

    x = A[s] * (q - ZQ) + B[s]
    A = d * sc (or d),  B = -dmin * mn (K-quants) | m (Q4_1/Q5_1) | 0

Bit positions are tables (``_planes``) built once per type, in the same order
gguf-py's dequantizers read them; pack and unpack both walk those tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK_K = 256


@dataclass(frozen=True)
class Traits:
    qk: int            # weights per block
    n_sub: int         # sub-blocks per block (1 for legacy types)
    bits: int          # code bits
    zq: int            # code offset: value = q - zq
    has_min: bool      # dmin/m field present
    sc_bits: int = 0   # bits of the integer sub-scales (0: none)
    sc_signed: bool = False
    mn_bits: int = 0   # bits of the integer sub-mins (0: none)

    @property
    def sub_len(self) -> int:
        return self.qk // self.n_sub

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


TRAITS: dict[T, Traits] = {
    T.Q4_0: Traits(32, 1, 4, 8, False),
    T.Q4_1: Traits(32, 1, 4, 0, True),
    T.Q5_0: Traits(32, 1, 5, 16, False),
    T.Q5_1: Traits(32, 1, 5, 0, True),
    T.Q8_0: Traits(32, 1, 8, 0, False),
    T.Q2_K: Traits(QK_K, 16, 2, 0, True, 4, False, 4),
    T.Q3_K: Traits(QK_K, 16, 3, 4, False, 6, True),
    T.Q4_K: Traits(QK_K, 8, 4, 0, True, 6, False, 6),
    T.Q5_K: Traits(QK_K, 8, 5, 0, True, 6, False, 6),
    T.Q6_K: Traits(QK_K, 16, 6, 32, False, 8, True),
}
TYPES = tuple(TRAITS)


@dataclass
class Fields:
    qtype: T
    d: np.ndarray
    q: np.ndarray
    dmin: Optional[np.ndarray] = None
    sc: Optional[np.ndarray] = None
    mn: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return self.d.shape[0]

    def copy(self) -> "Fields":
        c = lambda a: None if a is None else a.copy()
        return Fields(self.qtype, self.d.copy(), self.q.copy(), c(self.dmin), c(self.sc), c(self.mn))


# --- bit-plane tables ---------------------------------------------------------
# A plane: (field, elem [m], byte [m], shift, width, value_shift): bits
# value_shift .. value_shift+width of field[elem] live at byte[.] << shift.
# Within a plane the bytes are distinct, so packing is one |= per plane.

def _nibbles(base: int, n: int, lanes: int):
    """4-bit codes in groups of 2*lanes: element g*2L + s*L + l -> byte base + g*L + l, shift 4s."""
    out = []
    for s in (0, 1):
        e = np.arange(n).reshape(-1, 2, lanes)[:, s, :].reshape(-1)
        b = base + np.arange(n // 2).reshape(-1, lanes).reshape(-1)
        out.append(("q", e, b, 4 * s, 4, 0))
    return out


def _crumbs(base: int, n: int, lanes: int, field="q", value_shift=0):
    """2-bit codes: element g*4L + s*L + l -> byte base + g*L + l, shift 2s."""
    out = []
    for s in range(4):
        e = np.arange(n).reshape(-1, 4, lanes)[:, s, :].reshape(-1)
        b = base + np.arange(n // 4).reshape(-1, lanes).reshape(-1)
        out.append((field, e, b, 2 * s, 2, value_shift))
    return out


def _bitmask(base: int, n: int, lanes: int, value_shift: int):
    """1 bit per element: element s*L + l -> byte base + l, bit s."""
    out = []
    for s in range(n // lanes):
        e = s * lanes + np.arange(lanes)
        out.append(("q", e, base + np.arange(lanes), s, 1, value_shift))
    return out


def _legacy_hi(base: int):
    """Q5_0/Q5_1: bit 4 of element j at bit j of a little-endian uint32."""
    return [("q", 8 * np.arange(4) + j, base + np.arange(4), j, 1, 4) for j in range(8)]


def _k_scales(base: int):
    """Q4_K/Q5_K 12-byte packing of 8 six-bit scales and mins."""
    lo, hi = np.arange(4), np.arange(4, 8)
    return [
        ("sc", lo, base + lo, 0, 6, 0), ("sc", hi, base + lo, 6, 2, 4),
        ("mn", lo, base + 4 + lo, 0, 6, 0), ("mn", hi, base + 4 + lo, 6, 2, 4),
        ("sc", hi, base + 8 + lo, 0, 4, 0), ("mn", hi, base + 8 + lo, 4, 4, 0),
    ]


def _q3_scales(base: int):
    """Q3_K 12-byte packing of 16 six-bit scales (stored as sc + 32)."""
    k = np.arange(8)
    out = [("sc", k, base + k, 0, 4, 0), ("sc", k + 8, base + k, 4, 4, 0)]
    for s in range(4):
        e = s * 4 + np.arange(4)
        out.append(("sc", e, base + 8 + np.arange(4), 2 * s, 2, 4))
    return out


@lru_cache(maxsize=None)
def _layout(qtype: T):
    """(planes, {fp16 field: byte offset}, {int8 field: byte offset})."""
    L = {
        T.Q4_0: (_nibbles(2, 32, 16), {"d": 0}, {}),
        T.Q4_1: (_nibbles(4, 32, 16), {"d": 0, "dmin": 2}, {}),
        T.Q5_0: (_nibbles(6, 32, 16) + _legacy_hi(2), {"d": 0}, {}),
        T.Q5_1: (_nibbles(8, 32, 16) + _legacy_hi(4), {"d": 0, "dmin": 2}, {}),
        T.Q8_0: ([], {"d": 0}, {"q": 2}),
        T.Q2_K: ([("sc", np.arange(16), np.arange(16), 0, 4, 0), ("mn", np.arange(16), np.arange(16), 4, 4, 0)]
                 + _crumbs(16, 256, 32), {"d": 80, "dmin": 82}, {}),
        T.Q3_K: (_crumbs(32, 256, 32) + _bitmask(0, 256, 32, 2) + _q3_scales(96), {"d": 108}, {}),
        T.Q4_K: (_k_scales(4) + _nibbles(16, 256, 32), {"d": 0, "dmin": 2}, {}),
        T.Q5_K: (_k_scales(4) + _bitmask(16, 256, 32, 4) + _nibbles(48, 256, 32), {"d": 0, "dmin": 2}, {}),
        T.Q6_K: (_q6_low() + _crumbs(128, 256, 32, value_shift=4), {"d": 208}, {"sc": 192}),
    }[qtype]
    return L


def _q6_low():
    """Q6_K low nibbles: element h*128 + s*64 + p -> byte h*64 + p, shift 4s."""
    return _nibbles(0, 256, 64)


def _bias(qtype: T, field: str) -> int:
    """stored = value + bias for the bit-packed integer fields."""
    if field == "sc" and qtype == T.Q3_K:
        return 32
    return 0


def _ts(qtype: T) -> int:
    return GGML_QUANT_SIZES[qtype][1]


def unpack(qtype: T, blocks: np.ndarray) -> Fields:
    """uint8 [n_blocks, type_size] (or any shape reshapeable to it) -> Fields."""
    tr = TRAITS[qtype]
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, _ts(qtype))
    n = b.shape[0]
    planes, f16, i8 = _layout(qtype)
    ints = {"q": np.zeros((n, tr.qk), np.int32)}
    if tr.sc_bits:
        ints["sc"] = np.zeros((n, tr.n_sub), np.int32)
    if tr.mn_bits:
        ints["mn"] = np.zeros((n, tr.n_sub), np.int32)
    for field, e, byte, shift, width, vshift in planes:
        v = (b[:, byte] >> np.uint8(shift)) & np.uint8((1 << width) - 1)
        ints[field][:, e] |= v.astype(np.int32) << vshift
    for field, off in i8.items():
        size = tr.qk if field == "q" else tr.n_sub
        ints[field] = b[:, off:off + size].view(np.int8).astype(np.int32)
    for field in ("sc", "mn"):
        if field in ints:
            ints[field] -= _bias(qtype, field)
    fl = {k: b[:, off:off + 2].copy().view(np.float16).reshape(n).astype(np.float32) for k, off in f16.items()}
    return Fields(qtype, fl["d"], ints["q"], fl.get("dmin"), ints.get("sc"), ints.get("mn"))


def pack(f: Fields) -> np.ndarray:
    """Fields -> uint8 [n_blocks, type_size]. Integer fields must be in range (checked)."""
    qtype = f.qtype
    tr = TRAITS[qtype]
    n = f.n
    out = np.zeros((n, _ts(qtype)), np.uint8)
    planes, f16, i8 = _layout(qtype)
    ints = {"q": f.q}
    if tr.sc_bits:
        ints["sc"] = f.sc
    if tr.mn_bits:
        ints["mn"] = f.mn
    lo_hi = {"q": (-128, 127) if qtype == T.Q8_0 else (0, tr.qmax)}
    if tr.sc_bits:
        lo_hi["sc"] = (-(1 << (tr.sc_bits - 1)), (1 << (tr.sc_bits - 1)) - 1) if tr.sc_signed else (0, (1 << tr.sc_bits) - 1)
    if tr.mn_bits:
        lo_hi["mn"] = (0, (1 << tr.mn_bits) - 1)
    for k, a in ints.items():
        lo, hi = lo_hi[k]
        if a.size and (a.min() < lo or a.max() > hi):
            raise ValueError(f"{qtype.name}.{k} out of range [{lo}, {hi}]: {a.min()}..{a.max()}")
    stored = {k: (a + _bias(qtype, k)).astype(np.int32) for k, a in ints.items()}
    for field, e, byte, shift, width, vshift in planes:
        v = ((stored[field][:, e] >> vshift) & ((1 << width) - 1)).astype(np.uint8)
        out[:, byte] |= v << np.uint8(shift)
    for field, off in i8.items():
        a = stored[field]
        out[:, off:off + a.shape[1]] = a.astype(np.int8).view(np.uint8)
    for k, off in f16.items():
        out[:, off:off + 2] = np.asarray(getattr(f, k), np.float32).astype(np.float16).reshape(n, 1).view(np.uint8)
    return out


def affine(f: Fields) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (A, B) float32 [n, S] with x = A * (q - ZQ) + B."""
    tr = TRAITS[f.qtype]
    d = f.d[:, None].astype(np.float32)
    A = d * f.sc.astype(np.float32) if f.sc is not None else np.repeat(d, tr.n_sub, 1)
    if f.mn is not None:
        B = -f.dmin[:, None].astype(np.float32) * f.mn.astype(np.float32)
    elif f.dmin is not None:
        B = np.repeat(f.dmin[:, None].astype(np.float32), tr.n_sub, 1)
    else:
        B = np.zeros_like(A)
    return A, B


def dequant(f: Fields) -> np.ndarray:
    """float32 [n_blocks, QK] as ggml decodes it."""
    tr = TRAITS[f.qtype]
    A, B = affine(f)
    q = (f.q - tr.zq).astype(np.float32).reshape(f.n, tr.n_sub, tr.sub_len)
    return (A[..., None] * q + B[..., None]).reshape(f.n, tr.qk)
