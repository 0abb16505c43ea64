"""Malformed safetensors shards of the tinyllama fixture: one line, exit 1, nothing written, no process left."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from hostile import check_case, model_copy, no_process_left, replace, run_forked, st_parts, st_write, tree

S3 = "model-00003-of-00003.safetensors"      # holds lm_head.weight only (BF16 [8192, 256])
S1 = "model-00001-of-00003.safetensors"


def _hdr(fn):
    def mutate(m):
        n, h, body = st_parts(m / S3)
        res = fn(h, body)
        if isinstance(res, tuple):
            h, body, raw = res + (None,) * (3 - len(res)) if len(res) < 3 else res
        else:
            raw = None
        st_write(m / S3, h, body, raw)
    return mutate


def _lm(h):
    return h["lm_head.weight"]


def _set(key, value):
    def fn(h, body):
        _lm(h)[key] = value
    return _hdr(fn)


def _raw(data: bytes):
    return lambda m: replace(m / S3, data)


def _raw_header(text: bytes):
    def mutate(m):
        n, h, body = st_parts(m / S3)
        st_write(m / S3, None, body, raw_header=text)
    return mutate


def _dup_key(m):
    n, h, body = st_parts(m / S3)
    raw = json.dumps(h, separators=(",", ":")).encode()
    extra = b',"lm_head.weight":' + json.dumps(_lm(h), separators=(",", ":")).encode()
    st_write(m / S3, None, body, raw_header=raw[:-1] + extra + b"}")


def _overlap(m):
    # shard 1: move the second tensor's region to overlap the first one's
    n, h, body = st_parts(m / S1)
    items = sorted(((k, v) for k, v in h.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    (_, a), (_, b) = items[0], items[1]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    st_write(m / S1, h, body)


def _gap(m):
    n, h, body = st_parts(m / S3)
    _lm(h)["data_offsets"] = [8, 8 + 4194304]
    st_write(m / S3, h, b"\0" * 8 + body)


def _trailing(m):
    n, h, body = st_parts(m / S3)
    st_write(m / S3, h, body + b"\0" * 16)


def _fifo(m):
    os.unlink(m / S3)
    os.mkfifo(m / S3)


def _directory(m):
    os.unlink(m / S3)
    (m / S3).mkdir()


def _deep_json(m):
    n, h, body = st_parts(m / S3)
    deep = b'{"__metadata__":' + b"[" * 100000 + b"]" * 100000 + b"}"
    st_write(m / S3, None, body, raw_header=deep)


CASES = {
    "empty file": (_raw(b""), "not a safetensors file"),
    "short file": (_raw(b"\x01\x02\x03"), "not a safetensors file"),
    "header length beyond file": (_raw(struct.pack("<Q", 1 << 40) + b"{}"), "corrupt safetensors header"),
    "header length 2^64-1": (_raw(b"\xff" * 8 + b"{}"), "corrupt safetensors header"),
    "header not JSON": (_raw_header(b"#!not json"), "corrupt safetensors header"),
    "header not UTF-8": (_raw_header(b'{"\xff\xfe":1}'), "corrupt safetensors header"),
    "header a list": (_raw_header(b"[1,2,3]"), "corrupt safetensors header"),
    "header nested 100000 deep": (_deep_json, "nested too deeply"),
    "duplicate tensor key": (_dup_key, "duplicate key"),
    "entry not an object": (_hdr(lambda h, b: h.__setitem__("lm_head.weight", 5)), "corrupt safetensors header entry"),
    "entry without dtype": (_hdr(lambda h, b: _lm(h).pop("dtype")), "corrupt safetensors header entry"),
    "dtype a number": (_set("dtype", 16), "dtype must be a string"),
    "dtype I32": (_set("dtype", "I32"), "has dtype I32"),
    "shape a string": (_set("shape", "8192,256"), "shape must be a list"),
    "shape float": (_set("shape", [8192.0, 256]), "must be an integer"),
    "shape non-integer": (_set("shape", [8192.5, 256]), "must be an integer"),
    "shape bool": (_set("shape", [True, 256]), "must be an integer"),
    "shape negative": (_set("shape", [-8192, -256]), "negative dimension"),
    "shape 9 dims": (_set("shape", [1] * 9), "at most 8"),
    "shape too big for data": (_set("shape", [8192, 512]), "needs"),
    "shape 2^62": (_set("shape", [1 << 31, 1 << 31]), "needs"),
    "offsets 3 values": (_set("data_offsets", [0, 1, 2]), "data_offsets must be"),
    "offsets strings": (_set("data_offsets", ["0", "4194304"]), "must be an integer"),
    "offsets float": (_set("data_offsets", [0, 4194304.5]), "must be an integer"),
    "offsets reversed": (_set("data_offsets", [4194304, 0]), "outside the file"),
    "offsets negative": (_set("data_offsets", [-8, 4194296]), "outside the file"),
    "offsets beyond file": (_set("data_offsets", [8, 4194312]), "outside the file"),
    "offsets 2^64": (_set("data_offsets", [0, 1 << 64]), "outside the file"),
    "overlapping tensors": (_overlap, "overlaps"),
    "gap before data": (_gap, "gap of 8 bytes"),
    "bytes after the data": (_trailing, "bytes after the last tensor"),
    "truncated data": (lambda m: replace(m / S3, (m / S3).read_bytes()[:-100]), "outside the file"),
    "FIFO as shard": (_fifo, "FIFO"),
    "directory as shard": (_directory, "directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_shard(case, tmp_path):
    m = model_copy(tmp_path / "m")
    mutate, want = CASES[case]
    mutate(m)
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf", "-t", "Q8_0", "-j", "2"], [out, m], want)


def test_same_tensor_in_two_shard_files(tmp_path):
    """Without an index every *.safetensors is read: a name in two files is an error, not 'last wins'."""
    m = model_copy(tmp_path / "m")
    os.unlink(m / "model.safetensors.index.json")
    n, h, body = st_parts(m / S3)
    st_write(m / "zz-extra.safetensors", h, body)
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf"], [out, m], "lm_head.weight is in both")


def _poison(m, values, count):
    """Put ``values`` (float32) in the first ``count`` weights of lm_head (BF16)."""
    n, h, body = st_parts(m / S3)
    arr = np.frombuffer(body, dtype="<u2").copy()
    bits = (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    arr[:count] = np.resize(bits, count)
    st_write(m / S3, h, arr.tobytes())


@pytest.mark.parametrize("values,ftype,want", [
    ([np.nan], "Q4_K_M", "output.weight has 37 non-finite"),
    ([np.inf, -np.inf], "Q8_0", "output.weight has 37 non-finite"),
    ([1e5, -2e5], "F16", "output.weight has 37 weights beyond F16's range"),
    ([3e9], "Q4_K_M", "weights too large for Q6_K: 1 blocks whose F16 scale overflows"),
    ([3e9], "Q8_0", "weights too large for Q8_0: 2 blocks whose F16 scale overflows"),
])
def test_nonfinite_weights_refused(values, ftype, want, tmp_path):
    m = model_copy(tmp_path / "m")
    _poison(m, values, 37)
    out = tmp_path / "o"
    out.mkdir()
    for jobs in ("1", "2"):
        check_case(["convert", m, "-o", out / "x.gguf", "-t", ftype, "-j", jobs], [out, m], want,
                   "--allow-nonfinite")


def test_allow_nonfinite_writes_and_warns_once(tmp_path):
    m = model_copy(tmp_path / "m")
    _poison(m, [np.nan], 5)
    out = tmp_path / "o"
    out.mkdir()
    r = run_forked("convert", m, "-o", out / "x.gguf", "-t", "Q8_0", "-j", "2", "-q", "--allow-nonfinite")
    assert r.rc == 0, r.err
    assert r.lines == ["warning: tensor output.weight has 5 non-finite (NaN/Inf) weights "
                       "(written anyway: --allow-nonfinite)"], r.err
    assert "RuntimeWarning" not in r.err
    assert [p.name for p in out.iterdir()] == ["x.gguf"]
    no_process_left()


def test_large_weights_that_fit_pass_in_every_type(tmp_path):
    """Weights far beyond F16's range still make finite Q8_0 scales (d = max/127): no complaint."""
    m = model_copy(tmp_path / "m")
    _poison(m, [1e6], 16)
    out = tmp_path / "o"
    out.mkdir()
    r = run_forked("convert", m, "-o", out / "x.gguf", "-t", "Q8_0", "-q")
    assert r.rc == 0 and r.err == "", r.err


def test_large_but_f16_range_weights_pass(tmp_path):
    """65504 is F16's largest finite value: it converts (F16 target) without a complaint."""
    m = model_copy(tmp_path / "m")
    _poison(m, [65280.0, -65280.0], 64)      # exactly representable in BF16 and F16
    out = tmp_path / "o"
    out.mkdir()
    r = run_forked("convert", m, "-o", out / "x.gguf", "-t", "F16", "-q")
    assert r.rc == 0 and r.err == "", r.err
    assert tree(out)
