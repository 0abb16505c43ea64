"""Error feedback (GPTQ) into the IQ2/IQ1 grids and the IQ4 tables: ggufq.quant.iq2_gptq / iq1_gptq / iq4_gptq.

Moments come from llama.cpp (ggufq.calib with given tokens) over two disjoint pieces of the tiny
model's held-out text; the bytes are decoded with gguf-py's dequantizer (what llama.cpp computes
with), so a packing mistake shows as a large error.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant_helpers import diagonal_feedback, ffn_gate_moments, out_err
from ggufq.quant import encode, gptq, iq1_gptq, iq2_gptq, iq4_gptq

GRID = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S]
TERNARY = [T.IQ1_S, T.IQ1_M]
TABLE = [T.IQ4_NL, T.IQ4_XS]
MODULE = {**{t: iq2_gptq for t in GRID}, **{t: iq1_gptq for t in TERNARY}, **{t: iq4_gptq for t in TABLE}}
ROWS = 96


@pytest.fixture(scope="module")
def moments(tmp_path_factory):
    return ffn_gate_moments(tmp_path_factory, ROWS)


@pytest.mark.parametrize("qtype", GRID + TERNARY + TABLE, ids=lambda t: t.name)
def test_error_feedback_lowers_the_output_error(qtype, moments):
    """Under the ggml encoder's own block scales, the product error drops below the plain encoding
    weighted by diag(H): on the text the moments came from, and on another text."""
    rows, m, m_other = moments
    h = gptq.Hessian.from_moment(m)
    base = encode(qtype, rows, h.diag)
    got = MODULE[qtype].encode(qtype, rows, h, start=encode)
    assert got.shape == base.shape and got.dtype == np.uint8
    # the scale bytes are the start encoder's (one super-block: no error has reached it before)
    head = {T.IQ2_XXS: [0, 1], T.IQ2_XS: [0, 1, *range(66, 74)], T.IQ2_S: [0, 1, *range(74, 82)],
            T.IQ1_S: [0, 1], T.IQ1_M: list(range(48, 56)), T.IQ4_NL: [0, 1], T.IQ4_XS: list(range(8))}[qtype]
    assert (got[:, head] == base[:, head]).all()
    assert out_err(qtype, rows, got, m) / out_err(qtype, rows, base, m) < 0.85
    assert out_err(qtype, rows, got, m_other) / out_err(qtype, rows, base, m_other) < 0.95


@pytest.mark.parametrize("qtype", GRID, ids=lambda t: t.name)
def test_grid_feedback_without_correlations_is_the_exact_grid_search(qtype, moments):
    """With a diagonal H nothing is fed forward: every 8 weights are the grid point (under the decoded
    group scale and the stored signs) with the least h-weighted squared error, and the stored signs
    keep the count of negatives even where only seven are stored."""
    rows, m, _ = moments
    rows = rows[:24]
    got, deq, hd, grid = diagonal_feedback(iq2_gptq, qtype, rows, m)
    per = 4 if qtype == T.IQ2_XXS else 2
    db = iq2_gptq._group_scales(qtype, got.reshape(len(rows), -1)).astype(np.float64)
    assert (db > 0).all()
    for r in range(len(rows)):
        for unit in range(0, rows.shape[1] // 8, 3):
            c = slice(8 * unit, 8 * unit + 8)
            s = np.where(deq[r, c] < 0, -1.0, 1.0)
            if qtype != T.IQ2_S:
                assert (s < 0).sum() % 2 == 0, (r, unit)
            cand = db[r, unit // per] * s * grid                      # every grid point, same signs
            e_all = ((rows[r, c] - cand) ** 2 * hd[c]).sum(axis=1)
            e_got = ((rows[r, c] - deq[r, c]) ** 2 * hd[c]).sum()
            assert e_got <= e_all.min() * (1 + 1e-5) + 1e-12, (r, unit)


@pytest.mark.parametrize("qtype", TERNARY, ids=lambda t: t.name)
def test_ternary_feedback_without_correlations_is_the_exact_grid_search(qtype, moments):
    """IQ1: with a diagonal H every 8 weights are the grid point (under the decoded block scale and
    delta the start encoder chose) with the least h-weighted squared error."""
    rows, m, _ = moments
    rows = rows[:24]
    got, deq, hd, grid = diagonal_feedback(iq1_gptq, qtype, rows, m)
    dl, delta = iq1_gptq._unit_scales(qtype, got.reshape(len(rows), -1))
    for r in range(len(rows)):
        for unit in range(0, rows.shape[1] // 8, 3):
            c = slice(8 * unit, 8 * unit + 8)
            cand = dl[r, unit] * (grid + delta[r, unit])
            e_all = ((rows[r, c] - cand) ** 2 * hd[c]).sum(axis=1)
            e_got = ((rows[r, c] - deq[r, c]) ** 2 * hd[c]).sum()
            assert e_got <= e_all.min() * (1 + 1e-5) + 1e-12, (r, unit)


@pytest.mark.parametrize("qtype", TABLE, ids=lambda t: t.name)
def test_table_feedback_without_correlations_is_ggml_rounding(qtype, moments):
    """With a diagonal H every weight is rounded to its nearest table value under its block scale,
    which is what ggml's encoder does after its scale search: the bytes are ggml's own, but for weights
    at a midpoint between two table values (float64 here, float32 ``x * (1/d)`` in ggml)."""
    rows, m, _ = moments
    h = gptq.Hessian.from_moment(np.diag(np.diag(m).copy()), damp=0.0)
    got = iq4_gptq.encode(qtype, rows, h, start=encode)
    base = encode(qtype, rows, h.diag)
    assert (got == base).mean() > 0.998
