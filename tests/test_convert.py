"""End to end: the tiny real model through `ggufq convert` into files llama.cpp runs."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from conftest import run_cli
from ggufq.arch.llama import permute_rows
from ggufq.source import open_model


def _reader_tensor(r: gguf.GGUFReader, name: str):
    return next(t for t in r.tensors if t.name == name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("conv")
    out = {}
    for ft in ("F32", "F16", "BF16", "Q8_0"):
        p = d / f"tiny-{ft}.gguf"
        r = run_cli("convert", tiny, "-o", p, "--type", ft, "-j", "2")
        assert r.returncode == 0, r.stderr
        out[ft] = p
    return out


def test_f32_tensors_equal_source_with_qk_permutation(converted, tiny):
    r = gguf.GGUFReader(converted["F32"])
    with open_model(tiny) as m:
        q = m["model.layers.3.self_attn.q_proj.weight"].read_all()
        k = m["model.layers.3.self_attn.k_proj.weight"].read_all()
        v = m["model.layers.3.self_attn.v_proj.weight"].read_all()
        emb = m["model.embed_tokens.weight"].read_all()
    got_q = np.array(_reader_tensor(r, "blk.3.attn_q.weight").data)
    got_k = np.array(_reader_tensor(r, "blk.3.attn_k.weight").data)
    got_v = np.array(_reader_tensor(r, "blk.3.attn_v.weight").data)
    # llama.cpp's converter permutes Q with n_head and K with n_head_kv
    assert np.array_equal(got_q, q[permute_rows(256, 4)])
    assert np.array_equal(got_k, k[permute_rows(128, 2)])
    assert not np.array_equal(got_k, k)
    assert np.array_equal(got_v, v)
    assert np.array_equal(np.array(_reader_tensor(r, "token_embd.weight").data), emb)


def test_metadata_matches_llama_cpp_keys(converted):
    r = gguf.GGUFReader(converted["Q8_0"])
    f = r.fields
    val = lambda k: f[k].parts[f[k].data[0]].tolist()[0]  # noqa: E731
    assert bytes(f["general.architecture"].parts[-1]).decode() == "llama"
    assert val("llama.block_count") == 8
    assert val("llama.embedding_length") == 256
    assert val("llama.attention.head_count_kv") == 2
    assert val("llama.rope.dimension_count") == 64
    assert val("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert val("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert val("tokenizer.ggml.bos_token_id") == 1
    assert len(f["tokenizer.ggml.tokens"].data) == 8192


def test_types_per_tensor(converted):
    for ft, want in (("F16", T.F16), ("BF16", T.BF16), ("Q8_0", T.Q8_0), ("F32", T.F32)):
        r = gguf.GGUFReader(converted[ft])
        for t in r.tensors:
            if t.name.endswith("_norm.weight"):
                assert t.tensor_type == T.F32, t.name
            else:
                assert t.tensor_type == want, (ft, t.name, t.tensor_type)


def test_q8_0_bytes_equal_gguf_reference(converted, tiny):
    r = gguf.GGUFReader(converted["Q8_0"])
    with open_model(tiny) as m:
        w = m["model.layers.5.mlp.down_proj.weight"].read_all()
    ref = gguf.quants.quantize(w, T.Q8_0)
    got = np.array(_reader_tensor(r, "blk.5.ffn_down.weight").data)
    assert np.array_equal(got.view(np.uint8).reshape(ref.shape), ref)


def test_llama_cpp_runs_every_type(converted):
    import llama_cpp
    outs = {}
    for ft, p in converted.items():
        llm = llama_cpp.Llama(str(p), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
        toks = llm.tokenize(b"The word apple means")
        llm.eval(toks)
        outs[ft] = np.array(llm.scores[len(toks) - 1], dtype=np.float64)
        del llm
    ref = outs["F32"]
    for ft, lg in outs.items():
        rel = np.linalg.norm(lg - ref) / np.linalg.norm(ref)
        assert rel < {"F32": 1e-6, "F16": 2e-2, "BF16": 5e-2, "Q8_0": 5e-2}[ft], (ft, rel)
        assert np.argmax(lg) == np.argmax(ref) or ft != "F16"


def test_default_name_and_summary(tmp_path, tiny):
    r = run_cli("convert", tiny, "--type", "Q8_0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tinyllama-spm-10M-Q8_0.gguf").is_file()
    assert "bits/weight" in r.stderr and "Q8_0" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["tinyllama-spm-10M-Q8_0.gguf"]


def test_inspect_json(converted):
    r = run_cli("inspect", converted["Q8_0"], "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["metadata"]["general.architecture"] == "llama"
    assert s["types"]["Q8_0"]["bits_per_weight"] == pytest.approx(8.5)
    assert len(s["tensors"]) == 75
    names = {t["name"]: t for t in s["tensors"]}
    assert names["token_embd.weight"]["shape"] == [256, 8192]
    r = run_cli("inspect", converted["Q8_0"])
    assert r.returncode == 0 and "bits/weight" in r.stdout and "blk.7.ffn_down.weight" in r.stdout


def test_method_hqq_same_types_and_size_and_runs(tmp_path, tiny):
    """--method hqq writes the same tensor types (so the same bytes per tensor) as the k-quant
    path, different block contents, and llama.cpp runs it."""
    import llama_cpp
    outs = {}
    for m in ("kquant", "hqq"):
        p = tmp_path / f"{m}.gguf"
        r = run_cli("convert", tiny, "-o", p, "--type", "Q3_K_M", "--method", m, "-q")
        assert r.returncode == 0, r.stderr
        outs[m] = p
    a, b = gguf.GGUFReader(outs["kquant"]), gguf.GGUFReader(outs["hqq"])
    assert outs["kquant"].stat().st_size == outs["hqq"].stat().st_size
    assert [(t.name, t.tensor_type, t.n_bytes) for t in a.tensors] == [(t.name, t.tensor_type, t.n_bytes) for t in b.tensors]
    changed = sum(not np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.tensors, b.tensors))
    assert changed > 40
    llm = llama_cpp.Llama(str(outs["hqq"]), n_ctx=64, n_threads=2, verbose=False)
    out = llm("The word apple means", max_tokens=8, temperature=0)
    assert out["choices"][0]["text"].strip()
    r = run_cli("convert", tiny, "-o", tmp_path / "x.gguf", "--method", "nope")
    assert r.returncode == 2


def test_jobs_do_not_change_the_bytes(tmp_path, tiny):
    """Encoder processes read their own rows (fork) and the parent writes in order: -j 2 == -j 1."""
    outs = []
    for j in ("1", "2"):
        p = tmp_path / f"j{j}.gguf"
        r = run_cli("convert", tiny, "-o", p, "--type", "Q4_K_M", "-j", j, "-q")
        assert r.returncode == 0, r.stderr
        outs.append(p.read_bytes())
    assert outs[0] == outs[1]
