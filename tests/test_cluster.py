"""`ggufq convert --executor ray://ADDRESS` on a real Ray cluster of this machine (ggufq.cluster).

One module-scoped cluster (Ray's own ``cluster_utils.Cluster``: a head and two worker nodes, each a
raylet of one CPU, on this machine's address; Ray rewrites 127.0.0.1 to it for a driver) serves every
test; it is shut down at the end even when a test fails, and the last test checks with ``ps`` that no
process of it survived. Conversions run through the real CLI in subprocesses (the driver) and are
compared byte for byte with the local executor's file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, interrupt_when, journaled

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ggufq[ray]'); the cluster tests need it")

STARTUP_S = 120
TASK = "ray::encode_task"


def _ray_pids() -> set[int]:
    """Processes of Ray's binaries or workers (their command lines name ray's package or ``ray::``)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if args.startswith("ray::") or "/site-packages/ray/" in args:
            pids.add(int(pid))
    return pids


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    before = _ray_pids()
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_before if env_before else "")   # the nodes' workers
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, include_dashboard=False, object_store_memory=80 << 20))
        for _ in range(2):
            c.add_node(num_cpus=1, object_store_memory=80 << 20)
        c.wait_for_nodes(STARTUP_S)
        c.pids_before = before
        yield c
    finally:
        if c is not None:
            c.shutdown()
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before


def _cli(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "ggufq", "convert", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run(*args) -> tuple[int, str]:
    p = _cli(*args)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def _local(model: Path, out: Path, ftype: str) -> bytes:
    rc, err = _run(model, "-t", ftype, "-o", out, "-j", "1", "-q")
    assert rc == 0, err
    return out.read_bytes()


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    from tools.synthetic_moe import make_moe
    return make_moe(tmp_path_factory.mktemp("moe") / "m", "qwen3moe", hidden=128, layers=2, ff=64, experts=8,
                    shared_ff=0)


def test_cluster_bytes_identical(cluster, tmp_path):
    """tinyllama on the cluster: the local run's bytes (the synthetic MoE is compared by the tests below)."""
    rc, err = _run(TINY, "-t", "Q4_K_M", "-o", tmp_path / "ray.gguf", "--executor", f"ray://{cluster.address}")
    assert rc == 0, err
    assert "encoded on the Ray cluster" in err and "3 nodes, 3 CPUs" in err
    assert (tmp_path / "ray.gguf").read_bytes() == _local(TINY, tmp_path / "local.gguf", "Q4_K_M")


def _busy_task(timeout: float) -> int:
    """The pid of a Ray worker while it runs an encoding task (Ray titles it ``ray::encode_task``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if args.startswith(TASK):
                return int(pid)
        time.sleep(0.01)
    return 0


def test_cluster_worker_killed_mid_run(cluster, moe, tmp_path):
    """A worker SIGKILLed while it encodes: Ray runs its task again, the file is the same."""
    p = _cli(moe, "-t", "Q4_K_M", "-o", tmp_path / "ray.gguf", "--executor", f"ray://{cluster.address}")
    try:
        victim = _busy_task(120)
        assert victim, "no encoding task seen running"
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert (tmp_path / "ray.gguf").read_bytes() == _local(moe, tmp_path / "local.gguf", "Q4_K_M")


def test_cluster_interrupt_leaves_nothing(cluster, moe, tmp_path):
    """Ctrl-C while tasks run: exit 130, no output, no temporary folder, no task left running."""
    p = _cli(moe, "-t", "Q4_K_M", "-o", tmp_path / "out.gguf", "--executor", f"ray://{cluster.address}")
    seen = []
    err = interrupt_when(p, lambda: seen.append(_busy_task(0.2)) or seen[-1])
    assert seen and seen[-1], "no encoding task seen running"
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ggufq: interrupted"
    assert list(tmp_path.iterdir()) == []
    time.sleep(2)
    assert not _busy_task(0.5), "an encoding task still runs after the driver was interrupted"


def test_cluster_resume(cluster, moe, tmp_path):
    """--resume over the cluster: interrupted after a few tensors, continued, the local run's bytes."""
    out = tmp_path / "m.gguf"
    addr = f"ray://{cluster.address}"
    p = _cli(moe, "-t", "Q4_K_M", "-o", out, "--executor", addr, "--resume")
    err = interrupt_when(p, journaled(out, 3))
    assert p.returncode == 130, err
    rc, err = _run(moe, "-t", "Q4_K_M", "-o", out, "--executor", addr, "--resume")
    assert rc == 0, err
    assert "tensors verified (sha256) and kept" in err
    assert out.read_bytes() == _local(moe, tmp_path / "local.gguf", "Q4_K_M")


def test_cluster_unreachable(tmp_path):
    """No cluster at the address: one line, exit 1, nothing written (needs no running cluster)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]           # a port nobody listens on once closed
    t0 = time.monotonic()
    rc, err = _run(TINY, "-t", "Q8_0", "-o", tmp_path / "out.gguf", "--executor", f"ray://127.0.0.1:{port}")
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ggufq: error: cannot reach the Ray cluster at 127.0.0.1:{port}"), err
    assert list(tmp_path.iterdir()) == []
    assert time.monotonic() - t0 < 60


def test_probe_mismatches(tmp_path):
    """What the driver says about a node that runs another ggufq, other code, cannot read the model or
    reads other files: one line naming the node (the probe itself runs on every node in the tests above;
    on one machine Ray puts the driver's sys.path first in every worker, so no node here can differ)."""
    from ggufq import GgufqError, cluster as gc
    mine = gc.probe(str(TINY))
    assert set(mine) == {"host", "version", "code", "model"}
    absent = gc.probe(str(tmp_path / "absent"))
    assert "model" not in absent and "\n" not in absent["error"] and "absent" in absent["error"]
    cases = [({**mine, "version": "9.9.9"}, "runs ggufq 9.9.9, this machine"),
             ({**mine, "code": "0" * 16}, "runs other ggufq code"),
             (absent, "cannot read the model at"),
             ({**mine, "model": "0" * 16}, "sees another model at")]
    gc.check_probe("n1", mine, mine, str(TINY))
    for info, want in cases:
        with pytest.raises(GgufqError, match=want) as e:
            gc.check_probe("n1", info, mine, str(TINY))
        assert str(e.value).startswith("Ray node n1 ") and "\n" not in str(e.value)


def test_hessian_goes_through_the_object_store(tmp_path):
    """A self-calibrated matrix's Hessian is put in the object store whole: the spill file (a path into
    the driver's temporary folder) would not exist on another node."""
    import pickle
    import numpy as np
    from ggufq.cluster import for_object_store
    from ggufq.quant.gptq import Hessian
    m = np.cov(np.random.default_rng(0).standard_normal((64, 512))) + np.eye(64)
    h = Hessian.from_moment(m)
    h.spill = str(tmp_path)
    sent = pickle.loads(pickle.dumps(for_object_store(h)))
    assert not list(tmp_path.iterdir())                       # nothing written to the local folder
    assert not isinstance(sent.u, np.memmap) and np.array_equal(sent.u, h.u)
    assert for_object_store(h.diag) is h.diag


def test_cluster_calibrated_identical(cluster, tmp_path):
    """--method calibrated on the cluster (Hessians through the object store) gives the local run's bytes."""
    args = ("-t", "Q4_K_M", "--method", "calibrated", "--calib-tokens", "256", "-q")
    rc, err = _run(TINY, *args, "-o", tmp_path / "ray.gguf", "--executor", f"ray://{cluster.address}")
    assert rc == 0, err
    rc, err = _run(TINY, *args, "-o", tmp_path / "local.gguf", "-j", "2")
    assert rc == 0, err
    assert (tmp_path / "ray.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def test_no_ray_process_survives(cluster, request):
    """Runs last: shut the module's cluster down and check that none of its processes is left."""
    cluster.shutdown()
    end = time.monotonic() + 30
    while time.monotonic() < end and _ray_pids() - cluster.pids_before:
        time.sleep(0.5)
    left = _ray_pids() - cluster.pids_before
    assert not left, f"Ray processes left after shutdown: {sorted(left)}"

