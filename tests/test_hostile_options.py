"""Bad option values and option files (--map, --imatrix, --text, sizes): one line, the right exit
code (2 for click's usage errors, 1 otherwise), nothing written, no process left."""
from __future__ import annotations

import os
import struct

import pytest

from hostile import TINY, check_case


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "o"
    d.mkdir()
    return d


USAGE = {
    "--split-max-size nan": (["--split-max-size", "nan"], "is not a size"),
    "--split-max-size inf": (["--split-max-size", "inf"], "is not a size"),
    "--split-max-size -1": (["--split-max-size", "-1"], "at least one byte"),
    "--split-max-size 0": (["--split-max-size", "0"], "at least one byte"),
    "--split-max-size 1e30": (["--split-max-size", "1e30G"], "is not a size"),
    "--split-max-size words": (["--split-max-size", "big"], "is not a size"),
    "--calib-cache nan": (["--calib-cache", "nan"], "is not a size"),
    "--split-max-tensors 0": (["--split-max-tensors", "0"], "--split-max-tensors"),
    "--jobs 0": (["-j", "0"], "--jobs"),
    "--jobs abc": (["-j", "abc"], "--jobs"),
    "--method nope": (["--method", "nope"], "--method"),
    "--ctx 1": (["--ctx", "1"], "--ctx"),
    "unknown option": (["--frobnicate"], "No such option"),
    "--imatrix a directory": (["--imatrix", "."], "is a directory"),
    "--validate without text": (["--validate"], "--validate needs --text"),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors_are_one_line(case, out, monkeypatch):
    monkeypatch.delenv("GGUFQ_EVAL_TEXT", raising=False)
    args, want = USAGE[case]
    check_case(["convert", TINY, "-o", out / "x.gguf", *args], [out], want, rc=2)


def _map(tmp_path, text: str | bytes):
    p = tmp_path / "map.toml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


MAPS = {
    "layer range 0-99999999999": ('[[rule]]\npattern = "blk.*"\nlayers = "0-99999999999"\ntype = "Q8_0"\n',
                                  "beyond any model"),
    "layer 2^40": ('[[rule]]\npattern = "blk.*"\nlayers = [1099511627776]\ntype = "Q8_0"\n', "bad layers"),
    "nested 100000 deep": ("a = " + "[" * 100000 + "]" * 100000 + "\n", "TOML"),
    "not UTF-8": (b'[[rule]]\npattern = "\xff"\n', "not UTF-8"),
    "not TOML": ("[[rule\n", "TOML syntax error"),
    "unknown key": ('[[rule]]\npattern = "x"\ntype = "Q8_0"\nwhat = 1\n', "unknown key"),
    "type a number": ('[[rule]]\npattern = "x"\ntype = 8\n', "unknown type"),
    "pattern a table": ('[[rule]]\ntype = "Q8_0"\n[rule.pattern]\na = 1\n', "pattern"),
    "layers a float": ('[[rule]]\npattern = "blk.*"\nlayers = 1.5\ntype = "Q8_0"\n', "bad layers"),
}


@pytest.mark.parametrize("case", list(MAPS))
def test_bad_map(case, out, tmp_path):
    p = _map(tmp_path, MAPS[case][0])
    check_case(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "--map", p], [out], MAPS[case][1])
    check_case(["plan", TINY, "-t", "Q4_K_M", "--map", p], [out], MAPS[case][1])


def test_map_fifo(out, tmp_path):
    os.mkfifo(tmp_path / "map.toml")
    check_case(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "--map", tmp_path / "map.toml"], [out], "FIFO")


def _legacy(entries, tail=b"") -> bytes:
    b = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        nb = name.encode()
        b += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, len(vals)) + struct.pack(f"<{len(vals)}f", *vals)
    return b + tail


IMATRIX = {
    "random bytes": (os.urandom(64) + b"\x7f" * 8, ""),
    "empty": (b"", "truncated imatrix file"),
    "entry count 2^31-1": (struct.pack("<i", 2 ** 31 - 1), "not an imatrix file"),
    "entry value count beyond file": (struct.pack("<i", 1) + struct.pack("<i", 1) + b"a" + struct.pack("<ii", 1, 2 ** 30),
                                      "truncated"),
    "negative call count": (_legacy([("blk.0.attn_q.weight", -1, [1.0] * 256)]), "negative call count"),
    "NaN values": (_legacy([("blk.0.attn_q.weight", 1, [float("nan")] * 256)]), "non-finite"),
    "wrong size for the tensor": (_legacy([("blk.0.attn_q.weight", 1, [1.0] * 7)]), "wrong model"),
    "name length 2^30": (struct.pack("<i", 1) + struct.pack("<i", 2 ** 30), "corrupt imatrix entry name"),
}


@pytest.mark.parametrize("case", list(IMATRIX))
def test_bad_imatrix(case, out, tmp_path):
    p = tmp_path / "imatrix.dat"
    p.write_bytes(IMATRIX[case][0])
    check_case(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "--imatrix", p], [out], IMATRIX[case][1])


def test_imatrix_fifo(out, tmp_path):
    os.mkfifo(tmp_path / "imatrix.dat")
    check_case(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "--imatrix", tmp_path / "imatrix.dat"],
               [out], "FIFO")


def test_plan_without_type(tmp_path):
    check_case(["plan", TINY], [tmp_path], "give --type")
