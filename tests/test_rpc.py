"""Self-calibration through llama.cpp's RPC backend (``--rpc``): a ``ggml-rpc-server`` on loopback
holds the offloaded layers, the moments are the local run's. Needs llama.cpp's libraries and
rpc-server built with ``-DGGML_RPC=ON`` (``tools/build_rpc.sh``); the one-line refusals run without."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import numpy as np
from pathlib import Path
import pytest

from tests.conftest import TINY, run_cli
from tools.common import LLAMA_RPC

pytest.importorskip("llama_cpp")

SERVER = LLAMA_RPC / "ggml-rpc-server"
HAVE_RPC = SERVER.is_file() and any(LLAMA_RPC.glob("libggml-rpc.*")) and any(LLAMA_RPC.glob("libllama.*"))
needs_rpc = pytest.mark.skipif(not HAVE_RPC, reason=f"no llama.cpp RPC build in {LLAMA_RPC} "
                                                    "(tools/build_rpc.sh, ~15-25 min on 2 cores)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_server():
    """``ggml-rpc-server`` on 127.0.0.1 (one thread), killed at the end."""
    port = _free_port()
    p = subprocess.Popen([str(SERVER), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert p.poll() is None and time.monotonic() < end, "ggml-rpc-server did not start"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def rpc_libs(monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(LLAMA_RPC))


@needs_rpc
def test_moments_through_rpc_equal_local(rpc_server, rpc_libs, tmp_path):
    """The same given tokens decoded with every layer on the rpc-server and on this process's CPU:
    the same E[x x^T] of every matrix (float tolerance)."""
    from ggufq import calib
    toks = np.random.default_rng(2).integers(3, 8192, (2, 48))
    toks[:, 0] = 1
    kw = dict(tokens=toks, jobs=1, progress=False, gpu_layers=-1)
    with calib.calibrate_folder(TINY, tmp_path, **kw) as here, \
            calib.calibrate_folder(TINY, tmp_path, rpc=[rpc_server], **kw) as there:
        names = list(here.index["weight_key"])
        assert len(names) > 40
        for name in names:
            a, b = here.moment(name), there.moment(name)
            assert np.allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(a).max()), name


@needs_rpc
def test_cli_rpc_imatrix_equals_local(rpc_server, rpc_libs, tmp_path):
    """`ggufq convert --rpc`: the saved imatrix (the moments' diagonals) is the local run's."""
    from ggufq import imatrix
    got = {}
    for tag, extra in (("local", ()), ("rpc", ("--rpc", rpc_server))):
        r = run_cli("convert", TINY, "-t", "F16", "--method", "calibrated", "--calib-tokens", "1024",
                    "-o", tmp_path / f"{tag}.gguf", "--save-imatrix", tmp_path / f"{tag}.imatrix.gguf",
                    "-j", "1", "-q", *extra)
        assert r.returncode == 0, r.stderr
        got[tag] = imatrix.load(tmp_path / f"{tag}.imatrix.gguf").entries
    assert got["local"].keys() == got["rpc"].keys() and len(got["local"]) > 40
    for k, v in got["local"].items():
        assert np.allclose(got["rpc"][k], v, rtol=1e-5), k


@needs_rpc
def test_rpc_server_unreachable_is_one_line(rpc_libs, tmp_path):
    port = _free_port()
    r = run_cli("convert", TINY, "-t", "F16", "--method", "calibrated", "--calib-tokens", "256",
                "--save-imatrix", tmp_path / "x.imatrix.gguf", "-o", tmp_path / "x.gguf", "--rpc", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"ggufq: error: --rpc 127.0.0.1:{port}: cannot connect (Connection "
                                             "refused); start `ggml-rpc-server -H HOST -p PORT` there "
                                             "(tools/build_rpc.sh builds it)"]
    assert os.listdir(tmp_path) == []


def test_rpc_without_rpc_libraries_is_one_line(tmp_path, monkeypatch):
    """llama-cpp-python's own (CPU) libraries have no RPC backend: one line before any byte is written."""
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)
    from ggufq import llamalib
    if any(Path(llamalib.lib_dir()).glob("libggml-rpc.*")):
        pytest.skip("the installed llama-cpp-python has the RPC backend")
    r = run_cli("convert", TINY, "-t", "F16", "--method", "calibrated", "--calib-tokens", "256",
                "--save-imatrix", tmp_path / "x.imatrix.gguf", "-o", tmp_path / "x.gguf", "--rpc", "127.0.0.1:50052")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "have no RPC backend (no libggml-rpc)" in lines[0], r.stderr
    assert os.listdir(tmp_path) == []


def test_rpc_without_calibration_is_refused(tmp_path):
    r = run_cli("convert", TINY, "-t", "Q8_0", "-o", tmp_path / "x.gguf", "--rpc", "127.0.0.1:50052")
    assert r.returncode == 1
    assert "--rpc is for self-calibration's forward pass" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []
