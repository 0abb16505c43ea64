"""Shared pieces of the encoder tests: data with edge cases, real tiny-model matrices, a tiny GGUF run."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from conftest import HELDOUT, TINY


def edge_rows(k: int = 512, n: int = 48, seed: int = 0) -> np.ndarray:
    """Gaussian rows plus blocks that hit the corner cases of the searches."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    x[0, :256] = 0                                   # all-zero blocks
    x[1, :256] = 0.5                                 # constant positive (min clamps to 0)
    x[2, :256] = -0.25                               # constant negative
    x[3] = np.abs(x[3])                              # all positive
    x[4] = -np.abs(x[4])                             # all negative
    x[5, 7] = 3.0                                    # one outlier
    x[6, :64] = np.float32(1e-30)                    # tiny values
    x[7] = np.round(x[7] * 400) / 400                # many ties on a grid
    x[8, 3] = -x[8].max() * 5                        # negative absmax
    x[9, 0:32] = np.linspace(-1, 1, 32, dtype=np.float32)
    return x


def tiny_matrices(names=("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                         "model.layers.5.mlp.gate_proj.weight", "model.embed_tokens.weight")):
    """A few real bf16 matrices of the tiny model as float32 (the embedding cut to 1024 rows)."""
    from ggufq_ref.parity import model_matrices
    if not TINY.is_dir():
        pytest.skip(f"tiny model not at {TINY}")
    out = {}
    for name, m in model_matrices(str(TINY)):
        if name in names:
            out[name] = m[:1024]
    assert set(out) == set(names)
    return out


def run_tiny_gguf(tmp_path, monkeypatch, ftype_name: str, qtype, imatrix=None):
    """Convert the tiny model with every matrix in ``qtype`` (our encoders), load it in llama.cpp,
    return the last-token logits for a fixed prompt."""
    import llama_cpp

    from ggufq.convert import convert
    from ggufq.plan import load_map
    p = tmp_path / f"tiny-{ftype_name}.gguf"
    if qtype in (T.F32, T.F16, T.BF16):
        convert(TINY, p, qtype.name, jobs=1, force=True, progress=False, imatrix=imatrix)
    else:
        # every matrix in qtype (llama-quantize --pure), through a layer map
        m = tmp_path / f"pure-{qtype.name}.toml"
        m.write_text(f'[[rule]]\npattern = "*"\ntype = "{qtype.name}"\n')
        convert(TINY, p, "F16", jobs=1, force=True, progress=False, imatrix=imatrix,
                plan_kw={"rules": load_map(m)})
    llm = llama_cpp.Llama(str(p), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    toks = llm.tokenize(b"The word apple means a round fruit")
    llm.eval(toks)
    lg = np.array(llm.scores[len(toks) - 1], dtype=np.float64)
    del llm
    return lg


def diagonal_feedback(module, qtype: T, rows: np.ndarray, m: np.ndarray):
    """Encode ``rows`` with an error-feedback ``module`` (``iq1_gptq``, ``iq2_gptq``, ``iq3_gptq``)
    under the diagonal of the moment ``m`` (no damping: nothing to feed forward) -> (blocks,
    dequantized rows, the diagonal, ``qtype``'s decoded grid as float64 [n_points, group])."""
    from gguf import quants as gq
    from gguf.quants import dequantize
    from ggufq.quant import encode, gptq
    hd = np.diag(m).copy()
    got = module.encode(qtype, rows, gptq.Hessian.from_moment(np.diag(hd), damp=0.0), start=encode)
    deq = dequantize(got, qtype).reshape(rows.shape)
    cls = getattr(gq, qtype.name)
    cls.init_grid()
    return got, deq, hd, cls.grid.reshape(cls.grid_shape).astype(np.float64)


def ffn_gate_moments(tmp_path_factory, n_rows: int):
    """blk.1.ffn_gate's first ``n_rows`` rows and the moments of its inputs over two disjoint pieces of
    held-out text (collected by llama.cpp: ggufq.calib with given tokens)."""
    pytest.importorskip("llama_cpp")
    import sentencepiece as spm
    from ggufq import calib
    from ggufq.convert import prepare
    text = HELDOUT.read_text() if HELDOUT.exists() else (TINY / "README.md").read_text() * 20
    sp = spm.SentencePieceProcessor(model_file=str(TINY / "tokenizer.model"))
    ids = np.array(sp.encode(text[:60000]), np.int64)
    assert ids.size >= 2 * 8 * 127, ids.size
    out = []
    for part in (ids[:8 * 127], ids[8 * 127:16 * 127]):
        toks = np.concatenate([np.ones((8, 1), np.int64), part.reshape(8, 127)], axis=1)   # BOS + text
        with calib.calibrate_folder(TINY, tmp_path_factory.mktemp("moments"), tokens=toks, jobs=1,
                                    progress=False) as c:
            out.append(np.array(c.moment("blk.1.ffn_gate.weight")))
    p = prepare(TINY)
    with p.model:
        rows = {t.name: t for t in p.tensors}["blk.1.ffn_gate.weight"].read(0, n_rows)
    return rows.astype(np.float32), out[0], out[1]


def out_err(qtype: T, rows: np.ndarray, blocks: np.ndarray, m: np.ndarray) -> float:
    """E||(W - W_q) x||^2 summed over rows, x with second moment m."""
    from gguf.quants import dequantize
    e = (rows - dequantize(blocks, qtype).reshape(rows.shape)).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, m, e))
