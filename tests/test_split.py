"""Split output compatible with llama.cpp's gguf-split, loaded from the first shard."""
from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest

from conftest import LLAMA_BIN, run_cli
from ggufq.cli.convert import parse_size


def _kv(r: gguf.GGUFReader) -> dict:
    from ggufq.cli.inspect import _value
    return {k: _value(f) for k, f in r.fields.items() if not k.startswith(("GGUF.", "split."))}


def _tensors(r: gguf.GGUFReader) -> dict:
    return {t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8))) for t in r.tensors}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("split")
    assert run_cli("convert", tiny, "-o", d / "one.gguf", "--type", "Q8_0", "-q").returncode == 0
    r = run_cli("convert", tiny, "-o", d / "sp.gguf", "--type", "Q8_0", "--split-max-size", "4M", "-q")
    assert r.returncode == 0, r.stderr
    shards = sorted(d.glob("sp-*-of-*.gguf"))
    return d, shards


def test_shards_have_split_keys_and_all_tensors(outputs):
    d, shards = outputs
    assert [s.name for s in shards] == [f"sp-{i:05d}-of-{len(shards):05d}.gguf" for i in range(1, len(shards) + 1)]
    assert len(shards) == 3
    assert not (d / "sp.gguf").exists()
    one = gguf.GGUFReader(d / "one.gguf")
    seen = {}
    for i, s in enumerate(shards):
        r = gguf.GGUFReader(s)
        f = r.fields
        assert f["split.no"].parts[-1][0] == i
        assert f["split.count"].parts[-1][0] == len(shards)
        assert f["split.tensors.count"].parts[-1][0] == len(one.tensors)
        assert sum(t.n_bytes for t in r.tensors) <= 4_000_000 or len(r.tensors) == 1
        seen.update(_tensors(r))
        if i == 0:
            assert _kv(r) == _kv(one)
    assert seen == _tensors(one)


def test_gguf_split_merge_gives_the_unsplit_file(outputs, tmp_path):
    tool = LLAMA_BIN / "llama-gguf-split"
    if not tool.exists():
        pytest.skip(f"llama-gguf-split not built in {LLAMA_BIN} (tools/build_llama_tools.sh)")
    d, shards = outputs
    merged = tmp_path / "merged.gguf"
    r = subprocess.run([str(tool), "--merge", str(shards[0]), str(merged)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = gguf.GGUFReader(merged), gguf.GGUFReader(d / "one.gguf")
    assert _tensors(a) == _tensors(b)
    assert _kv(a) == _kv(b)


def test_llama_cpp_loads_shards_with_same_logits(outputs):
    import llama_cpp
    d, shards = outputs
    logits = []
    for p in (d / "one.gguf", shards[0]):
        llm = llama_cpp.Llama(str(p), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        toks = llm.tokenize(b"A dictionary of the English language")
        llm.eval(toks)
        logits.append(np.array(llm.scores[: len(toks)]))
        del llm
    assert np.array_equal(logits[0], logits[1])


def test_parse_size():
    assert parse_size("4M") == 4_000_000
    assert parse_size("2G") == 2_000_000_000
    assert parse_size("1.5g") == 1_500_000_000
    assert parse_size("4096") == 4096
