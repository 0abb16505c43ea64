"""The scale/min refit and code descent after the k-quant and legacy error-feedback sweep (ggufq.quant.kq_refit).

Rows and moments as in tests/test_scale_refit.py: Gaussian rows under a random correlated moment,
and blk.1.ffn_gate of the tiny model with moments llama.cpp collected over held-out text. Bytes
are decoded with gguf-py's dequantizer (llama.cpp's decode), so every error is that of what
llama.cpp computes with.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant_helpers import out_err
from test_scale_refit import moments, random_case, row_err  # noqa: F401  -- the module fixture
from ggufq.quant import encode, gptq, kq_refit, layout

TYPES = sorted(kq_refit.FORMATS, key=lambda t: t.name)


def fields(qtype, blocks):
    f = layout.unpack(qtype, blocks)
    return {k: getattr(f, k) for k in ("d", "dmin", "sc", "mn", "q") if getattr(f, k) is not None}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_improve_never_raises_the_product_error(qtype):
    """Per row, tr(E H Eᵀ) after the refit alone, the code descent alone and both is at most the
    sweep's; the refit alone leaves the codes as they were, the descent alone leaves every other field;
    both together lower the sum by more than 1%."""
    rows, m = random_case(3, k=512, n=32)
    h = gptq.Hessian.from_moment(m, *gptq.sweep_order(qtype))
    H = h.moment_natural()
    swept = gptq.encode(qtype, rows, h, encode)
    before = row_err(qtype, rows, swept, H)
    fs = fields(qtype, swept)
    got = {}
    for name, kw in (("refit", {"polish": False}), ("polish", {"refit": False}), ("both", {})):
        got[name] = kq_refit.improve(qtype, rows, H, swept, **kw)
        assert got[name].shape == swept.shape and got[name].dtype == np.uint8
        assert (row_err(qtype, rows, got[name], H) <= before * (1 + 1e-6) + 1e-12).all(), name
    assert np.array_equal(fields(qtype, got["refit"])["q"], fs["q"])
    fp = fields(qtype, got["polish"])
    assert all(np.array_equal(fp[k], fs[k]) for k in fs if k != "q")
    assert row_err(qtype, rows, got["both"], H).sum() < 0.99 * before.sum()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q3_K, T.Q5_0], ids=lambda t: t.name)
def test_calibrated_encoder_refits_on_real_moments(qtype, moments):  # noqa: F811
    """Through the calibrated method's encoder (hqq._hessian_aware): on the moments' own text the
    product error is below the sweep's alone, and on other text not above it by more than noise."""
    from ggufq.quant.hqq import _hqq_fields, encode_hqq
    rows, m, m_other = moments
    h = gptq.Hessian.from_moment(m, *gptq.sweep_order(qtype))
    swept = gptq.encode(qtype, rows, h, start=_hqq_fields)
    got = encode_hqq(qtype, rows, h)
    assert got.shape == swept.shape and got.dtype == np.uint8
    assert out_err(qtype, rows, got, m) < out_err(qtype, rows, swept, m)
    assert out_err(qtype, rows, got, m_other) < 1.01 * out_err(qtype, rows, swept, m_other)
