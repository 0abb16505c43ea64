"""The block-scale refit after the i-quant error-feedback sweeps (ggufq.quant.scale_refit).

Rows and moments: blk.1.ffn_gate of the tiny model with moments collected by llama.cpp over
held-out text (tests/quant_helpers.ffn_gate_moments), and Gaussian rows under a random correlated
moment; bytes are decoded with gguf-py's dequantizer (llama.cpp's decode), so the product error is
that of what llama.cpp computes with.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from quant_helpers import ffn_gate_moments, out_err
from ggufq.quant import encode, gptq, iq2_gptq, iq3_gptq, iq4_gptq, scale_refit

SWEEP = {T.IQ4_XS: iq4_gptq.encode, T.IQ4_NL: iq4_gptq.encode, T.IQ3_S: iq3_gptq.encode,
         T.IQ3_XXS: iq3_gptq.encode, T.IQ2_S: iq2_gptq.encode, T.IQ2_XS: iq2_gptq.encode,
         T.IQ2_XXS: iq2_gptq.encode}
TYPES = list(scale_refit.SCHEMES)


def code_bits(qtype) -> np.ndarray:
    """Per byte of a block, the bits that hold codes (grid indices, signs, table codes): the refit
    leaves them alone, the code descents leave the rest alone."""
    sch = scale_refit.SCHEMES[qtype]
    m = np.zeros(sch.bsz, np.uint8)
    m[{T.IQ4_XS: slice(8, 136), T.IQ3_S: slice(2, 106), T.IQ2_S: slice(2, 74), T.IQ2_XS: slice(2, 66),
       T.IQ2_XXS: slice(2, 66), T.IQ3_XXS: slice(2, 98)}.get(qtype, slice(2, None))] = 0xFF
    if sch.stride:                        # the scale nibble on top of a sign word
        m[sch.lo + sch.stride * np.arange(sch.per)] = 0x0F
    return m


def test_every_scheme_has_its_sweep():
    assert set(TYPES) == set(SWEEP)


@pytest.fixture(scope="module")
def moments(tmp_path_factory):
    return ffn_gate_moments(tmp_path_factory, 64)


def random_case(seed: int, k: int = 512, n: int = 24):
    """Gaussian rows (a zero block and an outlier among them) and a correlated moment with uneven
    column scales."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.4 * rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((2048, k)) @ mix * np.exp(0.6 * rng.standard_normal(k))
    rows = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    rows[0, :256] = 0
    rows[1, 5] = 0.4
    return rows, (x.T @ x / len(x)).astype(np.float32)


def row_err(qtype, rows, blocks, H):
    e = rows.astype(np.float64) - dequantize(blocks, qtype).reshape(rows.shape)
    return np.einsum("ri,ij,rj->r", e, H, e)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_refit_never_raises_the_product_error(qtype, seed):
    """Per row, tr(E H Eᵀ) after the scale refit is at most the sweep's and the codes are the sweep's;
    after the code descent (polish) at most the refit's, with only the codes changed; each step's
    reported cost is that of the bytes it wrote."""
    rows, m = random_case(seed)
    g, u = gptq.sweep_order(qtype)
    h = gptq.Hessian.from_moment(m, group=g, unit=u)
    H = h.moment_natural()
    w = rows.astype(np.float64)
    wHw = np.einsum("ri,ij,rj->r", w, H, w)
    swept = SWEEP[qtype](qtype, rows, h, start=encode)
    got, cost = scale_refit.refit(qtype, rows, H, swept)
    before, after = row_err(qtype, rows, swept, H), row_err(qtype, rows, got, H)
    assert (after <= before * (1 + 1e-9) + 1e-15).all()
    assert after.sum() < before.sum() * (0.999 if qtype == T.IQ4_XS else 0.99)
    assert np.allclose(cost + wHw, after, rtol=1e-6, atol=1e-12)
    bsz, bits = scale_refit.SCHEMES[qtype].bsz, code_bits(qtype)
    a, b = got.reshape(len(rows), -1, bsz), swept.reshape(len(rows), -1, bsz)
    assert ((a & bits) == (b & bits)).all()
    polish = scale_refit.polish_codes if qtype in scale_refit.CODES else scale_refit.polish_grid
    pol, cost = polish(qtype, rows, H, got)
    last = row_err(qtype, rows, pol, H)
    assert (last <= after * (1 + 1e-9) + 1e-15).all()
    assert last.sum() < after.sum() * 0.99
    assert np.allclose(cost + wHw, last, rtol=1e-6, atol=1e-12)
    c = pol.reshape(len(rows), -1, bsz)
    assert ((c & ~bits) == (a & ~bits)).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_fields_round_trip(qtype):
    """read(write(d, l)) = (d, l) over the whole range of l, and the unit values times the decoded
    scales are what gguf-py decodes."""
    rows, m = random_case(2, k=256, n=8)
    sch = scale_refit.SCHEMES[qtype]
    blk = encode(qtype, rows, np.diag(m).copy()).reshape(8, -1, sch.bsz)
    d = sch.read(blk)[0]
    ls2 = np.arange(blk.size // sch.bsz * sch.per).reshape(8, -1, sch.per) % (sch.lmax + 1)
    b2 = blk.copy()
    sch.write(b2, d, ls2)
    assert np.array_equal(sch.read(b2)[1], ls2) and np.array_equal(sch.read(b2)[0], d)
    v = scale_refit._unit_values(qtype, sch, b2)
    s = np.repeat((d[..., None] * sch.mult(ls2)).reshape(8, -1), sch.sub, axis=1)
    assert np.allclose(v * s, dequantize(b2.reshape(8, -1), qtype), rtol=1e-6, atol=0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_calibrated_encoder_refits_on_real_moments(qtype, moments):
    """Through the calibrated method's encoder (hqq._hessian_aware): on the moments' own text the
    product error is below the sweep's alone, and on other text not above it by more than noise."""
    from ggufq.quant.hqq import encode_hqq
    rows, m, m_other = moments
    g, u = gptq.sweep_order(qtype)
    h = gptq.Hessian.from_moment(m, group=g, unit=u)
    swept = SWEEP[qtype](qtype, rows, h, start=encode)
    got = encode_hqq(qtype, rows, h)
    assert got.shape == swept.shape and got.dtype == np.uint8
    assert out_err(qtype, rows, got, m) < out_err(qtype, rows, swept, m)
    assert out_err(qtype, rows, got, m_other) < 1.01 * out_err(qtype, rows, swept, m_other)


def test_calibrated_file_with_refitted_scales_loads_in_llama_cpp(tmp_path):
    """`convert --method calibrated` with matrices of refitted types, i-quant (scale_refit) and k-quant/legacy
    (kq_refit), the rest F16: llama.cpp
    loads the file and its next-token logits stay those of the F16 file (a misplaced scale field
    would scramble them)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from conftest import TINY
    from ggufq.convert import convert
    from ggufq.plan import load_map
    if not TINY.is_dir():
        pytest.skip(f"tiny model not at {TINY}")
    rules = tmp_path / "map.toml"
    rules.write_text("".join(f'[[rule]]\npattern = "{p}"\ntype = "{t}"\n' for p, t in
                             (("blk.1.ffn_up.weight", "IQ2_S"), ("blk.2.attn_output.weight", "IQ3_S"),
                              ("blk.3.ffn_gate.weight", "IQ4_XS"), ("blk.0.ffn_up.weight", "IQ2_XS"),
                              ("blk.1.attn_output.weight", "IQ3_XXS"), ("blk.2.ffn_gate.weight", "IQ4_NL"),
                              ("blk.0.attn_q.weight", "Q4_K"), ("blk.3.attn_v.weight", "Q5_1"),
                              ("blk.1.ffn_gate.weight", "Q3_K"))))
    logits = {}
    for name, kw in (("f16", {}), ("cal", {"method": "calibrated", "calib_tokens": 512,
                                          "plan_kw": {"rules": load_map(rules)}})):
        p = tmp_path / f"{name}.gguf"
        convert(TINY, p, "F16", jobs=1, force=True, progress=False, **kw)
        llm = llama_cpp.Llama(str(p), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        toks = llm.tokenize(b"The word apple means a round fruit")
        llm.eval(toks)
        logits[name] = np.array(llm.scores[:len(toks)], np.float64)
        del llm
    a, b = logits["f16"], logits["cal"]
    assert np.isfinite(b).all()
    # nine low-bit matrices of a 10M model on 512 calibration tokens: corr 0.987 here (kquant's file 0.992);
    # a scale field read from the wrong bits scrambles a matrix and drops it far below
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= 0.5
