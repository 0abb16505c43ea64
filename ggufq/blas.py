"""The thread count of NumPy's BLAS, set at run time (what threadpoolctl does, for OpenBLAS only).

Encoder processes run side by side, one per core (``-j``): each one's BLAS spawning a thread per
core as well over-subscribes the machine, and OpenBLAS's idle threads spin. On a loaded 2-core
machine a 576x576 Hessian factorization cost 0.44 CPU-s with the default threads against 0.036 s
with one. :func:`set_threads` finds the OpenBLAS that NumPy loaded (``scipy_openblas``/``openblas``
among the process's shared libraries) and calls its ``*_set_num_threads``; with another BLAS, or
where the libraries cannot be listed, it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import os

_NAMES = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
          "openblas_set_num_threads")


def _loaded_openblas() -> list[str]:
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return []
    return sorted(p for p in libs if os.path.isabs(p))


def _fns(kind: str) -> list:
    import numpy  # noqa: F401  (loads the BLAS)
    out = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _NAMES:
            fn = getattr(lib, name.replace("set_", kind + "_"), None)
            if fn is not None:
                out.append(fn)
                break
    return out


def set_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS to ``n`` threads; False when no OpenBLAS was found."""
    fns = _fns("set")
    for fn in fns:
        fn.argtypes = [ctypes.c_int]
        fn(int(n))
    return bool(fns)


def get_threads() -> int:
    """NumPy's OpenBLAS thread count (0 when no OpenBLAS was found)."""
    for fn in _fns("get"):
        fn.restype = ctypes.c_int
        return int(fn())
    return 0


@contextlib.contextmanager
def threads(n: int):
    """NumPy's OpenBLAS on ``n`` threads inside the block, the previous count after it."""
    before = get_threads()
    if before and before != n:
        set_threads(n)
    try:
        yield
    finally:
        if before and before != n:
            set_threads(before)


def one_thread() -> None:
    """Worker initializer: one BLAS thread (the processes are the parallelism)."""
    set_threads(1)
