"""quant.layout: unpack -> pack is the identity on ggml's own bytes; dequant matches gguf-py."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from ggufq.quant import layout
from ggufq_ref import ggml_ref

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python's libggml not available")


@pytest.fixture(scope="module")
def rows(tiny):
    from ggufq.convert import prepare
    p = prepare(tiny)
    with p.model:
        t = {t.name: t for t in p.tensors}["blk.2.ffn_up.weight"]
        x = t.read(0, 96)[:, :512].copy()
    x[:4, :32] = np.abs(x[:4, :32])      # all-positive blocks (min > 0)
    x[4, :256] = 0                       # an all-zero block
    return x


@pytest.mark.parametrize("qtype", layout.TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("weighted", [False, True])
def test_roundtrip_and_dequant(qtype, weighted, rows):
    im = np.linspace(0.1, 3, rows.shape[1]).astype(np.float32) if weighted else None
    b = ggml_ref.quantize(qtype, rows, im)
    f = layout.unpack(qtype, b)
    assert f.q.shape == (b.size // gguf.GGML_QUANT_SIZES[qtype][1], layout.TRAITS[qtype].qk)
    assert np.array_equal(layout.pack(f).reshape(b.shape), b)
    ref = gguf.quants.dequantize(b, qtype).reshape(-1)
    assert np.array_equal(layout.dequant(f).reshape(-1), ref)


@pytest.mark.parametrize("qtype", layout.TYPES, ids=lambda q: q.name)
def test_every_bit_reaches_a_field(qtype):
    """Random bytes (fp16 fields kept finite) survive unpack -> pack: no bit is dropped or shared."""
    rng = np.random.default_rng(int(qtype))
    b = rng.integers(0, 256, size=(50, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    f = layout.unpack(qtype, b)
    f.d = np.abs(np.nan_to_num(f.d, nan=1, posinf=1, neginf=1)) % 1 + 0.5
    if f.dmin is not None:
        f.dmin = np.abs(np.nan_to_num(f.dmin, nan=1, posinf=1, neginf=1)) % 1 + 0.5
    b = layout.pack(f)
    assert np.array_equal(layout.pack(layout.unpack(qtype, b)), b)
    assert np.array_equal(layout.dequant(layout.unpack(qtype, b)).reshape(-1),
                          gguf.quants.dequantize(b, qtype).reshape(-1))


def test_pack_rejects_out_of_range():
    f = layout.unpack(layout.T.Q4_K, ggml_ref.quantize(layout.T.Q4_K, np.ones((1, 256), np.float32)))
    f.sc[0, 0] = 64
    with pytest.raises(ValueError, match="sc out of range"):
        layout.pack(f)
