"""Helpers shared by the block encoders: ggml's rounding, fp16 packing, byte transposes.

Importing this module also keeps freed memory in the process heap (see
:func:`keep_freed_memory`): the encoders allocate and free MiB-sized temporaries
at a high rate.
"""
from __future__ import annotations

import sys

import numpy as np


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve arrays below 32 MiB from the heap and keep up to 64 MiB freed.

    By default glibc maps each allocation above 128 KiB (threshold adjusted upwards as
    mapped chunks are freed) with mmap and hands freed memory back to the OS, so every
    temporary array of an encoder is page-faulted in anew: on a loaded VM that made
    encoders 1.5-4x slower (docs/SPEED.md). These are the values glibc's own dynamic
    threshold tends to anyway (its maximum is 32 MiB, trimming at twice that). Returns
    whether it applied (Linux with glibc); elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 << 20))


keep_freed_memory()

try:    # the clip ufunc itself: np.clip's Python wrapper costs ~3 us a call, more than clipping 16k floats
    from numpy._core.umath import clip as clip_ufunc
except ImportError:     # NumPy 1.x
    from numpy.core.umath import clip as clip_ufunc  # noqa: F401


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.round rounds halves to even)."""
    return np.copysign(np.floor(np.abs(x) + np.float32(0.5)), x)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (the 12582912.f trick): round half to even, as int32."""
    return np.rint(x).astype(np.int32)


def fp16_bytes(d: np.ndarray) -> np.ndarray:
    """float32 [n] -> uint8 [n, 2], little-endian fp16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.ascontiguousarray(d, dtype=np.float32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def fp16_round(d: np.ndarray) -> np.ndarray:
    """The float32 value an fp16 store and reload gives back (ggml reads scales back this way)."""
    return np.asarray(d, dtype=np.float32).astype(np.float16).astype(np.float32)


def transpose_u8(a: np.ndarray) -> np.ndarray:
    """``a.T`` as a new C-contiguous array, for uint8 ``a [r, n]`` with ``r % 4 == 0``.

    NumPy moves one byte per element in a transposed copy; packing four rows into
    uint32 first moves four (about 4x faster).
    """
    r, n = a.shape
    if r % 4:
        return np.ascontiguousarray(a.T)
    a4 = a.reshape(r // 4, 4, n)
    u = a4[:, 0].astype(np.uint32)
    for j in (1, 2, 3):
        u |= a4[:, j].astype(np.uint32) << np.uint32(8 * j)
    return np.ascontiguousarray(u.T).view("<u1").reshape(n, r) if np.little_endian else np.ascontiguousarray(a.T)


def nonzero2(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 2-D array (row-major order), through ``flatnonzero``: NumPy's 2-D nonzero
    runs ~10x slower on large sparse masks (760 us against 63 us on a [612, 512] one)."""
    return np.divmod(np.flatnonzero(a), a.shape[1])


def transpose_f32(a: np.ndarray) -> np.ndarray:
    """``a.T`` as a new C-contiguous array, for 2-D ``a`` (other than C-contiguous float32: a plain copy).

    NumPy's transposed copy moves one float at a time with a strided read (~1 ns per
    float for [n, 16], ~3 ns for [128, 2048] rows); moving lanes of 4 or 8 floats
    first (16/32-byte elements) and then transposing each [n, lane] block, whose
    reads stay within a few cache lines, is 1.3-4x faster and gives the same array.
    """
    if a.ndim != 2 or a.dtype != np.float32 or not a.flags.c_contiguous:
        return np.ascontiguousarray(np.asarray(a).T)
    n, k = a.shape
    lane = 8 if k >= 1024 else 4
    if k % lane or n == 0:
        return np.ascontiguousarray(a.T)
    v = np.dtype(f"V{4 * lane}")
    y = np.empty((k // lane, n), dtype=v)
    np.copyto(y, a.view(v).T)
    return np.ascontiguousarray(y.view(np.float32).reshape(k // lane, n, lane).transpose(0, 2, 1)).reshape(k, n)
