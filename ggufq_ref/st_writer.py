"""Writing safetensors files for tests and tools that build model folders (synthetic models, SmolLM2).

safetensors' own NumPy API cannot write bf16; this writes BF16/F16/F32 from float arrays, the
header padded to 8 bytes as the format asks.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Optional, Sequence

import numpy as np

from ggufq.quant.floats import f32_to_bf16_bits
from ggufq.source import DTYPES


def shard_name(k: int, n: int) -> str:
    """Hugging Face's name of shard ``k`` (0-based) of ``n``."""
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def st_header(entries: Iterable[tuple[str, str, Sequence[int], int]], metadata: Optional[dict] = None) -> bytes:
    """The head of a safetensors file -- u64 LE length, then the JSON header space-padded to 8 bytes --
    for ``(name, dtype, shape, nbytes)`` entries whose data follow in this order (so writers can stream)."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    off = 0
    for name, dtype, shape, nb in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def write_safetensors(path: os.PathLike | str, tensors: dict[str, tuple[np.ndarray, str]],
                      metadata: Optional[dict] = None) -> int:
    """Write a safetensors file from ``name -> (float array, dtype)``, dtype in BF16/F16/F32; returns
    the bytes of tensor data written (the index's ``total_size`` share).

    For tools and tests that build model folders (synthetic models, SmolLM2);
    safetensors' own numpy API cannot write bf16.
    """
    blobs = []
    for name, (arr, dtype) in tensors.items():
        a = np.asarray(arr, dtype=np.float32)
        if dtype == "BF16":
            raw = f32_to_bf16_bits(a).tobytes()
        elif dtype in DTYPES:
            raw = a.astype(DTYPES[dtype][1]).tobytes()
        else:
            raise ValueError(f"cannot write dtype {dtype}")
        blobs.append((name, dtype, a.shape, raw))
    with open(path, "wb") as f:
        f.write(st_header(((n, d, sh, len(r)) for n, d, sh, r in blobs), metadata))
        for *_, raw in blobs:
            f.write(raw)
    return sum(len(r) for *_, r in blobs)
