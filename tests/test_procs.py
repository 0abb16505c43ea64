"""ggufq.procs.WorkerPool on its error path: killed workers never leave a thread that blocks the
interpreter's exit."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os, signal, struct, sys, time
    from ggufq.procs import WorkerPool

    def half_a_result():
        # the worker dies in the middle of sending its result: a header for 1 MiB, then 10 bytes
        f = sys._getframe()
        while "result_queue" not in f.f_locals:
            f = f.f_back
        fd = f.f_locals["result_queue"]._writer.fileno()
        os.write(fd, struct.pack("!i", 1 << 20) + b"0123456789")
        os.kill(os.getpid(), signal.SIGKILL)

    pool = WorkerPool(1)
    fut = pool.submit(half_a_result)
    time.sleep(1.0)                           # the manager thread now waits for the rest
    t = pool._executor_manager_thread
    pool.close(ok=False)
    print("manager alive:", t is not None and t.is_alive(), flush=True)
''')


def test_a_worker_killed_mid_result_does_not_hang_the_exit(tmp_path):
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "manager alive: False" in p.stdout, p.stdout + p.stderr
