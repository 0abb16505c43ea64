"""Malformed GGUF files for ggufq's own readers (``inspect``, ``plan`` on a .gguf, ``--imatrix``):
every count and length is checked against the file size before anything is allocated.
One line, exit 1, nothing written, no process left; and a memory bound: every malformed-header
case stays under 200 MiB of peak RSS in a fresh interpreter (measured with ``os.wait4``)."""
from __future__ import annotations

import os
import struct

import pytest

from hostile import check_case, model_copy, run_measured

U8, I32, U32, F32, BOOL, STR, ARR, U64 = 0, 5, 4, 6, 7, 8, 9, 10
MEMORY_BOUND_KIB = 200 * 1024


def s(text: str | bytes, n: int | None = None) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b) if n is None else n) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims, ttype: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<I", ttype) + struct.pack("<Q", offset))


BASE_KV = [kv("general.architecture", STR, s("llama")), kv("llama.block_count", U32, struct.pack("<I", 1)),
           kv("llama.embedding_length", U32, struct.pack("<I", 32)),
           kv("llama.attention.head_count", U32, struct.pack("<I", 4))]
BASE_T = [tinfo("blk.0.attn_q.weight", [32, 32]), tinfo("token_embd.weight", [32, 8], offset=4096)]
DATA = b"\0" * (4096 + 32 * 8 * 4)


def gguf(kvs=None, tensors=None, data=DATA, version=3, n_kv=None, n_tensors=None, magic=b"GGUF", align=32) -> bytes:
    kvs = BASE_KV if kvs is None else kvs
    tensors = BASE_T if tensors is None else tensors
    head = (magic + struct.pack("<I", version)
            + struct.pack("<Q", len(tensors) if n_tensors is None else n_tensors)
            + struct.pack("<Q", len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors))
    return head + b"\0" * (-len(head) % align) + data


CASES = {
    "empty": (b"", "not a GGUF file"),
    "bad magic": (gguf(magic=b"GGML"), "not a GGUF file"),
    "version 99": (gguf(version=99), "version 99 is not supported"),
    "version 1": (gguf(version=1), "version 1 is not supported"),
    "version 0": (gguf(version=0), "version 0"),
    "truncated in the counts": (gguf()[:12], "are left in the file"),
    "kv count 2^62": (gguf(n_kv=1 << 62), "cannot fit"),
    "tensor count 2^62": (gguf(n_tensors=1 << 62), "cannot fit"),
    "key length 2^62": (gguf(kvs=[s("k", 1 << 62) + b"\0" * 16]), "key"),
    "string value length 2^62": (gguf(kvs=[s("general.name") + struct.pack("<I", STR) + s(b"x", 1 << 62)]),
                                 "are left in the file"),
    "u8 array of 2^62": (gguf(kvs=BASE_KV + [kv("x.arr", ARR, struct.pack("<IQ", U8, 1 << 62))]), "cannot fit"),
    "string array of 2^60": (gguf(kvs=BASE_KV + [kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, 1 << 60))]),
                             "cannot fit"),
    "array nested 10 deep": (gguf(kvs=BASE_KV + [kv("x.arr", ARR, struct.pack("<IQ", ARR, 1) * 10
                                                     + struct.pack("<IQ", U8, 0))]), "nested too deeply"),
    "unknown value type": (gguf(kvs=BASE_KV + [kv("x.v", 77, b"\0" * 8)]), "unknown GGUF value type 77"),
    "duplicate key": (gguf(kvs=BASE_KV + [BASE_KV[1]]), "duplicate key"),
    "tensor with 99 dims": (gguf(tensors=[tinfo("t", [1] * 99)]), "99 dimensions"),
    "tensor dims claim 2^32": (gguf(tensors=[tinfo("t", [], n_dims=1 << 31)]), "dimensions"),
    "unknown tensor type": (gguf(tensors=[tinfo("t", [32, 32], ttype=999)]), "unknown type 999"),
    "row not a block multiple": (gguf(tensors=[tinfo("t", [33, 8], ttype=8)]), "not a multiple"),
    "duplicate tensor name": (gguf(tensors=[BASE_T[0], BASE_T[0]]), "duplicate tensor name"),
    "tensor data beyond the file": (gguf(tensors=[tinfo("t", [1 << 40, 1 << 20])]), "lies outside the file"),
    "tensor offset unaligned": (gguf(tensors=[tinfo("t", [8], offset=3)]), "alignment"),
    "alignment not a power of two": (gguf(kvs=BASE_KV + [kv("general.alignment", U32, struct.pack("<I", 3))]),
                                     "not a power of two"),
    "truncated tensor data": (gguf()[:-100], "lies outside the file"),
}


def _write(tmp_path, case) -> object:
    p = tmp_path / "bad.gguf"
    p.write_bytes(CASES[case][0])
    return p


@pytest.mark.parametrize("case", list(CASES))
def test_inspect(case, tmp_path):
    p = _write(tmp_path, case)
    check_case(["inspect", p], [tmp_path], CASES[case][1])


PLAN_SKIP = {"tensor data beyond the file", "tensor offset unaligned", "alignment not a power of two",
             "truncated tensor data"}        # the plan reads no tensor data: those files are fine for it


@pytest.mark.parametrize("case", [c for c in CASES if c not in PLAN_SKIP])
def test_plan(case, tmp_path):
    p = _write(tmp_path, case)
    check_case(["plan", p, "-t", "Q4_K_M"], [tmp_path], CASES[case][1])


@pytest.mark.parametrize("case", ["version 99", "u8 array of 2^62", "tensor data beyond the file",
                                  "unknown tensor type", "duplicate key", "truncated tensor data"])
def test_imatrix(case, tmp_path):
    p = _write(tmp_path, case)
    m = model_copy(tmp_path / "m")
    out = tmp_path / "o"
    out.mkdir()
    check_case(["convert", m, "-o", out / "x.gguf", "-t", "Q4_K_M", "--imatrix", p], [out, m, tmp_path],
               CASES[case][1])


def test_plan_gguf_hparams_of_wrong_type(tmp_path):
    for extra, want in ((kv("llama.block_count", STR, s("8")), "not a plausible count"),
                        (kv("llama.block_count", U64, struct.pack("<Q", 10 ** 12)), "not a plausible count"),
                        (kv("llama.attention.head_count", F32, struct.pack("<f", 4.0)), "not a plausible count")):
        p = tmp_path / "bad.gguf"
        p.write_bytes(gguf(kvs=[BASE_KV[0], extra]))
        check_case(["plan", p, "-t", "Q4_K_M"], [tmp_path], want)


def test_inspect_fifo_and_directory(tmp_path):
    os.mkfifo(tmp_path / "pipe.gguf")
    check_case(["inspect", tmp_path / "pipe.gguf"], [tmp_path], "not a regular file")
    (tmp_path / "d.gguf").mkdir()
    check_case(["inspect", tmp_path / "d.gguf"], [tmp_path], "is a directory", rc=2)


MEMORY_CASES = ["kv count 2^62", "tensor count 2^62", "key length 2^62", "string value length 2^62",
                "u8 array of 2^62", "string array of 2^60", "tensor data beyond the file"]


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_memory_bound(case, tmp_path):
    """A fresh interpreter per case; its own peak RSS through os.wait4 (resource.struct_rusage) in a
    small launcher (hostile.run_measured), so what pytest holds does not count."""
    p = _write(tmp_path, case)
    for args in (["inspect", p], ["plan", p, "-t", "Q4_K_M"])[: 1 if case in PLAN_SKIP else 2]:
        r = check_case(args, [tmp_path], CASES[case][1], runner=run_measured)
        assert 0 < r.maxrss_kib < MEMORY_BOUND_KIB, (args[0], r.maxrss_kib)
