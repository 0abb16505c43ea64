"""Helpers for the tests/test_hostile_*.py files: malformed variants of the tinyllama fixture,
generated into tmp folders, and a runner that checks the bad-input contract of every case:
exit code, exactly one stderr line, no traceback, nothing new on disk, no process left.

``run_forked`` runs the real CLI (``ggufq.cli.main``) in a forked child of the test process
(imports already done: tens of milliseconds a case); ``run_exec`` starts a fresh interpreter
and measures the child's own peak RSS through ``os.wait4``. The test process makes itself a
child subreaper, so any worker the CLI leaves behind is re-parented to it and found.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tinyllama-spm-10m"
PR_SET_CHILD_SUBREAPER = 36

import ggufq.cli  # noqa: E402,F401  -- imported once here, so forked runs start at main()
import ggufq.convert  # noqa: E402,F401

try:
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
except (OSError, AttributeError):
    pass


@dataclass
class Run:
    rc: int
    out: str
    err: str
    maxrss_kib: int = 0
    pid: int = 0

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def model_copy(dst: Path) -> Path:
    """A private copy of tinyllama (shards hard-linked: replace a file, never write into it)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in TINY.iterdir():
        if f.suffix == ".safetensors":
            try:
                os.link(f, dst / f.name)
                continue
            except OSError:
                pass
        shutil.copy(f, dst / f.name)
    return dst


def replace(path: Path, data: bytes | str) -> None:
    """Write a new file at ``path`` (unlinking first, so a hard-linked fixture is never touched)."""
    if os.path.lexists(path):
        os.unlink(path)
    Path(path).write_bytes(data.encode() if isinstance(data, str) else data)


def edit_json(path: Path, fn) -> None:
    doc = json.loads(Path(path).read_text())
    res = fn(doc)
    doc = res if isinstance(res, dict) else doc
    replace(path, json.dumps(doc))


def st_parts(path: Path) -> tuple[int, dict, bytes]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def st_write(path: Path, header, body: bytes, raw_header: Optional[bytes] = None) -> None:
    head = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    replace(path, struct.pack("<Q", len(head)) + head + body)


def tree(*dirs: Path) -> set:
    """Every path under ``dirs`` (hidden temporaries included) with its size."""
    out = set()
    for d in dirs:
        for root, dnames, fnames in os.walk(d):
            for n in dnames + fnames:
                p = os.path.join(root, n)
                try:
                    out.add((p, os.lstat(p).st_size if n in fnames else -1))
                except OSError:
                    out.add((p, None))
    return out


def children() -> list[int]:
    """Live (non-zombie) processes whose parent is this test process."""
    me = str(os.getpid())
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.append(int(d))
    return found


def reap() -> None:
    """Collect zombies re-parented to us (a subreaper must wait for them)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def no_process_left(grace: float = 1.0) -> None:
    deadline = time.monotonic() + grace
    while True:
        reap()
        left = children()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not left, f"processes left behind: {left}"


def _child_main(args, cwd, out_fd, err_fd, new_group) -> None:
    code = 98
    try:
        if new_group:
            os.setpgid(0, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        sys.stdin = io.TextIOWrapper(io.FileIO(os.open(os.devnull, os.O_RDONLY), "r"))
        # as the `ggufq` console script starts: the early handlers first (a forked pytest has
        # ggufq.cli imported already, so its import-time hook does not run here). With the
        # default ones instead, the CLI puts them back when it ends, as it does for any
        # in-process caller, and a late SIGTERM then kills the finished child (-15)
        from ggufq._early import early_handlers
        early_handlers()
        if cwd:
            os.chdir(cwd)
        from ggufq.cli import main
        main([str(a) for a in args], prog_name="ggufq")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 99
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


def spawn_forked(args, cwd=None, new_group: bool = False):
    """(pid, stdout file, stderr file) of the CLI running in a forked child."""
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child_main(args, cwd, out.fileno(), err.fileno(), new_group)
    if new_group:
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
    return pid, out, err


def finish(pid: int, out, err, timeout: float = 120.0) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        got, status, ru = os.wait4(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGABRT)          # faulthandler (PYTHONFAULTHANDLER) dumps every thread
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            os.wait4(pid, 0)
            err.seek(0)
            raise AssertionError(f"ggufq hung (no exit within {timeout} s):\n" +
                                 err.read().decode("utf-8", "replace")[-6000:])
        time.sleep(0.005)
    rc = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    r = Run(rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"), ru.ru_maxrss, pid)
    out.close()
    err.close()
    return r


def run_forked(*args, cwd=None, timeout: float = 120.0) -> Run:
    return finish(*spawn_forked(args, cwd), timeout=timeout)


def run_exec(*args, cwd=None, timeout: float = 120.0, new_group: bool = False):
    """The CLI in a fresh interpreter; returns the Popen (for signal tests) if ``timeout`` is None."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONFAULTHANDLER="1")
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    p = subprocess.Popen([sys.executable, "-m", "ggufq", *map(str, args)], cwd=cwd, env=env, stdout=out,
                         stderr=err, stdin=subprocess.DEVNULL, start_new_session=new_group)
    if timeout is None:
        return p, out, err
    return finish(p.pid, out, err, timeout)


# A fresh, small launcher runs the CLI and reports the CLI's own peak RSS: Linux keeps a process's
# pre-exec RSS in its ru_maxrss, so a child forked straight from pytest (which grows past a GiB
# over the whole suite) would report pytest's size, not ggufq's.
_MEASURE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "ggufq", *sys.argv[1:]])
_, status, ru = os.wait4(pid, 0)
with open(os.environ["GGUFQ_TEST_RSS_FILE"], "w") as f:
    f.write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(*args, cwd=None, timeout: float = 120.0) -> Run:
    """As :func:`run_exec`, with ``maxrss_kib`` the CLI process's own peak RSS (see _MEASURE)."""
    with tempfile.TemporaryDirectory() as d:
        rss = Path(d) / "rss"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   GGUFQ_TEST_RSS_FILE=str(rss))
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        p = subprocess.Popen([sys.executable, "-c", _MEASURE, *map(str, args)], cwd=cwd, env=env, stdout=out,
                             stderr=err, stdin=subprocess.DEVNULL)
        r = finish(p.pid, out, err, timeout)
        return dataclasses.replace(r, maxrss_kib=int(rss.read_text()))


def expect_error(r: Run, *contains: str, rc: int = 1, prefix: str = "ggufq: error: ") -> str:
    """The bad-input contract for one finished run: ``rc``, one stderr line, no traceback."""
    assert "Traceback" not in r.err, r.err
    assert r.rc == rc, (r.rc, r.err)
    assert len(r.lines) == 1, r.err
    line = r.lines[0]
    assert line.startswith(prefix), line
    for c in contains:
        assert c in line, (c, line)
    return line


def check_case(args, watch, *contains: str, rc: int = 1, cwd=None, runner=run_forked,
               prefix: str = "ggufq: error: ", **kw) -> Run:
    """Run one malformed case and assert the whole contract, including nothing new under ``watch``."""
    before = tree(*watch)
    r = runner(*args, cwd=cwd, **kw)
    expect_error(r, *contains, rc=rc, prefix=prefix)
    assert tree(*watch) == before, f"files changed: {tree(*watch) ^ before}"
    no_process_left()
    return r
