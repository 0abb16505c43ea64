"""Accuracy parity of our encoders against ggml's own (``ggml_ref``), for tests and tools.

* :func:`model_matrices` reads the 2-D tensors of a safetensors model folder
  (bf16/f16/f32) one at a time, as float32, without torch or safetensors' numpy
  path (which has no bf16).
* :func:`compare` encodes one matrix with ours and ggml's and reports relative
  RMSE of both (decoded with ``gguf.quants.dequantize``) and the share of
  byte-identical blocks.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from . import encode

_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


def _to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def model_matrices(model_dir: str, min_cols: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, float32 [rows, cols])`` for every 2-D tensor with ``cols >= min_cols``, sorted by name."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    entries = []
    for path in files:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen))
        for name, info in header.items():
            if name == "__metadata__" or len(info["shape"]) != 2 or info["shape"][1] < min_cols:
                continue
            if info["dtype"] not in _DTYPES:
                continue
            entries.append((name, path, 8 + hlen + info["data_offsets"][0], info))
    for name, path, off, info in sorted(entries):
        dt = np.dtype(_DTYPES[info["dtype"]])
        count = int(np.prod(info["shape"]))
        raw = np.fromfile(path, dtype=dt, count=count, offset=off)
        yield name, _to_f32(raw, info["dtype"]).reshape(info["shape"])


def synthetic_imatrix(n_cols: int, seed: int = 0, n_tokens: int = 64) -> np.ndarray:
    """A positive importance vector like llama-imatrix's: mean of squared activations per column."""
    rng = np.random.default_rng(seed + n_cols)
    scale = np.exp(rng.normal(0, 1, n_cols)).astype(np.float32)       # heavy per-channel spread
    act = rng.standard_normal((n_tokens, n_cols)).astype(np.float32) * scale
    return (act * act).mean(axis=0).astype(np.float32) + np.float32(1e-6)


def rel_rmse(x: np.ndarray, q: np.ndarray, qtype: GGMLQuantizationType) -> float:
    deq = gq.dequantize(q, qtype).reshape(x.shape)
    return float(np.linalg.norm(deq - x) / np.linalg.norm(x))


@dataclass
class Parity:
    ours: float          # relative RMSE of our encoding
    ggml: float          # relative RMSE of ggml's
    same_blocks: float   # share of byte-identical blocks
    n_blocks: int

    @property
    def ratio(self) -> float:
        return self.ours / self.ggml if self.ggml else (1.0 if self.ours == 0 else float("inf"))


def compare(qtype: GGMLQuantizationType, x: np.ndarray, imatrix: Optional[np.ndarray] = None) -> Parity:
    from . import ggml_ref

    ours = encode(qtype, x, imatrix)
    ref = ggml_ref.quantize(qtype, x, imatrix)
    bsz = GGML_QUANT_SIZES[qtype][1]
    a = ours.reshape(-1, bsz)
    b = ref.reshape(-1, bsz)
    same = float((a == b).all(axis=1).mean())
    return Parity(rel_rmse(x, ours, qtype), rel_rmse(x, ref, qtype), same, a.shape[0])
