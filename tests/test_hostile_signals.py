"""Signals during a conversion with encoder workers: SIGINT to the process group (a terminal's
Ctrl-C), SIGTERM and SIGHUP end with the temporary output removed, the workers gone, one line
and exit 128 + signal; a SIGKILLed parent leaves no worker behind for more than a second.
Each is repeated at random moments to catch races."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

from hostile import TINY, finish, no_process_left, run_exec, spawn_forked

REPEAT = 20
WANT = {signal.SIGINT: (130, "ggufq: interrupted"), signal.SIGTERM: (143, "ggufq: stopped by SIGTERM"),
        signal.SIGHUP: (129, "ggufq: stopped by SIGHUP")}


def _wait_for_tmp(out, pid, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.listdir(out):
            return True
        if os.waitpid(pid, os.WNOHANG)[0]:
            raise AssertionError("ggufq ended before writing")
        time.sleep(0.002)
    return False


def _one(tmp_path, k, sig, group: bool, rng, extra=()):
    out = tmp_path / f"o{k}"
    out.mkdir()
    pid, o, e = spawn_forked(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "-j", "2", *extra],
                             new_group=True)
    assert _wait_for_tmp(out, pid)
    time.sleep(rng.uniform(0, 0.5))
    (os.killpg if group else os.kill)(pid, sig)
    r = finish(pid, o, e, timeout=60)
    assert "Traceback" not in r.err, r.err
    if r.rc == 0:                    # finished before the signal: a complete output, nothing else
        assert sorted(os.listdir(out)) == ["x.gguf"]
        return False
    assert (r.rc, r.lines) == (WANT[sig][0], [WANT[sig][1]]), (r.rc, r.err)
    assert os.listdir(out) == [], os.listdir(out)
    no_process_left(grace=1.0)
    return True


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGINT, False),
                                       (signal.SIGTERM, False), (signal.SIGHUP, True)],
                         ids=["SIGINT-group", "SIGINT", "SIGTERM", "SIGHUP-group"])
def test_signal_during_encoding(sig, group, tmp_path):
    rng = random.Random(int(sig) * 7 + group)
    hit = sum(_one(tmp_path, k, sig, group, rng) for k in range(REPEAT))
    assert hit >= REPEAT // 2, f"only {hit} of {REPEAT} signals arrived during the conversion"


def test_sigkill_of_the_parent_takes_the_workers(tmp_path):
    rng = random.Random(5)
    for k in range(REPEAT // 2):
        out = tmp_path / f"o{k}"
        out.mkdir()
        pid, o, e = spawn_forked(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "-j", "2"], new_group=True)
        assert _wait_for_tmp(out, pid)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(pid, signal.SIGKILL)
        finish(pid, o, e, timeout=30)
        no_process_left(grace=1.0)      # workers: PR_SET_PDEATHSIG (or the parent watch) within a second


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def test_sigint_while_starting_a_fresh_interpreter(tmp_path):
    """Ctrl-C at any moment from the first line of ggufq's code on (the interpreter's own start-up
    before it is not ggufq's), imports included: one line, 130, nothing left. That moment is when
    the process first catches SIGTERM (ggufq/_early.py; Python itself catches only SIGINT)."""
    rng = random.Random(11)
    for k in range(12):
        out = tmp_path / f"o{k}"
        out.mkdir()
        p, o, e = run_exec("convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "-j", "2", timeout=None,
                           new_group=True)
        deadline = time.monotonic() + 30
        while not _catches(p.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 1.5))
        os.killpg(p.pid, signal.SIGINT)
        r = finish(p.pid, o, e, timeout=60)
        p.returncode = r.rc
        assert "Traceback" not in r.err, r.err
        if r.rc == 0:
            continue
        assert (r.rc, r.lines) == (130, ["ggufq: interrupted"]), (r.rc, r.err)
        assert os.listdir(out) == []
        no_process_left(grace=1.0)


def test_second_signal_during_cleanup_changes_nothing(tmp_path):
    rng = random.Random(3)
    for k in range(REPEAT // 2):
        out = tmp_path / f"o{k}"
        out.mkdir()
        pid, o, e = spawn_forked(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "-j", "2"], new_group=True)
        assert _wait_for_tmp(out, pid)
        time.sleep(rng.uniform(0, 0.4))
        os.killpg(pid, signal.SIGINT)
        time.sleep(rng.uniform(0, 0.01))
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        r = finish(pid, o, e, timeout=60)
        assert "Traceback" not in r.err, r.err
        if r.rc == 0:
            continue
        assert (r.rc, r.lines) == (130, ["ggufq: interrupted"]), (r.rc, r.err)
        assert os.listdir(out) == []
        no_process_left(grace=1.0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT-group", "SIGTERM"])
def test_signal_during_self_calibration(sig, tmp_path):
    """--method hqq generates and measures its own text before the writer starts: a signal there
    ends the run the same way (nothing was written yet, nothing is left). 8x512 tokens take
    llama.cpp several seconds here, so the signal lands while they are written."""
    rng = random.Random(int(sig))
    for k in range(4):
        out = tmp_path / f"o{k}"
        out.mkdir()
        pid, o, e = spawn_forked(["convert", TINY, "-o", out / "x.gguf", "-t", "Q4_K_M", "--method", "hqq",
                                  "--calib-tokens", "4096", "-j", "2"], new_group=True)
        time.sleep(rng.uniform(0.3, 2.5))
        (os.killpg if sig == signal.SIGINT else os.kill)(pid, sig)
        r = finish(pid, o, e, timeout=60)
        assert "Traceback" not in r.err, r.err
        assert (r.rc, r.lines) == (WANT[sig][0], [WANT[sig][1]]), (r.rc, r.err)
        assert os.listdir(out) == []
        no_process_left(grace=1.0)
