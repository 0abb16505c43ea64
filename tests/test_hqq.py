"""quant.hqq: the proximal solver, its encoders into ggml blocks, data-free importance, llama.cpp loading."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggufq.quant import hqq, layout
from ggufq_ref import ggml_ref


@pytest.fixture(scope="module")
def prepared(tiny):
    from ggufq.convert import prepare
    return prepare(tiny)


@pytest.fixture(scope="module")
def weights(prepared):
    with prepared.model:
        t = {t.name: t for t in prepared.tensors}["blk.1.ffn_gate.weight"]
        return t.read(0, 64)


def _lp_objective(G, s, z, bits, p=0.7):
    Wq = np.clip(np.rint(G * s[:, None] + z[:, None]), 0, (1 << bits) - 1)
    return np.abs(G - (Wq - z[:, None]) / s[:, None]).mean()


@pytest.mark.parametrize("prm", [hqq.DEFAULT, hqq.HqqParams(beta_scale=1.0)], ids=["hqq", "scaled"])
@pytest.mark.parametrize("bits,L", [(4, 32), (2, 16), (5, 32)])
def test_affine_solver_reduces_its_objective(weights, prm, bits, L):
    G = weights.reshape(-1, L)
    s0, z0, _ = hqq.solve_affine(G, bits, None, hqq.HqqParams(iters=1))     # min-max start
    s, z, info = hqq.solve_affine(G, bits, None, prm)
    e0, e1 = _lp_objective(G, s0, z0, bits), _lp_objective(G, s, z, bits)
    assert e1 < e0 * 0.99
    assert info["mean_abs_err"][0] == pytest.approx(e0, rel=1e-9)
    # per group never worse than the start (best zero kept)
    assert np.all(np.abs(G - (np.clip(np.rint(G * s[:, None] + z[:, None]), 0, (1 << bits) - 1) - z[:, None]) / s[:, None]).mean(1)
                  <= np.abs(G - (np.clip(np.rint(G * s0[:, None] + z0[:, None]), 0, (1 << bits) - 1) - z0[:, None]) / s0[:, None]).mean(1) + 1e-12)


def test_symmetric_solver_reduces_its_objective(weights):
    G = weights.reshape(-1, 32)
    a0, _ = hqq.solve_symmetric(G, -8, 7, None, hqq.HqqParams(iters=1))
    a, info = hqq.solve_symmetric(G, -8, 7, None, hqq.DEFAULT)
    err = lambda a: np.abs(G - a[:, None] * np.clip(np.rint(G / a[:, None]), -8, 7)).mean()
    assert err(a) < err(a0) * 0.99
    assert len(info["mean_abs_err"]) >= 2


def test_default_beta_zeroes_every_error(weights):
    """The known pitfall: beta=10, p=0.7 -> threshold 10^(-1/1.3) ~ 0.17 >> real errors."""
    G = weights.reshape(-1, 32)
    s, z, _ = hqq.solve_affine(G, 4, None, hqq.HqqParams(iters=1))
    e = G - (np.clip(np.rint(G * s[:, None] + z[:, None]), 0, 15) - z[:, None]) / s[:, None]
    assert np.all(hqq.shrink_lp(e, 10.0, 0.7) == 0)
    beta = np.abs(e).mean(1, keepdims=True) ** (0.7 - 2)         # scaled: about half survive
    assert 0.2 < np.mean(hqq.shrink_lp(e, beta, 0.7) != 0) < 0.8


@pytest.mark.parametrize("qtype", layout.TYPES, ids=lambda q: q.name)
def test_encoders_decode_with_gguf_and_beat_naive(qtype, weights):
    for enc in (hqq.encode_hqq_plain, hqq.encode_hqq, hqq.encode_hqq_fast, hqq.encode_hqq_max):
        b = enc(qtype, weights, None)
        assert b.dtype == np.uint8 and b.shape == (64, weights.shape[1] // layout.TRAITS[qtype].qk
                                                   * gguf.GGML_QUANT_SIZES[qtype][1])
        d = gguf.quants.dequantize(b, qtype).reshape(weights.shape)
        rel = np.sqrt(((weights - d) ** 2).mean() / (weights ** 2).mean())
        assert rel < {2: 0.6, 3: 0.35, 4: 0.2, 5: 0.1, 6: 0.05, 8: 0.01}[layout.TRAITS[qtype].bits], (enc, rel)
    if ggml_ref.available():
        mse = lambda b: ((weights - gguf.quants.dequantize(b, qtype).reshape(weights.shape)) ** 2).sum()
        ref = mse(ggml_ref.quantize(qtype, weights))
        assert mse(hqq.encode_hqq_max(qtype, weights, None)) < 0.99 * ref
        assert mse(hqq.encode_hqq(qtype, weights, None)) < 0.995 * ref


def test_passthrough_types(weights):
    out = hqq.encode_hqq(T.F16, weights, None)
    assert np.array_equal(out.view(np.float16).reshape(weights.shape), weights.astype(np.float16))


def test_importance_shapes_for_every_tensor(prepared):
    from ggufq.importance import importance_for
    with prepared.model:
        imp = importance_for(prepared)
    ts = {t.name: t for t in prepared.tensors}
    expect = {n for n in ts if any(k in n for k in ("attn_q.", "attn_k.", "attn_v.", "attn_output.",
                                                    "ffn_gate.", "ffn_up.", "ffn_down."))} | {"output.weight",
                                                                                              "token_embd.weight"}
    assert set(imp) == expect
    for n, v in imp.items():
        assert v.shape == (ts[n].row_len,) and v.dtype == np.float32
        assert np.all(np.isfinite(v)) and np.all(v >= 0) and v.max() > 0
    with prepared.model:
        g = ts["blk.0.attn_norm.weight"].read(0, 1).reshape(-1)
    assert np.allclose(imp["blk.0.attn_q.weight"], g * g, rtol=1e-6)
    # token_embd (untied, a lookup): every reader of the residual stream, each gamma^2 at mean 1
    with prepared.model:
        norms = [ts[n].read(0, 1).reshape(-1).astype(np.float64) ** 2 for n in ts
                 if n.endswith(("attn_norm.weight", "ffn_norm.weight")) or n == "output_norm.weight"]
    assert len(norms) == 2 * prepared.info.n_layer + 1
    assert np.allclose(imp["token_embd.weight"], sum(g2 / g2.mean() for g2 in norms), rtol=1e-5)


def test_silu_moment_matches_monte_carlo():
    from ggufq.importance import silu_sq_mean
    z = np.random.default_rng(0).standard_normal(400_000)
    for s in (0.1, 1.0, 3.0):
        mc = np.mean((s * z / (1 + np.exp(-s * z))) ** 2)
        assert silu_sq_mean(np.array([s]))[0] == pytest.approx(mc, rel=0.02)


def test_llama_cpp_runs_an_hqq_gguf(prepared, tmp_path):
    """A whole tiny model written with encode_hqq (Q4_K layer matrices, Q6_K output, F16 token_embd,
    data-free importance, two worker processes) loads in llama.cpp and predicts like the F32 model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from ggufq import vocab as vocabs
    from ggufq.convert import metadata_for
    from ggufq.importance import importance_for
    from ggufq.write import Job, write_gguf
    p = prepared
    with p.model:
        imp = importance_for(p)
    vocab = vocabs.load(p.model.path, p.model.config)
    md = metadata_for(p)

    def add(w):
        w.add_type(gguf.GGUFType.MODEL)
        md.set_gguf_meta_model(w)
        p.arch.write_hparams(w)
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
        p.arch.write_arch_extras(w)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)
    paths = {}
    def qtype(t, label):
        if len(t.shape) < 2 or label == "f32":
            return T.F32
        return {"token_embd.weight": T.F16, "output.weight": T.Q6_K}.get(t.name, T.Q4_K)
    for label in ("hqq", "f32"):
        jobs = [Job(t, qtype(t, label), imp.get(t.name)) for t in p.tensors]
        paths[label] = tmp_path / f"{label}.gguf"
        with p.model:
            write_gguf(paths[label], p.arch.name, add, jobs, encoder=hqq.encode_hqq, n_jobs=2, progress=False)
    logits = {}
    for label, path in paths.items():
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
        toks = llm.tokenize(b"The word apple means")
        llm.eval(toks)
        logits[label] = np.array(llm.scores[len(toks) - 1], np.float64)
        del llm
    ref = logits["f32"]
    rel = np.linalg.norm(logits["hqq"] - ref) / np.linalg.norm(ref)
    assert rel < 0.2, rel
    assert np.argmax(logits["hqq"]) == np.argmax(ref)
