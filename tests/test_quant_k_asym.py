"""Q2_K / Q4_K / Q5_K encoders and ggml's make_qkx2/qkx3 searches."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from ggufq.quant import encode
from ggufq_ref import ggml_ref
from ggufq_ref.parity import compare, synthetic_imatrix
from ggufq.quant.q4_k import pack_scales_k4, unpack_scales_k4
from ggufq.quant.qkx import make_qkx2_quants, make_qkx3_quants
from quant_helpers import edge_rows, run_tiny_gguf, tiny_matrices

KQ = [T.Q2_K, T.Q4_K, T.Q5_K]
needs_ggml = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python's libggml-base not installed")
f32 = np.float32


def _qkx_scalar(x, w, nmax, rmin, rdelta, nstep, use_mad, v3):
    """A line-by-line float32 transcription of ggml's make_qkx2_quants / make_qkx3_quants (one group)."""
    n = len(x)
    ww = (lambda i: x[i] * x[i]) if w is None else (lambda i: w[i])
    mn = mx = x[0]
    sum_w = ww(0)
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
        sum_w = f32(sum_w + ww(i))
        sum_x = f32(sum_x + ww(i) * x[i])
    if mn > 0:
        mn = f32(0)
    if (mx <= mn) if v3 else (mx == mn):
        return f32(0), f32(-mn), np.zeros(n, np.uint8)
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    L = np.zeros(n, np.uint8)
    best = f32(0)
    for i in range(n):
        L[i] = max(0, min(nmax, int(np.rint(iscale * (x[i] - mn)))))
        diff = scale * f32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best = f32(best + ww(i) * diff)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (mx - mn)
        la = np.array([max(0, min(nmax, int(np.rint(iscale * (x[i] - mn))))) for i in range(n)], np.uint8)
        sl = sl2 = sxl = f32(0)
        for i in range(n):
            wl = ww(i) * f32(la[i])
            sl = f32(sl + wl)
            sl2 = f32(sl2 + wl * f32(la[i]))
            sxl = f32(sxl + wl * x[i])
        D = sum_w * sl2 - sl * sl
        if D > 0:
            ts = (sum_w * sxl - sum_x * sl) / D
            tm = (sl2 * sum_x - sl * sxl) / D
            if tm > 0:
                tm = f32(0)
                ts = sxl / sl2
            err = f32(0)
            for i in range(n):
                diff = ts * f32(la[i]) + tm - x[i]
                diff = abs(diff) if use_mad else diff * diff
                err = f32(err + ww(i) * diff)
            if err < best:
                L, best, scale, mn = la, err, ts, tm
    return f32(scale), f32(-mn), L


@pytest.mark.parametrize("cfg", [
    dict(nmax=15, rmin=-1.0, rdelta=0.1, nstep=20, use_mad=False, v3=False),   # Q4_K ref
    dict(nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True, v3=False),     # Q2_K ref
    dict(nmax=31, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False, v3=True),   # Q5_K / Q5_1 imatrix
    dict(nmax=15, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False, v3=True, noweights=True),
], ids=["qkx2-q4k", "qkx2-q2k-mad", "qkx3-31", "qkx3-x2weights"])
def test_qkx_matches_scalar_transcription(cfg):
    cfg = dict(cfg)
    noweights = cfg.pop("noweights", False)
    v3 = cfg.pop("v3")
    gs = 16 if cfg["nmax"] == 3 else 32
    x = edge_rows(k=256, n=12, seed=5).reshape(-1, gs)[:150]
    w = None if noweights else (np.abs(x) + f32(0.01)).astype(f32)
    fn = make_qkx3_quants if v3 else make_qkx2_quants
    s, m, L = fn(x, w, **cfg)
    assert L.dtype == np.uint8 and L.shape == x.shape
    for g in range(x.shape[0]):
        s1, m1, L1 = _qkx_scalar(x[g], None if w is None else w[g], v3=v3, **cfg)
        assert s[g] == s1 and m[g] == m1 and np.array_equal(L[g], L1), g


def test_scale_packing_round_trips_all_values():
    v = np.arange(64, dtype=np.uint8)
    ls = np.stack(np.meshgrid(v, v), -1).reshape(-1, 2)           # every (scale, min) pair
    ls8 = np.repeat(ls[:, :1], 8, axis=1)
    lm8 = np.repeat(ls[:, 1:], 8, axis=1)
    ls8[:, 5] = lm8[:, 2]                                           # mix positions
    packed = pack_scales_k4(ls8, lm8)
    assert packed.shape == (ls.shape[0], 12)
    sc, m = unpack_scales_k4(packed)
    assert np.array_equal(sc, ls8) and np.array_equal(m, lm8)


@pytest.mark.parametrize("qt", KQ, ids=lambda t: t.name)
@pytest.mark.parametrize("with_im", [False, True], ids=["ref", "imatrix"])
def test_decode_matches_block_fields(qt, with_im):
    """gguf-py decodes our bytes to exactly d*sc*q - dmin*m from the fields we wrote."""
    x = edge_rows(k=512, n=16, seed=6)
    im = synthetic_imatrix(512) if with_im else None
    q = encode(qt, x, im)
    nb = q.size // GGML_QUANT_SIZES[qt][1]
    blk = q.reshape(nb, -1)
    got = gq.dequantize(q, qt).reshape(nb, 256)
    if qt == T.Q2_K:
        sc, qs = blk[:, :16], blk[:, 16:80]
        d, dmin = blk[:, 80:82].copy().view(np.float16), blk[:, 82:84].copy().view(np.float16)
        codes = np.stack([(qs.reshape(nb, 2, 32) >> (2 * j)) & 3 for j in range(4)], 2).reshape(nb, 16, 16)
        dsc = d.astype(f32) * (sc & 0xF).astype(f32)
        msc = dmin.astype(f32) * (sc >> 4).astype(f32)
        assert codes.max() <= 3
    else:
        d, dmin = blk[:, 0:2].copy().view(np.float16), blk[:, 2:4].copy().view(np.float16)
        s6, m6 = unpack_scales_k4(blk[:, 4:16])
        assert s6.max() <= 63 and m6.max() <= 63
        qs = blk[:, -128:].reshape(nb, 4, 32)
        codes = np.stack([qs & 0xF, qs >> 4], 2).astype(np.int32)        # [nb, 4, 2, 32]
        if qt == T.Q5_K:
            qh = blk[:, 16:48]
            hi = np.stack([np.stack([(qh >> (2 * c)) & 1, (qh >> (2 * c + 1)) & 1], 1) for c in range(4)], 1)
            codes = codes + 16 * hi.astype(np.int32)
        codes = codes.reshape(nb, 8, 32)
        dsc = d.astype(f32) * s6.astype(f32)
        msc = dmin.astype(f32) * m6.astype(f32)
    want = dsc[..., None] * codes.astype(f32) - msc[..., None]
    np.testing.assert_allclose(got, want.reshape(nb, 256), rtol=1e-6, atol=1e-12)
    # and the decode approximates the input
    assert np.linalg.norm(got.reshape(x.shape) - x) < 0.6 * np.linalg.norm(x)


@needs_ggml
@pytest.mark.parametrize("qt", KQ, ids=lambda t: t.name)
def test_parity_with_ggml_on_edge_cases(qt):
    x = edge_rows(k=512, n=40, seed=7)
    for im in (None, synthetic_imatrix(512)):
        ours, ref = encode(qt, x, im), ggml_ref.quantize(qt, x, im)
        bs = GGML_QUANT_SIZES[qt][1]
        same = (ours.reshape(-1, bs) == ref.reshape(-1, bs)).all(axis=1).mean()
        assert same >= 0.97, (qt.name, im is not None, same)
        e = lambda q: np.linalg.norm(gq.dequantize(q, qt).reshape(x.shape) - x)  # noqa: E731
        assert e(ours) <= 1.01 * e(ref)


@needs_ggml
@pytest.mark.parametrize("qt", KQ, ids=lambda t: t.name)
def test_parity_with_ggml_on_real_weights(qt):
    ratios = []
    for name, m in tiny_matrices().items():
        for im in (None, synthetic_imatrix(m.shape[1])):
            p = compare(qt, m, im)
            assert p.ratio <= 1.01, (name, im is not None, p)
            assert p.same_blocks >= 0.99, (name, im is not None, p)
            ratios.append(p.ratio)
    assert np.mean(ratios) <= 1.0 + 1e-9


@needs_ggml
def test_llama_cpp_runs_our_k_quant_files_identical_to_ggml(tmp_path, monkeypatch):
    import ggufq.convert as conv
    from ggufq.write import write_gguf
    ref = run_tiny_gguf(tmp_path, monkeypatch, "F32", T.F32)
    for name, qt, tol in (("Q4_K", T.Q4_K, 0.2), ("Q2_K", T.Q2_K, 0.6)):
        lg = run_tiny_gguf(tmp_path, monkeypatch, name, qt)
        ours = (tmp_path / f"tiny-{name}.gguf").read_bytes()
        assert np.linalg.norm(lg - ref) / np.linalg.norm(ref) < tol
        with monkeypatch.context() as mp:
            mp.setattr(conv, "write_gguf", functools.partial(write_gguf, encoder=ggml_ref.quantize))
            lg_ref = run_tiny_gguf(tmp_path, mp, name, qt)
        assert (tmp_path / f"tiny-{name}.gguf").read_bytes() == ours
        assert np.array_equal(lg, lg_ref)


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1] + KQ, ids=lambda t: t.name)
def test_row_sizes_and_empty_chunks(qt):
    from ggufq.quant import row_nbytes
    for n in (0, 1, 3):
        for im in (None, np.ones(768, np.float32)):
            out = encode(qt, edge_rows(k=768, n=12)[:n], im)
            assert out.shape == (n, row_nbytes(qt, 768)) and out.dtype == np.uint8
