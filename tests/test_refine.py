"""quant.refine: never worse than its start per block, decodes with gguf-py."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from ggufq.quant import layout, refine
from ggufq_ref import ggml_ref

pytestmark = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python's libggml not available")


@pytest.fixture(scope="module")
def real(tiny):
    from ggufq.convert import prepare
    from ggufq.importance import importance_for
    p = prepare(tiny)
    with p.model:
        t = {t.name: t for t in p.tensors}["blk.4.attn_q.weight"]
        x = t.read(0, 64)
        im = importance_for(p)["blk.4.attn_q.weight"]
    return x, im


def _werr(qtype, b, x, im):
    d = gguf.quants.dequantize(b, qtype).reshape(x.shape)
    w = np.ones(x.shape[1], np.float32) if im is None else im
    qk = layout.TRAITS[qtype].qk
    return (w * (x - d) ** 2).reshape(-1, qk).sum(1)


@pytest.mark.parametrize("qtype", layout.TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("weighted", [False, True])
def test_never_worse_per_block_and_better_overall(qtype, weighted, real):
    x, im = real
    im = im if weighted else None
    start = ggml_ref.quantize(qtype, x, im)
    out = refine.refine(qtype, x, start, im)
    assert out.shape == start.shape and out.dtype == np.uint8
    e0, e1 = _werr(qtype, start, x, im), _werr(qtype, out, x, im)
    assert np.all(e1 <= e0 * (1 + 1e-6) + 1e-12)
    assert e1.sum() < e0.sum() * 0.995, (qtype.name, e1.sum() / e0.sum())


def test_refine_fixes_a_bad_start(real):
    """From a poor but valid start (every sub-scale at its max, no mins) refine recovers most of the way."""
    x, _ = real
    qt = layout.T.Q4_K
    f = layout.unpack(qt, ggml_ref.quantize(qt, x))
    f.sc[:] = 63
    f.mn[:] = 0
    bad = layout.pack(f)
    out = refine.refine(qt, x, bad, None, iters=6)
    e_bad, e_out = _werr(qt, bad, x, None).sum(), _werr(qt, out, x, None).sum()
    e_ggml = _werr(qt, ggml_ref.quantize(qt, x), x, None).sum()
    assert e_out < 0.01 * e_bad and e_out < 4 * e_ggml
