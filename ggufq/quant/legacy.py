"""Legacy 32-weight block formats (Q8_0, ...), vectorised over all blocks.

Follows ggml-quants.c's ``quantize_row_*_ref``. Each encoder reshapes rows into
blocks ``[n_blocks, 32]`` and builds the block struct bytes column-wise.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import register
from .common import fp16_bytes, roundf

QK8_0 = 32


@register(T.Q8_0)
def encode_q8_0(rows: np.ndarray, imatrix=None) -> np.ndarray:
    # block_q8_0 { ggml_half d; int8_t qs[32]; } ; d = amax/127, q = roundf(x/d)
    n, k = rows.shape
    blocks = rows.reshape(-1, QK8_0)
    amax = np.abs(blocks).max(axis=1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = roundf(blocks * inv[:, None]).astype(np.int8)
    out = np.empty((blocks.shape[0], 2 + QK8_0), dtype=np.uint8)
    out[:, :2] = fp16_bytes(d)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(n, k // QK8_0 * (2 + QK8_0))
