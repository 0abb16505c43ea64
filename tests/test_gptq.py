"""quant.gptq: error-feedback rounding into every block type, against real input moments."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from ggufq import calib, quant
from ggufq.convert import prepare
from ggufq.quant import gptq, hqq
from ggufq.quant.layout import TRAITS


@pytest.fixture(scope="module")
def gate(tiny, tmp_path_factory):
    """blk.1.ffn_gate rows and the moment of its inputs over text tinyllama wrote itself."""
    pytest.importorskip("llama_cpp")
    p = prepare(tiny)
    with calib.calibrate_folder(tiny, tmp_path_factory.mktemp("cal"), 512, seq_len=128, seed=3, jobs=1,
                                progress=False) as c:
        m = np.array(c.moment("blk.1.ffn_gate.weight"))
    with p.model:
        rows = {t.name: t for t in p.tensors}["blk.1.ffn_gate.weight"].read(0, 192)
    return rows.astype(np.float32), m


def _out_err(qtype, rows, blocks, m):
    """E||(W - W_q) x||^2 summed over rows, x with second moment m."""
    e = (rows - dequantize(blocks, qtype).reshape(rows.shape)).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, m, e))


def test_hessian_factor(gate):
    _, m = gate
    h = gptq.Hessian.from_moment(m)
    lam = gptq.DAMP * np.diag(m).mean()
    inv = np.linalg.inv(m + lam * np.eye(len(m)))
    assert np.allclose(h.u.T @ h.u, inv, rtol=1e-6, atol=1e-8 * np.abs(inv).max())
    assert np.allclose(h.u, np.triu(h.u))
    m2 = m.copy()
    m2[5, :] = m2[:, 5] = 0                       # an input that is never non-zero
    assert np.isfinite(gptq.Hessian.from_moment(m2).u).all()


@pytest.mark.parametrize("qtype", sorted(TRAITS, key=lambda t: t.name), ids=lambda t: t.name)
def test_error_feedback_lowers_the_output_error(qtype, gate):
    """Same block format and bytes per row; the product error that the model sees drops
    well below round-to-nearest under the k-quant path's own scales."""
    rows, m = gate
    h = gptq.Hessian.from_moment(m)
    base = quant.encode(qtype, rows, h.diag) if qtype in quant.encoders() else None
    if base is None:
        pytest.skip(f"no NumPy encoder for {qtype.name}")
    got = gptq.encode(qtype, rows, h, start=quant.encode)
    assert got.shape == base.shape and got.dtype == np.uint8
    ratio = _out_err(qtype, rows, got, m) / _out_err(qtype, rows, base, m)
    assert ratio < 0.9, ratio


def test_rows_are_independent(gate):
    rows, m = gate
    h = gptq.Hessian.from_moment(m)
    whole = gptq.encode(T.Q4_K, rows, h, start=quant.encode)
    parts = np.concatenate([gptq.encode(T.Q4_K, rows[:70], h, start=quant.encode),
                            gptq.encode(T.Q4_K, rows[70:], h, start=quant.encode)])
    assert np.array_equal(whole, parts)


def test_hqq_encoders_take_a_hessian(gate):
    rows, m = gate
    h = gptq.Hessian.from_moment(m)
    for qtype in (T.Q4_K, T.Q5_0):
        out = hqq.encode_hqq(qtype, rows, h)
        assert out.shape == (len(rows), quant.row_nbytes(qtype, rows.shape[1]))
        # what it minimises is the output error: better than hqq on the diagonal alone
        diag_only = hqq.encode_hqq(qtype, rows, h.diag)
        assert _out_err(qtype, rows, out, m) < _out_err(qtype, rows, diag_only, m)
    # unquantized types ignore it
    assert np.array_equal(hqq.encode_hqq(T.F16, rows, h), quant.encode(T.F16, rows, None))


def test_shape_mismatch_is_an_error(gate):
    rows, m = gate
    with pytest.raises(ValueError):
        gptq.encode(T.Q4_K, rows[:, :128], gptq.Hessian.from_moment(m), start=quant.encode)


def test_blas_threads_set_and_restored():
    """Encoder workers and small factorizations run NumPy's OpenBLAS on one thread."""
    from ggufq import blas
    before = blas.get_threads()
    if not before:
        pytest.skip("NumPy's BLAS is not an OpenBLAS that can be found")
    with blas.threads(1):
        assert blas.get_threads() == 1
        h = gptq.Hessian.from_moment(np.eye(64) + 0.1)
        assert np.allclose(h.u.T @ h.u, np.linalg.inv(np.eye(64) + 0.1 + gptq.DAMP * 1.1 * np.eye(64)))
    assert blas.get_threads() == before


def test_sweep_order_factor_and_edges(gate):
    """group=256: U factors the permuted (H + damp)^-1; the order stays inside each block-column."""
    _, m = gate
    h = gptq.Hessian.from_moment(m, group=256)
    p = h.perm
    assert sorted(p) == list(range(len(m)))
    assert all(set(p[i:i + 256]) == set(range(i, i + 256)) for i in range(0, len(m), 256))
    d = np.diag(m)
    assert all(np.all(np.diff(d[p[i:i + 256]]) <= 0) for i in range(0, len(m), 256))
    lam = gptq.DAMP * d.mean()
    inv = np.linalg.inv(m[np.ix_(p, p)] + lam * np.eye(len(m)))
    assert np.allclose(h.u.T @ h.u, inv, rtol=1e-6, atol=1e-8 * np.abs(inv).max())
    assert np.array_equal(h.diag, gptq.Hessian.from_moment(m).diag)      # the importance stays in column order
    assert np.array_equal(h.order(256), p)
    with pytest.raises(ValueError):
        h.order(32)                           # a 32-wide block's scale would be chosen after its weights moved
    with pytest.raises(ValueError):
        gptq.sweep_inputs(T.IQ1_S, np.zeros((2, len(m)), np.float32), h, 256)      # a column-order sweep
    with pytest.raises(ValueError):
        gptq.sweep_inputs(T.IQ3_XXS, np.zeros((2, len(m)), np.float32), h, 256, unit=8)   # units of 8 split
    h8 = gptq.Hessian.from_moment(m, group=256, unit=8)
    u = h8.perm.reshape(-1, 8)
    assert np.all(u == u[:, :1] + np.arange(8)) and np.all(u[:, 0] % 8 == 0)         # whole units, in order
    sums = d[h8.perm].reshape(-1, 32, 8).sum(axis=2)
    assert np.all(np.diff(sums, axis=1) <= 1e-12 * sums.max())


@pytest.mark.parametrize("qtype", [t for t in sorted(TRAITS, key=lambda t: t.name) if gptq.sweep_order(t)[0]]
                         + [T.IQ4_XS, T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S], ids=lambda t: t.name)
def test_sweep_in_importance_order_lowers_the_output_error(qtype, gate):
    """Same scales' rules, same bytes per row: taking each block-column's columns in falling E[x^2]
    leaves less product error than column order (tinyllama: 3-7% at 256-wide block-columns)."""
    from ggufq.quant import iq2_gptq, iq3_gptq, iq4_gptq
    rows, m = gate
    mod = {T.IQ4_XS: iq4_gptq, T.IQ3_XXS: iq3_gptq, T.IQ3_S: iq3_gptq}.get(qtype, iq2_gptq if "IQ2" in qtype.name else gptq)
    group, unit = gptq.sweep_order(qtype) if gptq.sweep_order(qtype)[0] else (256, 8)   # IQ2: supported, not the default
    plain = mod.encode(qtype, rows, gptq.Hessian.from_moment(m), start=quant.encode)
    ordered = mod.encode(qtype, rows, gptq.Hessian.from_moment(m, group=group, unit=unit), start=quant.encode)
    assert ordered.shape == plain.shape and not np.array_equal(ordered, plain)
    assert _out_err(qtype, rows, ordered, m) < 0.99 * _out_err(qtype, rows, plain, m)
    # rows stay independent in either order
    h = gptq.Hessian.from_moment(m, group=group, unit=unit)
    parts = np.concatenate([mod.encode(qtype, rows[:70], h, start=quant.encode),
                            mod.encode(qtype, rows[70:], h, start=quant.encode)])
    assert np.array_equal(parts, ordered)


def test_hessian_travels_as_a_file(gate, tmp_path):
    """Pickled with ``spill``, U and the damped moment H go once to a file each there (not into every
    job's pickle); the copy maps them and encodes the same bytes; the files go with the parent's object."""
    import gc
    import pickle
    rows, m = gate
    h = gptq.Hessian.from_moment(m, group=256)
    h.spill = str(tmp_path)
    blob = pickle.dumps(h)
    assert len(blob) < h.u.nbytes // 4 and len(pickle.dumps(h)) == len(blob)
    files = list(tmp_path.iterdir())
    assert len(files) == 2                            # written once, whatever the number of jobs
    h2 = pickle.loads(blob)
    assert isinstance(h2.u, np.memmap) and np.array_equal(h2.u, h.u) and np.array_equal(h2.perm, h.perm)
    assert isinstance(h2.h, np.memmap) and np.array_equal(h2.h, h.h)
    assert np.array_equal(gptq.encode(T.Q4_K, rows, h2, start=quant.encode),
                          gptq.encode(T.Q4_K, rows, h, start=quant.encode))
    del h, h2
    gc.collect()
    assert not any(f.exists() for f in files)


def test_inv_lower_is_the_inverse_and_from_moment_unchanged(monkeypatch):
    """blas.inv_lower (LAPACK dtrtri from NumPy's OpenBLAS) inverts a lower-triangular matrix, ignoring
    its upper triangle; where no dtrtri is found the NumPy fallback gives the same U."""
    from ggufq import blas
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 97))
    lo = np.linalg.cholesky(x.T @ x / 300 + np.eye(97))
    junk = lo + np.triu(rng.standard_normal((97, 97)), 1)            # the upper triangle is not read
    inv = blas.inv_lower(junk)
    assert np.allclose(np.tril(inv), inv) and np.allclose(inv @ lo, np.eye(97), atol=1e-12)
    m = x.T @ x / 300
    h = gptq.Hessian.from_moment(m, group=0)
    monkeypatch.setattr(blas, "_trtri_fn", [None])                   # as where NumPy's BLAS has no LAPACKE
    h2 = gptq.Hessian.from_moment(m, group=0)
    assert np.allclose(h.u, h2.u, rtol=0, atol=1e-12 * np.abs(h.u).max())
    assert np.allclose(h.u.T @ h.u, np.linalg.inv(m + gptq.DAMP * np.diag(m).mean() * np.eye(97)))
