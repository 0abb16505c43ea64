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
