"""Unquantized types: F32, F16, BF16 (bit-exact with ggml's conversions)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register


@register(T.F32)
def encode_f32(rows: np.ndarray, imatrix=None) -> np.ndarray:
    return np.ascontiguousarray(rows, dtype=np.float32).view(np.uint8)


@register(T.F16)
def encode_f16(rows: np.ndarray, imatrix=None) -> np.ndarray:
    # numpy's float32 -> float16 cast rounds to nearest even, like ggml's (F16C or scalar) path
    return rows.astype(np.float16).view(np.uint8)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even, quiet NaNs, as ggml_fp32_to_bf16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    quiet = (u >> np.uint32(16)) | np.uint32(64)
    return np.where(nan, quiet, rounded).astype(np.uint16)


@register(T.BF16)
def encode_bf16(rows: np.ndarray, imatrix=None) -> np.ndarray:
    return f32_to_bf16_bits(rows).view(np.uint8)
