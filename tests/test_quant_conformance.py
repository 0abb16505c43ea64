"""Every registered encoder against ggml, driven by the registry (``ggufq.quant.encoders()``):
a type is tested here the moment its module registers it, with no list to keep.

For each type:
* row sizes: ``[n, k] -> uint8 [n, row_nbytes]`` for 0, 1 and 3 rows, with and without an imatrix;
* round trip: gguf-py's ``dequantize`` of our bytes equals ggml's own ``to_float`` of them, bit for
  bit (the layout is the one llama.cpp reads), and the error is that of ggml's encoding;
* byte parity: 100% of blocks identical to ``ggml_quantize_chunk`` on real tinyllama rows, without
  an imatrix (where ggml allows that) and with one.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from ggufq import quant
from ggufq_ref import ggml_ref
from ggufq_ref.parity import synthetic_imatrix
from quant_helpers import edge_rows, tiny_matrices

TYPES = sorted(quant.encoders(), key=int)
needs_ggml = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python (libggml-base) not installed")


def _k(qt: T) -> int:
    """A row length every block size of qt divides, two super-blocks long."""
    return 2 * math.lcm(quant.block_size(qt), 256)


def _lib():
    return ggml_ref._lib()


ggml_requires_imatrix = ggml_ref.requires_imatrix


class _Traits(ctypes.Structure):          # struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


def ggml_to_float(qt: T, data: np.ndarray, n: int) -> np.ndarray:
    """ggml's own decoder (type_traits.to_float) over ``n`` weights of ``data``."""
    lib = _lib()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    tr = lib.ggml_get_type_traits(int(qt)).contents
    assert tr.type_size == GGML_QUANT_SIZES[qt][1] and tr.blck_size == GGML_QUANT_SIZES[qt][0]
    data = np.ascontiguousarray(data)
    if not tr.to_float:                   # F32 has no decoder: its bytes are the floats
        assert qt == T.F32
        return data.view(np.float32).reshape(-1)[:n].copy()
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(tr.to_float)
    out = np.empty(n, dtype=np.float32)
    fn(data.ctypes.data, out.ctypes.data, n)
    return out


def _imatrices(qt: T, k: int):
    """(label, imatrix) pairs ggml accepts for qt."""
    out = [("synthetic imatrix", synthetic_imatrix(k))]
    if not ggml_requires_imatrix(qt):
        out.insert(0, ("no imatrix", None))
    assert quant.requires_imatrix(qt) == ggml_requires_imatrix(qt), qt
    return out


def test_every_module_registers_and_every_type_has_a_layout():
    from ggufq.quant import _MODULES  # noqa: PLC2701 (the registry's own list)
    import importlib

    assert len(_MODULES) == len(set(_MODULES))
    seen = set()
    for mod in _MODULES:
        m = importlib.import_module(f"ggufq.quant.{mod}")
        mine = {qt for qt, fn in quant.encoders().items() if fn.__module__ == m.__name__}
        assert mine, f"ggufq.quant.{mod} registers no encoder"
        seen |= mine
    assert seen == set(TYPES)
    for qt in TYPES:
        assert qt in GGML_QUANT_SIZES


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_row_sizes_and_empty_chunks(qt):
    k = _k(qt)
    assert quant.can_encode(qt, k)
    if quant.block_size(qt) > 1:
        assert not quant.can_encode(qt, k + quant.block_size(qt) // 2)
    x = edge_rows(k=k, n=12)
    ones = np.ones(k, np.float32)
    needs = quant.requires_imatrix(qt)
    if needs:                             # as ggml: refused without importance weights, not guessed
        with pytest.raises(ValueError, match="needs an importance matrix"):
            quant.encode(qt, x[:1])
    for n in (0, 1, 3):
        for im in ((ones,) if needs else (None, ones)):
            out = quant.encode(qt, x[:n], im)
            assert out.shape == (n, quant.row_nbytes(qt, k)) and out.dtype == np.uint8
    # rows are independent: encoding them one at a time gives the same bytes
    im = ones if needs else None
    whole = quant.encode(qt, x[:5], im)
    assert np.array_equal(whole, np.concatenate([quant.encode(qt, x[i:i + 1], im) for i in range(5)]))


@needs_ggml
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_round_trip_decodes_as_ggml_does(qt):
    x = next(iter(tiny_matrices().values()))[:64]
    k = x.shape[1]
    if not quant.can_encode(qt, k):
        x = edge_rows(k=_k(qt), n=64)
    for label, im in _imatrices(qt, x.shape[1]):
        ours = quant.encode(qt, x, im)
        deq = gq.dequantize(ours, qt).reshape(x.shape)
        assert deq.dtype == np.float32 and np.isfinite(deq).all()
        assert np.array_equal(deq.reshape(-1), ggml_to_float(qt, ours, x.size)), (qt.name, label)
        ref = ggml_ref.quantize(qt, x, im)
        err = lambda q: float(np.linalg.norm(gq.dequantize(q, qt).reshape(x.shape) - x))  # noqa: E731
        assert err(ours) <= err(ref) * (1 + 1e-6) + 1e-12, (qt.name, label)


@needs_ggml
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_byte_parity_with_ggml_on_tinyllama_rows(qt):
    bsz = GGML_QUANT_SIZES[qt][1]
    checked = 0
    for name, m in tiny_matrices().items():
        m = m[:512]
        if not quant.can_encode(qt, m.shape[1]):
            continue
        for label, im in _imatrices(qt, m.shape[1]):
            ours = quant.encode(qt, m, im).reshape(-1, bsz)
            ref = ggml_ref.quantize(qt, m, im).reshape(-1, bsz)
            same = (ours == ref).all(axis=1)
            assert same.all(), f"{qt.name} {label} {name}: {int(same.sum())}/{same.size} blocks identical"
            checked += 1
    assert checked > 0


@needs_ggml
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_byte_parity_with_ggml_on_edge_rows(qt):
    """Zero, constant, one-signed, outlier, tiny and tied blocks (tests/quant_helpers.edge_rows)."""
    x = edge_rows(k=_k(qt), n=48, seed=3)
    for label, im in _imatrices(qt, x.shape[1]):
        ours, ref = quant.encode(qt, x, im), ggml_ref.quantize(qt, x, im)
        bsz = GGML_QUANT_SIZES[qt][1]
        same = (ours.reshape(-1, bsz) == ref.reshape(-1, bsz)).all(axis=1)
        if qt in STRICT_EDGES:
            assert same.all(), f"{qt.name} {label}: {int(same.sum())}/{same.size} blocks identical"
        else:       # ggml's k-quant searches leave a few ties on constructed blocks to float noise
            assert same.mean() >= 0.97, f"{qt.name} {label}: {int(same.sum())}/{same.size} blocks identical"


# types whose encoders match ggml on every constructed edge block too (the rest: tests/test_quant_k_*.py)
STRICT_EDGES = {T.F32, T.F16, T.BF16, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0, T.MXFP4}


@needs_ggml
def test_mxfp4_exponent_next_to_powers_of_two():
    """floor(log2f(amax)) where log2f rounds up to the integer: the floats just below 2^k."""
    vals = []
    for e in range(-60, 30):
        v = np.float32(2.0 ** e)
        vals.append(np.nextafter(v, np.float32(np.inf)))
        for _ in range(8):
            vals.append(v)
            v = np.nextafter(v, np.float32(0))
    vals = np.array(vals, dtype=np.float32)
    rows = np.zeros((vals.size, 32), np.float32)
    rows[:, 3] = vals
    rows[:, 20] = -vals * np.float32(0.37)
    assert np.array_equal(quant.encode(T.MXFP4, rows), ggml_ref.quantize(T.MXFP4, rows))


def test_iq4_best_index_matches_the_c_search():
    """best_index_int8 as a table on floor(2x) equals the C binary search for every float near
    a table value or a midpoint (where x - lo < hi - x decides)."""
    from ggufq.quant.iq4 import KVALUES, best_index

    val = [float(v) for v in KVALUES]

    def c_best_index(x: np.float32) -> int:
        if x <= val[0]:
            return 0
        if x >= val[-1]:
            return len(val) - 1
        ml, mu = 0, len(val) - 1
        while mu - ml > 1:
            mav = (ml + mu) // 2
            if x < val[mav]:
                mu = mav
            else:
                ml = mav
        return mu - 1 if np.float32(x - np.float32(val[mu - 1])) < np.float32(np.float32(val[mu]) - x) else mu

    centres = val + [(a + b) / 2 for a, b in zip(val, val[1:])] + [0.0, -200.0, 200.0]
    xs = []
    for c in centres:
        v = np.float32(c)
        lo = hi = v
        xs.append(v)
        for _ in range(6):
            lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
            xs += [lo, hi]
    xs = np.array(xs + list(np.random.default_rng(0).uniform(-140, 140, 5000).astype(np.float32)), dtype=np.float32)
    want = np.array([c_best_index(x) for x in xs])
    assert np.array_equal(best_index(xs), want)
