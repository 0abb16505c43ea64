"""Quantized source checkpoints: FP8 (``F8_E4M3`` / ``F8_E5M2``) with block scales, read lazily.

A checkpoint saying ``quantization_config.quant_method = "fp8"`` stores each quantized matrix
``W`` as FP8 codes plus ``W_scale_inv`` (despite the name: the factor that *multiplies* the codes),
one float per ``weight_block_size`` block (``[128, 128]`` in DeepSeek-V3 / Qwen3-FP8; absent:
one scale per tensor or per row). llama.cpp's converter dequantizes it with torch in
``ModelBase.dequant_model`` / ``dequant_simple``: ``weight.float() * scale.float()`` with the
scale ``repeat_interleave``d to the weight's shape and cut to it (blocks at the edges may be
partial). :class:`Fp8Tensor` computes the same float32 product, one float32 multiply per
element, on the rows it is asked for: FP8 codes are decoded through a 256-entry table (exact in
float32), the block-scale rows covering those rows are read alongside, nothing else. No BF16 or
float32 copy of a whole tensor exists at any time.

Other ``quant_method``s (GPTQ, AWQ, compressed-tensors, bitsandbytes...) and FP8 tensors with a
missing or misshapen scale are one :class:`~ggufq.GgufqError` line, before anything is written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import GgufqError
from .source import SourceTensor

FP8 = ("F8_E4M3", "F8_E5M2")
READS = "ggufq reads FP8 (block-scaled, quant_method fp8), MXFP4 (quant_method mxfp4), BF16, F16 and F32 weights"


def _e4m3_table() -> np.ndarray:
    """float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN."""
    b = np.arange(256)
    s, e, m = b >> 7, (b >> 3) & 15, b & 7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e.astype(np.float64) - 7))
    v = np.where(s == 1, -mag, mag)
    v[(e == 15) & (m == 7)] = np.nan
    return v.astype(np.float32)


def _e5m2_table() -> np.ndarray:
    """float8_e5m2 is the upper byte of an IEEE half."""
    return (np.arange(256, dtype=np.uint16) << np.uint16(8)).view(np.float16).astype(np.float32)


TABLES = {"F8_E4M3": _e4m3_table(), "F8_E5M2": _e5m2_table()}


def fp8_decode(codes: np.ndarray, dtype: str) -> np.ndarray:
    return TABLES[dtype][codes]


def fp8_encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Nearest FP8 code of each float (saturating; ties to the smaller magnitude). For tools that
    build FP8 checkpoints; the converter never encodes FP8."""
    t = TABLES[dtype]
    pos = np.arange(128)
    pos = pos[np.isfinite(t[pos])]
    vals = t[pos]
    order = np.argsort(vals, kind="stable")
    vals, pos = vals[order], pos[order]
    a = np.abs(np.asarray(x, np.float32)).ravel()
    i = np.clip(np.searchsorted(vals, a), 1, len(vals) - 1)
    lo_closer = (a - vals[i - 1]) <= (vals[i] - a)
    code = np.where(lo_closer, pos[i - 1], pos[i]).astype(np.uint8)
    code = np.where(a > vals[-1], pos[-1], code).astype(np.uint8)
    code |= (np.signbit(np.asarray(x, np.float32).ravel()).astype(np.uint8) << 7)
    return code.reshape(np.shape(x))


@dataclass
class Fp8Tensor(SourceTensor):
    """A weight times its scale: ``rows(lo, hi)`` is ``decode(codes) * scale`` in float32, as
    ``dequant_simple`` computes it, for those rows only."""
    scale: Optional[SourceTensor] = field(default=None, repr=False)
    block: Optional[tuple[int, int]] = None     # (rows, cols) per scale; None: per tensor / per row

    def _codes(self, lo: int, hi: int) -> np.ndarray:
        n = (hi - lo) * self.row_len
        raw = bytes(self.pread(self.offset + lo * self.row_len, n))
        return fp8_decode(np.frombuffer(raw, dtype=np.uint8), self.dtype).reshape(hi - lo, self.row_len)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        lo, hi = max(0, lo), min(hi, self.n_rows)
        w = self._codes(lo, hi) if self.dtype in FP8 else SourceTensor.rows(self, lo, hi)
        s = self.scale
        if s._fd is None and self._fd is not None and s.path == self.path:
            s._fd = self._fd
        if self.block is None:
            if s.n_elements == 1:
                return w * s.rows(0, 1).reshape(())
            return w * s.rows(0, s.n_rows).reshape(-1)[lo:hi, None]   # one scale per row
        b0, b1 = self.block
        per = self.shape[-2] if len(self.shape) >= 2 else 1     # rows of one matrix (3-D: per expert)
        nb0 = s.shape[-2]
        i = np.arange(lo, hi)
        srow = (i // per) * nb0 + (i % per) // b0              # scale row of each weight row
        a, b = int(srow.min()), int(srow.max()) + 1
        sc = s.rows(a, b)[srow - a]                             # [hi - lo, n col blocks]
        cols = np.repeat(sc, b1, axis=1)[:, :self.row_len]
        return w * cols


def _expected_scale(shape: tuple, block: tuple[int, int]) -> tuple:
    return tuple(shape[:-2]) + (math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def dequantizing(config: dict, tensors: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
    """``tensors`` with every scaled weight replaced by an :class:`Fp8Tensor` and its scale
    tensors dropped (as ``dequant_model`` removes them); one error line for what ggufq cannot read."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    fp8_names = [n for n, t in tensors.items() if t.dtype in FP8]
    if method is None:
        if fp8_names:
            raise GgufqError(f"tensor {fp8_names[0]} is {tensors[fp8_names[0]].dtype} but config.json has no "
                             f"quantization_config saying how it is scaled; {READS}")
        return tensors
    if method == "mxfp4":              # gpt-oss: expert blocks + E8M0 scales (ggufq.source_mxfp4)
        from .source_mxfp4 import repacking
        if fp8_names:
            raise GgufqError(f"tensor {fp8_names[0]} is {tensors[fp8_names[0]].dtype} in an MXFP4 checkpoint; {READS}")
        return repacking(tensors)
    if method != "fp8":
        raise GgufqError(f"this checkpoint is quantized with quant_method {method!r} (config.json "
                         f"quantization_config), which ggufq does not read; {READS}")
    bs = qc.get("weight_block_size")
    if bs is not None:
        if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(x, int) and x > 0 for x in bs)):
            raise GgufqError(f"config.json: quantization_config.weight_block_size = {bs!r}, expected two "
                             f"positive integers")
        bs = (int(bs[0]), int(bs[1]))
    out = dict(tensors)
    for name, s in tensors.items():
        if name.endswith((".activation_scale", "_activation_scale")):
            del out[name]
            continue
        if not name.endswith("_scale_inv"):
            continue
        wname = name[:-len("_scale_inv")]
        w = tensors.get(wname)
        if w is None:
            raise GgufqError(f"scale tensor {name} has no weight {wname}")
        if s.dtype not in ("F32", "BF16", "F16"):
            raise GgufqError(f"scale tensor {name} has dtype {s.dtype}; scales are F32, BF16 or F16")
        if w.dtype in FP8 and w.nbytes != w.n_elements:
            raise GgufqError(f"{w.path.name}: tensor {wname} has {w.nbytes} bytes, shape {list(w.shape)} "
                             f"of {w.dtype} needs {w.n_elements}")
        if bs is not None:
            if len(w.shape) < 2 or tuple(s.shape) != _expected_scale(w.shape, bs):
                want = list(_expected_scale(w.shape, bs)) if len(w.shape) >= 2 else "(a matrix)"
                raise GgufqError(f"scale tensor {name} has shape {list(s.shape)}; weight {list(w.shape)} in "
                                 f"blocks of {list(bs)} needs {want}")
        elif not (s.n_elements == 1 or tuple(s.shape) in ((w.n_rows,), (w.n_rows, 1))):
            raise GgufqError(f"scale tensor {name} has shape {list(s.shape)}; without weight_block_size a "
                             f"scale is one value or one per row ({w.n_rows})")
        out[wname] = Fp8Tensor(w.name, w.shape, w.dtype, w.path, w.offset, w.nbytes, scale=s, block=bs)
        del out[name]
    for n in fp8_names:
        if not isinstance(out.get(n), Fp8Tensor):
            raise GgufqError(f"tensor {n} is {tensors[n].dtype} without its scale {n}_scale_inv")
    return out
