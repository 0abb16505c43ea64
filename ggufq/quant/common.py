"""Helpers shared by the block encoders: ggml's rounding, fp16 packing."""
from __future__ import annotations

import numpy as np


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
