"""The thread count of NumPy's BLAS, set at run time (what threadpoolctl does, for OpenBLAS only),
and the one LAPACK routine NumPy does not offer (a triangular inverse), from the same library.

Encoder processes run side by side, one per core (``-j``): each one's BLAS spawning a thread per
core as well over-subscribes the machine, and OpenBLAS's idle threads spin. On a loaded 2-core
machine a 576x576 Hessian factorization cost 0.44 CPU-s with the default threads against 0.036 s
with one. :func:`set_threads` finds the OpenBLAS that NumPy loaded (``scipy_openblas``/``openblas``
among the process's shared libraries) and calls its ``*_set_num_threads``; with another BLAS, or
where the libraries cannot be listed, it does nothing.

:func:`inv_lower` inverts a lower-triangular matrix with LAPACK's ``dtrtri`` from that OpenBLAS
(n^3/3 flops; ``numpy.linalg.inv``, the fallback where no ``LAPACKE_dtrtri`` is found, solves a
general system: 2n^3, 5x the CPU at n = 2048 and 4096 on one thread).
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


def _exported(names) -> list:
    """Per loaded OpenBLAS library, ``(function, name)`` for the first of ``names`` it exports."""
    import numpy  # noqa: F401  (loads the BLAS)
    out = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                out.append((fn, name))
                break
    return out


def _fns(kind: str) -> list:
    return [fn for fn, _ in _exported([n.replace("set_", kind + "_") for n in _NAMES])]


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


# LAPACKE_dtrtri under the names NumPy's OpenBLAS builds export (scipy-openblas64 of NumPy 2, the
# openblas64_ of NumPy 1.2x, a plain LP64 OpenBLAS); the 64_ ones take 64-bit integers
_TRTRI = (("scipy_LAPACKE_dtrtri64_", ctypes.c_int64), ("LAPACKE_dtrtri64_", ctypes.c_int64),
          ("scipy_LAPACKE_dtrtri", ctypes.c_int32), ("LAPACKE_dtrtri", ctypes.c_int32))
_trtri_fn: list = []


def _trtri():
    if not _trtri_fn:
        found = _exported([name for name, _ in _TRTRI])
        fn = None
        if found:
            fn, name = found[0]
            it = dict(_TRTRI)[name]
            fn.restype = it
            fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, it, ctypes.c_void_p, it]
        _trtri_fn.append(fn)
    return _trtri_fn[0]


def inv_lower(lo):
    """The inverse of the lower-triangular float64 matrix ``lo`` (its upper triangle is ignored), as
    a new C-contiguous lower-triangular array; ``numpy.linalg.inv`` where no LAPACK dtrtri is found."""
    import numpy as np
    fn = _trtri()
    if fn is not None:
        a = np.array(lo, np.float64, order="C")
        info = fn(101, b"L", b"N", a.shape[0], a.ctypes.data, a.shape[0])     # LAPACK_ROW_MAJOR
        if info == 0:
            return np.tril(a)
    return np.tril(np.linalg.inv(lo))
