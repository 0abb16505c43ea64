"""Bad input: one clear line on stderr, exit code 1, nothing written."""
from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from synth import make_model


def _fails(args, out_dir: Path, *, must_contain: str):
    before = set(os.listdir(out_dir)) if out_dir.exists() else set()
    r = run_cli(*args)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ggufq: error: ") and must_contain in lines[0], lines[0]
    assert set(os.listdir(out_dir)) == before, "left files behind"
    return lines[0]


def test_missing_config(tiny_copy, tmp_path):
    (tiny_copy / "config.json").unlink()
    _fails(["convert", tiny_copy, "-o", tmp_path / "x.gguf"], tmp_path, must_contain="no config.json")


def test_unknown_architecture_lists_supported(tiny_copy, tmp_path):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    line = _fails(["convert", tiny_copy, "-o", tmp_path / "x.gguf"], tmp_path, must_contain="GPTNeoXForCausalLM")
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in line


def test_missing_shard(tiny_copy, tmp_path):
    (tiny_copy / "model-00002-of-00003.safetensors").unlink()
    _fails(["convert", tiny_copy, "-o", tmp_path / "x.gguf"], tmp_path,
           must_contain="shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing")


def test_missing_tensor(tiny_copy, tmp_path):
    idx = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["model.layers.4.mlp.up_proj.weight"]
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(idx))
    _fails(["convert", tiny_copy, "-o", tmp_path / "x.gguf"], tmp_path,
           must_contain="model.layers.4.mlp.up_proj.weight is missing")


def test_wrong_shape_for_config(tiny_copy, tmp_path):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    _fails(["convert", tiny_copy, "-o", tmp_path / "x.gguf"], tmp_path, must_contain="config.json implies")


def _single_file_model(tmp_path) -> Path:
    return make_model(tmp_path / "m", hidden=64, layers=1, dtype="F32")


def test_truncated_header(tmp_path):
    m = _single_file_model(tmp_path)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[:100])
    out = tmp_path / "o"
    out.mkdir()
    _fails(["convert", m, "-o", out / "x.gguf"], out, must_contain="corrupt safetensors header")


def test_truncated_data(tmp_path):
    m = _single_file_model(tmp_path)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) - 1000])
    out = tmp_path / "o"
    out.mkdir()
    _fails(["convert", m, "-o", out / "x.gguf"], out, must_contain="outside the file")


def test_corrupt_header_json(tmp_path):
    m = _single_file_model(tmp_path)
    data = bytearray((m / "model.safetensors").read_bytes())
    data[8:12] = b"#!@~"
    (m / "model.safetensors").write_bytes(bytes(data))
    out = tmp_path / "o"
    out.mkdir()
    _fails(["convert", m, "-o", out / "x.gguf"], out, must_contain="corrupt safetensors header")


def test_unsupported_dtype(tmp_path):
    m = _single_file_model(tmp_path)
    p = m / "model.safetensors"
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    head = data[8:8 + n].replace(b'"F32"', b'"I32"', 1)   # same length, so offsets stay valid
    p.write_bytes(data[:8] + head + data[8 + n:])
    out = tmp_path / "o"
    out.mkdir()
    _fails(["convert", m, "-o", out / "x.gguf"], out, must_contain="has dtype I32")


def test_output_exists_without_force(tiny, tmp_path):
    target = tmp_path / "x.gguf"
    target.write_bytes(b"keep me")
    _fails(["convert", tiny, "-o", target], tmp_path, must_contain="exists; pass --force")
    assert target.read_bytes() == b"keep me"
    r = run_cli("convert", tiny, "-o", target, "--type", "Q8_0", "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes()[:4] == b"GGUF"


def test_unknown_type(tiny, tmp_path):
    _fails(["convert", tiny, "-o", tmp_path / "x.gguf", "--type", "Q9_9"], tmp_path, must_contain="Q9_9")


def test_disk_full_real_tmpfs(tiny, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        _fails(["convert", tiny, "-o", mnt / "x.gguf", "--type", "F16"], mnt, must_contain="disk full")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_interrupt_and_enospc_mid_write_leave_nothing(tiny, tmp_path):
    """Errors raised from inside the chunk loop (Ctrl-C, ENOSPC) remove the temp folder."""
    import errno

    from ggufq import GgufqError
    from ggufq import write as W
    from ggufq.convert import convert

    calls = {"n": 0}
    real = W._encode

    def failing(exc):
        def enc(encoder, qtype, rows, imatrix):
            calls["n"] += 1
            if calls["n"] == 10:
                raise exc
            return real(encoder, qtype, rows, imatrix)
        return enc

    for exc, expect in ((KeyboardInterrupt(), KeyboardInterrupt),
                        (OSError(errno.ENOSPC, "No space left on device"), GgufqError)):
        calls["n"] = 0
        W._encode = failing(exc)
        try:
            with pytest.raises(expect):
                convert(tiny, tmp_path / "x.gguf", "Q8_0", jobs=1, progress=False)
        finally:
            W._encode = real
        assert calls["n"] == 10
        assert os.listdir(tmp_path) == []


def test_sigint_subprocess_cleans_up(tmp_path):
    """A real Ctrl-C (SIGINT) in the middle of a conversion: exit 130, nothing left."""
    import signal
    import sys
    import time

    m = make_model(tmp_path / "big", hidden=1024, layers=6, heads=8, kv_heads=8, ff=4096, vocab=8192, dtype="F32")
    out = tmp_path / "o"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.Popen([sys.executable, "-m", "ggufq", "convert", str(m), "-o", str(out / "x.gguf"),
                          "--type", "Q8_0", "-j", "1"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(n.endswith(".tmp") for n in os.listdir(out)):
        time.sleep(0.01)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("conversion finished before the signal arrived")
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert os.listdir(out) == []
