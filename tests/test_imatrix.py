"""Importance matrices in both of llama.cpp's formats."""
from __future__ import annotations

import struct
import subprocess

import gguf
import numpy as np
import pytest

from conftest import HELDOUT, LLAMA_BIN, run_cli
from ggufq import GgufqError
from ggufq.imatrix import load


def _write_legacy(path, entries: dict, ncall: int, chunks: int, dataset: str):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, v in entries.items():
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, v.size))
            f.write((v * ncall).astype("<f4").tobytes())
        f.write(struct.pack("<i", chunks))
        d = dataset.encode()
        f.write(struct.pack("<i", len(d)) + d)


def _write_gguf(path, entries: dict, counts: dict):
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["x.txt"])
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, v in entries.items():
        w.add_tensor(name + ".in_sum2", (v * counts[name]).astype(np.float32).reshape(1, -1))
        w.add_tensor(name + ".counts", np.array([[counts[name]]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_both_formats_normalise_like_llama_quantize(tmp_path):
    rng = np.random.default_rng(1)
    want = {"blk.0.attn_q.weight": rng.uniform(0.1, 3, 256).astype(np.float32),
            "blk.0.ffn_down.weight": rng.uniform(0.1, 3, 768).astype(np.float32)}
    _write_legacy(tmp_path / "a.dat", want, ncall=40, chunks=40, dataset="calib.txt")
    _write_gguf(tmp_path / "a.gguf", want, {"blk.0.attn_q.weight": 5120, "blk.0.ffn_down.weight": 5120})
    a, b = load(tmp_path / "a.dat"), load(tmp_path / "a.gguf")
    assert a.legacy and not b.legacy
    assert a.datasets == ["calib.txt"] and a.chunk_count == 40
    assert b.datasets == ["x.txt"] and b.chunk_count == 7
    for k, v in want.items():
        np.testing.assert_allclose(a.for_tensor(k, v.size), v, rtol=1e-6)
        np.testing.assert_allclose(b.for_tensor(k, v.size), v, rtol=1e-6)
    assert a.for_tensor("blk.1.attn_q.weight", 256) is None
    with pytest.raises(GgufqError, match="wrong model"):
        a.for_tensor("blk.0.attn_q.weight", 512)


def test_bad_files(tmp_path):
    (tmp_path / "bad.dat").write_bytes(b"\x05\x00\x00\x00\x03\x00")
    with pytest.raises(GgufqError):
        load(tmp_path / "bad.dat")
    with pytest.raises(GgufqError, match="not found"):
        load(tmp_path / "missing.dat")


def test_real_llama_imatrix_files_agree_and_convert_uses_them(tmp_path, tiny):
    tool = LLAMA_BIN / "llama-imatrix"
    if not tool.exists():
        pytest.skip(f"llama-imatrix not built in {LLAMA_BIN} (tools/build_llama_tools.sh)")
    f16 = tmp_path / "f16.gguf"
    assert run_cli("convert", tiny, "-o", f16, "--type", "F16", "-q").returncode == 0
    calib = tmp_path / "calib.txt"
    calib.write_text(HELDOUT.read_text()[:60000] if HELDOUT.exists() else "hello world " * 5000)
    for fmt in ("gguf", "dat"):
        r = subprocess.run([str(tool), "-m", str(f16), "-f", str(calib), "-o", str(tmp_path / f"im.{fmt}"),
                            "--output-format", fmt, "-c", "128", "--chunks", "8", "-t", "2"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = load(tmp_path / "im.gguf"), load(tmp_path / "im.dat")
    assert set(a.entries) == set(b.entries) and "blk.0.ffn_down.weight" in a.entries
    for k in a.entries:
        np.testing.assert_allclose(a.entries[k], b.entries[k], rtol=1e-5)
    out = tmp_path / "q8.gguf"
    r = run_cli("convert", tiny, "-o", out, "--type", "Q8_0", "--imatrix", tmp_path / "im.gguf", "-q")
    assert r.returncode == 0, r.stderr
    fields = gguf.GGUFReader(out).fields
    assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == str(tmp_path / "im.gguf")
    assert fields["quantize.imatrix.entries_count"].parts[-1][0] == len(a.entries)
    # --method hqq with an imatrix: the real imatrix picks the block scales, the self-generated
    # moments still steer the rounding -- different blocks, the same types and tensor bytes
    outs = {}
    for label, extra in (("im", ["--imatrix", tmp_path / "im.gguf"]), ("self", [])):
        outs[label] = tmp_path / f"hqq-{label}.gguf"
        r = run_cli("convert", tiny, "-o", outs[label], "--type", "Q4_K_M", "--method", "hqq",
                    "--calib-tokens", "1024", *extra)
        assert r.returncode == 0, r.stderr
        assert "self-calibration: 2x512 tokens" in r.stderr
    ra, rb = gguf.GGUFReader(outs["im"]), gguf.GGUFReader(outs["self"])
    assert [(t.name, t.tensor_type, t.n_bytes) for t in ra.tensors] == \
        [(t.name, t.tensor_type, t.n_bytes) for t in rb.tensors]
    assert any(not np.array_equal(x.data, y.data) for x, y in zip(ra.tensors, rb.tensors))
    assert "quantize.imatrix.file" in ra.fields and "quantize.imatrix.file" not in rb.fields
