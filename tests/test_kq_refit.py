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


@pytest.mark.parametrize("qtype,method", [(T.Q3_K, "calibrated"), (T.Q5_0, "calibrated"), (T.Q2_K, "calibrated"),
                                          (T.Q4_K, "calibrated-max"), (T.Q6_K, "calibrated-max")],
                         ids=lambda v: getattr(v, "name", v))
def test_calibrated_encoder_refits_on_real_moments(qtype, method, moments):  # noqa: F811
    """Through the method's encoder (hqq._hessian_aware): against the damped moment it works with the
    product error is below the sweep's alone; against the raw moments of its own text and of other
    text it is not above the sweep's by more than noise (the damping's ridge term is part of what it
    trades: Q2_K on these 1,016 tokens gives up 0.7% on the raw own-text moment)."""
    from ggufq.quant import hqq, methods
    enc = methods.get(method).encoder
    assert qtype in enc.refit_types
    rows, m, m_other = moments
    h = gptq.Hessian.from_moment(m, *gptq.sweep_order(qtype))
    swept = gptq.encode(qtype, rows, h, start=hqq._AS_FIELDS[enc.__wrapped__])
    got = enc(qtype, rows, h)
    assert got.shape == swept.shape and got.dtype == np.uint8
    H = h.moment_natural()
    assert row_err(qtype, rows, got, H).sum() < row_err(qtype, rows, swept, H).sum()
    for mm in (m, m_other):
        assert out_err(qtype, rows, got, mm) < 1.01 * out_err(qtype, rows, swept, mm)


def test_calibrated_keeps_the_sweep_at_4_to_6_bit_k_quants(moments):  # noqa: F811
    """--method calibrated leaves Q4_K/Q5_K/Q6_K as the sweep wrote them (the refit is calibrated-max's there:
    its time on large models), and the Hessians of those types then need no damped moment kept."""
    from ggufq.quant import hqq, methods
    enc = methods.get("calibrated").encoder
    rows, m, _ = moments
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        assert qtype not in enc.refit_types and qtype in methods.get("calibrated-max").encoder.refit_types
        h = gptq.Hessian.from_moment(m, *gptq.sweep_order(qtype))
        assert np.array_equal(enc(qtype, rows, h), gptq.encode(qtype, rows, h, start=hqq._hqq_fields))
