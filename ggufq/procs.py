"""Worker processes that never outlive ggufq, and the signals that end a run.

* :func:`die_with_parent` -- call it first thing in every worker process (it is the
  ``initializer`` of :class:`WorkerPool`; other worker kinds, e.g. calibration workers,
  call it themselves). On Linux the kernel sends the worker SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls ``getppid()`` and exits
  the worker within :data:`WATCH_INTERVAL` seconds. It also makes the worker ignore
  SIGINT, SIGTERM and SIGHUP: a terminal's Ctrl-C or hang-up (or ``kill -- -PGID``)
  reaches the whole process group, and only the parent decides what happens (it kills
  its workers), so a worker never dies first and never prints a traceback.
* :class:`WorkerPool` -- a ``ProcessPoolExecutor`` whose ``close()`` on an error or
  interrupt path kills and reaps its workers at once (``shutdown(wait=False)`` alone
  leaves them running and can hang the interpreter's exit on the pool's threads).
* :func:`install_handlers` -- SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in
  the main process once, so ``finally`` blocks remove temporary output; later signals
  are remembered but do not interrupt the cleanup. Exit code 128 + signal number
  (130 / 143 / 129), as shells report it.
* :func:`finished` -- the output is in place: later signals change nothing (a Ctrl-C
  between the rename and the summary line must not report a written file as interrupted).
* :func:`deferred` -- a block in which a signal is only recorded, and raised when the
  block ends: around forks (at-fork hooks hold locks; an exception raised inside one is
  swallowed and leaves the lock taken, a hang later), pool shutdown, renames into place
  and cleanup. :func:`check` re-raises a signal that library code swallowed
  ("Exception ignored in ..."); long loops call it at safe points.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Optional


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask): the default of ``-j`` and eval's threads."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover  -- not Linux
        return max(1, os.cpu_count() or 1)

WATCH_INTERVAL = 0.25
PR_SET_PDEATHSIG = 1
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)

_main_pid: Optional[int] = None
_caught: list[int] = []
_state = {"defer": 0, "delivered": False, "done": False}


class Interrupted(BaseException):
    """A signal asked ggufq to stop (a BaseException, so ``except Exception`` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def message(self) -> str:
        if self.signum == signal.SIGINT:
            return "interrupted"
        return f"stopped by {signal.Signals(self.signum).name}"


def _pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


PARENT_ENV = "GGUFQ_PARENT_PID"      # how a helper started by spawn_helper knows its parent


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """Make this (worker) process die with its parent and leave SIGINT/SIGTERM/SIGHUP to the parent.

    Call it first in a worker. ``parent_pid`` is the parent's pid as the parent saw it
    (default: ``os.getppid()`` now); if the parent is already gone the worker exits at once.
    """
    if parent_pid is None:
        parent_pid = int(os.environ.get(PARENT_ENV) or 0) or os.getppid()
    parent = parent_pid
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if not _pdeathsig(signal.SIGKILL):
        def watch() -> None:
            import time
            while os.getppid() == parent:
                time.sleep(WATCH_INTERVAL)
            os._exit(1)
        threading.Thread(target=watch, name="ggufq-parent-watch", daemon=True).start()
    if os.getppid() != parent:     # the parent died before prctl took effect
        os._exit(1)


def spawn_helper(args: list, env: dict, **kw):
    """Start a helper process (the llama-cpp-python workers) that calls :func:`die_with_parent`.

    It runs in a process group of its own: a terminal's Ctrl-C or hang-up (sent to the foreground
    group) reaches only ggufq, which kills it -- never the helper in the middle of its imports,
    before it could ignore them. It is told ggufq's pid, so it dies with it even if ggufq is gone
    before it gets that far. Start it inside :class:`deferred`."""
    import subprocess
    env = dict(env)
    env[PARENT_ENV] = str(os.getpid())
    return subprocess.Popen(args, env=env, process_group=0, **kw)


def _handler(signum, frame) -> None:
    if os.getpid() != _main_pid:
        # a forked child that has not yet run die_with_parent: never run the parent's cleanup
        # here; the parent, which got the same signal, kills it
        return
    _caught.append(signum)
    if len(_caught) == 1 and not _state["defer"] and not _state["done"]:
        raise Interrupted(signum)
    # deferred, or a second signal while cleaning up: remembered, the work or cleanup goes on


class deferred:
    """``with deferred():`` -- signals inside the block are raised when it ends (not inside it).

    ``raise_at_exit=False`` for cleanup in ``finally`` blocks (an Interrupted may already be on
    its way out): the signal stays recorded for :func:`check`."""

    def __init__(self, raise_at_exit: bool = True):
        self.raise_at_exit = raise_at_exit

    def __enter__(self):
        _state["defer"] += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        _state["defer"] -= 1
        if self.raise_at_exit and exc_type is None and not _state["defer"]:
            check()
        return False


def check() -> None:
    """Raise :class:`Interrupted` if a signal arrived that has not ended the run yet (deferred,
    or swallowed by library code); a no-op otherwise. Cheap: call it in long loops."""
    if _caught and not _state["delivered"] and not _state["defer"] and not _state["done"] \
            and os.getpid() == _main_pid:
        _state["delivered"] = True
        raise Interrupted(_caught[0])


def pending() -> bool:
    """A signal arrived that has not ended the run yet."""
    return bool(_caught) and not _state["delivered"]


def finished() -> None:
    """The run's output is in place: a signal from now on is recorded and changes nothing (the
    summary line is still printed, exit 0). Call it where the output was committed, inside
    :class:`deferred`, after checking :func:`pending`."""
    _state["done"] = True


def delivered() -> None:
    """The run is ending because of the signal: :func:`check` stays quiet from now on."""
    _state["delivered"] = True


def install_handlers() -> None:
    """Route SIGINT/SIGTERM/SIGHUP of this (main) process to :class:`Interrupted`."""
    global _main_pid
    _main_pid = os.getpid()
    _caught.clear()
    _state.update(defer=0, delivered=False, done=False)
    for s in SIGNALS:
        signal.signal(s, _handler)


class LimitExceeded(Exception):
    """:func:`run_limited`'s function ran out of time or memory, or its result was too large."""


def _vm_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_limited(fn, args=(), *, timeout: float, max_memory: int, max_output: int) -> bytes:
    """``fn(*args) -> bytes`` run in a forked child with a wall-clock ``timeout``, ``max_memory``
    bytes of address space beyond what the parent already maps, and at most ``max_output``
    bytes of result; :class:`LimitExceeded` otherwise. The child dies with the parent.
    Without ``fork`` (not POSIX) it runs in-process, unlimited.

    Long because fork, rlimits, the result pipe and the reaping of the child belong to one try/finally."""
    if not hasattr(os, "fork"):
        return fn(*args)
    import resource
    import select
    import time
    parent = os.getpid()
    base = _vm_bytes()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns
        code = 0
        try:
            os.close(r)
            die_with_parent(parent)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(timeout) + 2)         # the kernel ends it even if the parent cannot
            if base:
                resource.setrlimit(resource.RLIMIT_AS, (base + max_memory, base + max_memory))
            out = fn(*args)
            view = memoryview(out)[: max_output + 1]
            while view:
                k = os.write(w, view)
                view = view[k:]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks, size, deadline = [], 0, time.monotonic() + timeout
    done = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LimitExceeded(f"took longer than {timeout:g} s")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            b = os.read(r, 1 << 16)
            if not b:
                done = True
                break
            chunks.append(b)
            size += len(b)
            if size > max_output:
                raise LimitExceeded(f"gave more than {max_output} bytes")
    finally:
        os.close(r)
        if not done:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise LimitExceeded(f"ran out of memory (more than {max_memory >> 20} MiB) or failed")
    return b"".join(chunks)


class WorkerPool(ProcessPoolExecutor):
    """``ProcessPoolExecutor`` whose workers die with the parent, and whose
    ``close(ok=False)`` kills and reaps them instead of waiting for queued work."""

    def __init__(self, max_workers: int, mp_context=None, initializer=None, initargs=()):
        self._user_init = (initializer, initargs)
        super().__init__(max_workers=max_workers, mp_context=mp_context or mp.get_context(),
                         initializer=_init_worker, initargs=(os.getpid(), initializer, initargs))

    def submit(self, *args, **kwargs):
        with deferred():                 # the first submit forks the workers
            return super().submit(*args, **kwargs)

    def start(self) -> None:
        """Start the workers now (with ``fork``, all of them at once) and wait until one has run: a
        fork made later, while another thread of this process is inside a BLAS call (a Hessian
        factored ahead), copies OpenBLAS's held server lock into the child, whose first BLAS call
        then waits for it forever."""
        self.submit(_noop).result()

    def close(self, ok: bool = True) -> None:
        with deferred(raise_at_exit=False):
            self._close(ok)

    def _close(self, ok: bool) -> None:
        if ok:
            self.shutdown(wait=True)
            return
        procs = list((getattr(self, "_processes", None) or {}).values())
        t = getattr(self, "_executor_manager_thread", None)     # shutdown() forgets these two
        results = getattr(self, "_result_queue", None)
        for p in procs:
            try:
                p.kill()
            except (OSError, AttributeError, ValueError):
                pass
        self.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            try:
                p.join(2.0)
            except (OSError, AssertionError, ValueError):
                pass
        # The executor's manager thread sees its workers gone and ends; wait for it, or interpreter
        # shutdown blocks on it. A worker killed while it wrote a result left half a message in the
        # result pipe: the manager thread waits in recv() for the rest, forever, since this process
        # holds the pipe's write end too. With that end closed (every worker is dead) it reads EOF,
        # takes the pool as broken and ends.
        if t is not None and t is not threading.current_thread():
            t.join(0.5)
            if t.is_alive():
                writer = getattr(results, "_writer", None)
                try:
                    if writer is not None:
                        writer.close()
                except OSError:
                    pass
                t.join(2.0)

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)
        return False


def _noop() -> None:
    return None


def _init_worker(parent_pid: int, initializer, initargs) -> None:
    die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)
