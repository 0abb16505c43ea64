"""Writing safetensors files for tests and tools that build model folders (synthetic models, SmolLM2).

safetensors' own NumPy API cannot write bf16; this writes BF16/F16/F32 from float arrays, the
header padded to 8 bytes as the format asks.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

import numpy as np

from ggufq.quant.floats import f32_to_bf16_bits
from ggufq.source import DTYPES


def write_safetensors(path: os.PathLike | str, tensors: dict[str, tuple[np.ndarray, str]],
                      metadata: Optional[dict] = None) -> int:
    """Write a safetensors file from ``name -> (float array, dtype)``, dtype in BF16/F16/F32; returns
    the bytes of tensor data written (the index's ``total_size`` share).

    For tools and tests that build model folders (synthetic models, SmolLM2);
    safetensors' own numpy API cannot write bf16.
    """
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    blobs = []
    off = 0
    for name, (arr, dtype) in tensors.items():
        a = np.asarray(arr, dtype=np.float32)
        if dtype == "BF16":
            raw = f32_to_bf16_bits(a).tobytes()
        elif dtype in DTYPES:
            raw = a.astype(DTYPES[dtype][1]).tobytes()
        else:
            raise ValueError(f"cannot write dtype {dtype}")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    return off
