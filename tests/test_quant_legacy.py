"""Q4_0 / Q4_1 / Q5_0 / Q5_1 encoders: byte identity with gguf-py and llama.cpp, imatrix parity, llama.cpp runs them."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from ggufq.quant import encode, legacy
from ggufq_ref import ggml_ref
from ggufq.quant.common import fp16_round
from ggufq_ref.parity import compare, synthetic_imatrix
from quant_helpers import edge_rows, run_tiny_gguf, tiny_matrices

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
needs_ggml = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python's libggml-base not installed")


def _blocks_same(a: np.ndarray, b: np.ndarray, qt) -> float:
    bs = GGML_QUANT_SIZES[qt][1]
    return float((a.reshape(-1, bs) == b.reshape(-1, bs)).all(axis=1).mean())


@pytest.mark.parametrize("qt", LEGACY, ids=lambda t: t.name)
def test_byte_identical_to_gguf_py(qt):
    x = edge_rows(k=256, n=40)
    ours = encode(qt, x)
    theirs = gq.quantize(x, qt)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@needs_ggml
@pytest.mark.parametrize("qt", LEGACY, ids=lambda t: t.name)
def test_byte_identical_to_ggml_without_imatrix(qt):
    x = edge_rows(k=1024, n=64, seed=1)
    assert np.array_equal(encode(qt, x), ggml_ref.quantize(qt, x))


@pytest.mark.parametrize("qt", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("with_im", [False, True], ids=["ref", "imatrix"])
def test_decode_matches_our_codes(qt, with_im):
    """gguf-py's decoder reads back exactly d*(q - offset) [+ m] from the codes we chose: the packing is right."""
    x = edge_rows(k=512, n=24, seed=2)
    im = synthetic_imatrix(512) if with_im else None
    got = gq.dequantize(encode(qt, x, im), qt).reshape(-1, 32)
    if qt in (T.Q4_0, T.Q5_0):
        nmax = 8 if qt == T.Q4_0 else 16
        d, L = legacy._symmetric(x, im, nmax)
        want = fp16_round(d)[:, None] * (L.astype(np.float32) - nmax)
    else:
        nmax = 15 if qt == T.Q4_1 else 31
        d, m, L = legacy._asymmetric(x, im, nmax)
        want = fp16_round(d)[:, None] * L.astype(np.float32) + fp16_round(m)[:, None]
    assert np.array_equal(got, want.astype(np.float32))
    assert L.min() >= 0 and L.max() <= (2 * nmax - 1 if qt in (T.Q4_0, T.Q5_0) else nmax)


@needs_ggml
@pytest.mark.parametrize("qt", LEGACY, ids=lambda t: t.name)
def test_imatrix_parity_on_real_weights(qt):
    """With importance weights (ggml's quantize_row_q*_impl): ours is at least as accurate as ggml's."""
    ratios = []
    for name, m in tiny_matrices().items():
        for im in (None, synthetic_imatrix(m.shape[1])):
            p = compare(qt, m, im)
            assert p.ratio <= 1.01, (name, p)
            assert p.same_blocks >= 0.99, (name, p)
            if im is None:
                assert p.same_blocks == 1.0, (name, p)
            ratios.append(p.ratio)
    assert np.mean(ratios) <= 1.0 + 1e-9


@needs_ggml
def test_imatrix_changes_the_encoding():
    x = edge_rows(k=512, n=16, seed=3)
    im = synthetic_imatrix(512)
    for qt in LEGACY:
        assert not np.array_equal(encode(qt, x, im), encode(qt, x)), qt.name
        assert _blocks_same(encode(qt, x, im), ggml_ref.quantize(qt, x, im), qt) >= 0.99


@needs_ggml
def test_llama_cpp_runs_our_q4_0_file_identical_to_ggml(tmp_path, monkeypatch):
    """The tiny model with every matrix in Q4_0/Q5_1 by our encoder: llama.cpp loads and runs it, and the file
    is the one ggml's own quantizer gives (same bytes)."""
    import ggufq.convert as conv
    from ggufq.write import write_gguf
    for name, qt in (("Q4_0", T.Q4_0), ("Q5_1", T.Q5_1)):
        lg = run_tiny_gguf(tmp_path, monkeypatch, name, qt)
        ours = (tmp_path / f"tiny-{name}.gguf").read_bytes()
        with monkeypatch.context() as mp:
            mp.setattr(conv, "write_gguf", functools.partial(write_gguf, encoder=ggml_ref.quantize))
            lg_ref = run_tiny_gguf(tmp_path, mp, name, qt)
        assert np.all(np.isfinite(lg))
        assert (tmp_path / f"tiny-{name}.gguf").read_bytes() == ours
        assert np.array_equal(lg, lg_ref)


def _edge_values() -> np.ndarray:
    """Blocks where the sign of a zero or the rounding of the float just below 0.5 decides the bytes."""
    rng = np.random.default_rng(4)
    z = np.zeros((8, 512), np.float32)
    z[0, 1::3] = -0.0                                     # +0 and -0 mixed
    z[1] = -0.0                                           # all -0
    z[2, :32] = np.float32(0.49999997)                    # Q8_0: x/d = 0.49999997, roundf gives 0 (floor(x+0.5) 1)
    z[2, 0] = 127
    z[3, ::2] = np.abs(rng.standard_normal(256))          # non-negative blocks whose min is a signed zero
    z[3, 1::4] = -0.0
    z[4, 5] = -1e-3
    z[5, 64:96] = -z[3, 64:96]
    return z


@needs_ggml
@pytest.mark.parametrize("qt", [T.Q8_0, *LEGACY, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_signed_zeros_and_rounding_edges_byte_identical(qt):
    x = _edge_values()
    for im in (None, synthetic_imatrix(512)):
        assert np.array_equal(encode(qt, x, im), ggml_ref.quantize(qt, x, im)), im is not None


def test_transpose_u8_is_a_transpose():
    from ggufq.quant.common import transpose_u8
    rng = np.random.default_rng(5)
    for shape in ((32, 7), (16, 1000), (4, 1), (6, 5), (0, 3), (8, 0)):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        t = transpose_u8(a)
        assert t.flags.c_contiguous and np.array_equal(t, a.T)
