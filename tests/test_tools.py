"""The benchmark/proof tools run and say what they claim: synthetic models convert and compute
what the HF folder computes; llama.cpp's converter and ggufq write the same file."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli

from tools import make_synthetic


def test_make_synthetic_shapes_seed_and_logits(tmp_path):
    pytest.importorskip("llama_cpp")
    from ggufq_ref.llama_worker import llama_logits
    from ggufq_ref.forward import Reference

    d = make_synthetic.write_model(tmp_path / "s", "0.25B", seed=1, layers=1, vocab=9000,
                                   shard_bytes=16 << 20, quiet=True)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is True
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) == 4          # sharded at 16 MiB
    # same seed -> same bytes; the 1B tensor list has Llama-3.2-1B's parameter count
    d2 = make_synthetic.write_model(tmp_path / "s2", "0.25B", seed=1, layers=1, vocab=9000,
                                    shard_bytes=16 << 20, quiet=True)
    for f in idx["weight_map"].values():
        assert (d / f).read_bytes() == (d2 / f).read_bytes()
    n_1b = sum(int(np.prod(s)) for _, s, _ in make_synthetic.tensor_list(make_synthetic.SIZES["1B"], 128256))
    assert n_1b == 1_235_814_400

    out = tmp_path / "s.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "F32", "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    ids = [1] + list(np.random.default_rng(0).integers(3, 8192, 47))
    ref = Reference(d).logits(ids).astype(np.float64)
    got = llama_logits(out, ids).astype(np.float64)
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert got.shape == (48, 9000) and rel.max() < 1e-3, rel.max()


def _compare(model_dir, *extra):
    r = subprocess.run([sys.executable, "-m", "tools.compare_convert", str(model_dir), *extra],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_compare_convert_tinyllama_f16_is_identical(tiny):
    pytest.importorskip("torch")   # llama.cpp's converter needs it
    out = _compare(tiny)
    assert "75 identical byte for byte" in out and "0 unexplained difference(s)" in out


@pytest.mark.parametrize("variant", ["llama3-padded-vocab-tied", "qwen2-bias-tied"])
def test_compare_convert_synthetic_q8_0(variant, tmp_path):
    pytest.importorskip("torch")
    from synth import make_model
    if variant.startswith("llama3"):
        d = make_synthetic.write_model(tmp_path / variant, "0.25B", layers=1, vocab=9000,
                                       shard_bytes=16 << 20, quiet=True)
    else:
        d = make_model(tmp_path / variant, arch="Qwen2ForCausalLM", bias=True, tied=True, hidden=128, ff=256)
    out = _compare(d, "--type", "Q8_0")
    assert "0 unexplained difference(s)" in out
    n = int(out.split("tensors: ")[1].split(" ")[0])
    # llama3's rope_freqs included: ggufq follows torch's float32 operations and pow (ggufq.arch.torchpow)
    assert f"{n} identical byte for byte" in out


def test_every_tool_answers_help():
    """``python -m tools.<each> --help`` from the repository root, every module of tools/ (none skipped):
    one interpreter runs them as ``-m`` does (runpy), so the test costs one start-up."""
    names = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem not in ("__init__", "common"))
    code = r'''
import contextlib, io, json, runpy, sys
res = {}
for name in sys.argv[1:]:
    buf = io.StringIO()
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module("tools." + name, run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as e:
            code = e.code
    res[name] = [code, buf.getvalue()[:200]]
print(json.dumps(res))
'''
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(res) == names and len(names) >= 25
    bad = {n: v for n, v in res.items() if v[0] not in (0, None) or "usage:" not in v[1]}
    assert bad == {}


def test_pareto_self_text_kld_on_held_out_sequences(tmp_path, tiny):
    """tools.pareto --self-text: KLD against the F16 on the self-calibration sequences after the probe's
    (zero for the F16 itself, positive for a quantized file); asking for more sequences than there are
    after the probe's is refused."""
    from types import SimpleNamespace

    from ggufq.convert import convert
    from tools.pareto import held_out_kld
    f16, q = tmp_path / "f16.gguf", tmp_path / "q.gguf"
    convert(tiny, f16, "F16", progress=False, jobs=1)
    convert(tiny, q, "Q4_0", progress=False, jobs=1)
    rng = np.random.default_rng(0)
    cal = SimpleNamespace(tokens=np.concatenate([np.ones((3, 1), np.int64), rng.integers(3, 8000, (3, 63))], 1))
    kld = held_out_kld(cal, f16, 2, None, 1)
    assert kld(f16) == pytest.approx(0.0, abs=1e-6)
    assert kld(q) > 1e-4
    with pytest.raises(SystemExit, match="sequences"):
        held_out_kld(cal, f16, 3, None, 1)
