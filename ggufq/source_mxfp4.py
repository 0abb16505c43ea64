"""MXFP4 source tensors (``quantization_config.quant_method = "mxfp4"``, gpt-oss's experts), read lazily.

A checkpoint stores a quantized matrix ``W`` ``[..., rows, cols]`` as two uint8 tensors:
``W_blocks`` ``[..., rows, cols / 32, 16]`` (32 E2M1 codes per block, two to a byte, code ``2j``
in the low nibble of byte ``j``) and ``W_scales`` ``[..., rows, cols / 32]`` (E8M0: the block's
factor is ``2^(s - 127)``). That is ggml's ``block_mxfp4`` up to the nibble order: ggml keeps code
``j`` in the low and code ``j + 16`` in the high nibble of byte ``j``, its table holds the doubled
E2M1 values and its scale ``2^(e - 128)`` (``GGML_E8M0_TO_FP32_HALF``), so the scale byte is copied
as it is. llama.cpp's ``GptOssModel.repack_mxfp4`` / ``transform_nibble_layout`` moves the nibbles
and writes ``[scale, 16 code bytes]`` blocks; :meth:`Mxfp4Tensor.raw` does the same, per row range,
so a tensor kept MXFP4 is written byte for byte as llama.cpp's converter writes it.
:meth:`Mxfp4Tensor.rows` decodes to float32 as ggml's ``dequantize_row_mxfp4`` does (exact), for a
target of another type (what llama-quantize --allow-requantize does with such a tensor).

Checked at open (one :class:`~ggufq.GgufqError` line): blocks and scales come in pairs, are U8,
and their shapes agree; nothing else is read before the writer asks for rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import GgufqError
from .quant.mxfp4 import KVALUES, e8m0_to_fp32_half
from .source import SourceTensor

QK = 32
BLOCK_BYTES = 17          # ggml block_mxfp4: u8 e; u8 qs[16]
_KV = KVALUES.astype(np.float32)


def hf_to_ggml_blocks(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[n, nb, 16]`` HF code bytes + ``[n, nb]`` E8M0 scales -> ``[n, nb * 17]`` ggml block bytes."""
    lo, hi = blocks & np.uint8(0x0F), blocks >> np.uint8(4)
    codes = np.stack([lo, hi], axis=-1).reshape(blocks.shape[:-1] + (QK,))      # code 2j, 2j+1 from byte j
    qs = codes[..., :16] | (codes[..., 16:] << np.uint8(4))
    out = np.concatenate([scales[..., None], qs], axis=-1)
    return out.reshape(blocks.shape[0], -1)


def ggml_to_hf_blocks(raw: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`hf_to_ggml_blocks` (for tools that write MXFP4 checkpoints)."""
    b = raw.reshape(raw.shape[0], nb, BLOCK_BYTES)
    scales, qs = b[..., 0], b[..., 1:]
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)   # code j | code j+16
    pairs = codes.reshape(raw.shape[0], nb, 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << np.uint8(4))).astype(np.uint8), scales.astype(np.uint8)


def dequantize(raw: np.ndarray) -> np.ndarray:
    """ggml ``block_mxfp4`` rows ``[n, nb * 17]`` -> float32 ``[n, nb * 32]`` (dequantize_row_mxfp4)."""
    n = raw.shape[0]
    b = raw.reshape(n, -1, BLOCK_BYTES)
    d = e8m0_to_fp32_half(b[..., 0])
    qs = b[..., 1:]
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
    return (_KV[codes] * d[..., None]).reshape(n, -1)


@dataclass
class Mxfp4Tensor(SourceTensor):
    """``W_blocks`` + ``W_scales`` as one ``[..., rows, cols]`` source (``self`` is the blocks)."""
    scales: Optional[SourceTensor] = field(default=None, repr=False)
    native = T.MXFP4                # what the writer may copy without re-encoding

    @property
    def row_len(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.row_len if self.row_len else 0

    def raw(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` as ggml ``block_mxfp4`` bytes, ``[hi - lo, cols / 32 * 17]`` uint8."""
        lo, hi = max(0, lo), min(hi, self.n_rows)
        nb = self.row_len // QK
        s = self.scales
        if s._fd is None and self._fd is not None and s.path == self.path:
            s._fd = self._fd
        blocks = np.frombuffer(self.pread(self.offset + lo * nb * 16, (hi - lo) * nb * 16), np.uint8)
        scales = np.frombuffer(s.pread(s.offset + lo * nb, (hi - lo) * nb), np.uint8)
        return hf_to_ggml_blocks(blocks.reshape(hi - lo, nb, 16), scales.reshape(hi - lo, nb))

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return dequantize(self.raw(lo, hi))


def repacking(tensors: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
    """``tensors`` with every ``X_blocks`` / ``X_scales`` pair replaced by one :class:`Mxfp4Tensor`
    named ``X``; tensors of other dtypes are left as they are (gpt-oss keeps attention, router,
    embeddings BF16)."""
    out = dict(tensors)
    for name, b in tensors.items():
        if not name.endswith("_blocks"):
            continue
        base = name[:-len("_blocks")]
        s = tensors.get(base + "_scales")
        if s is None:
            raise GgufqError(f"MXFP4 tensor {name} has no scales {base}_scales")
        for t in (b, s):
            if t.dtype != "U8":
                raise GgufqError(f"MXFP4 tensor {t.name} has dtype {t.dtype}; blocks and scales are U8")
            if t.nbytes != t.n_elements:
                raise GgufqError(f"{t.path.name}: tensor {t.name} has {t.nbytes} bytes, shape {list(t.shape)} "
                                 f"of U8 needs {t.n_elements}")
        if len(b.shape) < 3 or b.shape[-1] != 16:
            raise GgufqError(f"MXFP4 tensor {name} has shape {list(b.shape)}; blocks are [..., rows, cols / 32, 16]")
        if tuple(s.shape) != tuple(b.shape[:-1]):
            raise GgufqError(f"MXFP4 scales {s.name} have shape {list(s.shape)}; blocks {list(b.shape)} need "
                             f"{list(b.shape[:-1])}")
        shape = tuple(b.shape[:-2]) + (b.shape[-2] * QK,)
        out[base] = Mxfp4Tensor(base, shape, "MXFP4", b.path, b.offset, b.nbytes, scales=s)
        del out[name]
        del out[base + "_scales"]
    stray = [n for n, t in out.items() if t.dtype == "U8" and not isinstance(t, Mxfp4Tensor)]
    if stray:
        raise GgufqError(f"tensor {stray[0]} is U8 but not one of an MXFP4 pair (X_blocks + X_scales)")
    return out
