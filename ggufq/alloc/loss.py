"""Predicted loss of every (tensor, candidate type): the output error ``tr(E H E^T)``.

``E = dequant(quant(W)) - W`` is measured by encoding a sample of ``W``'s rows with the encoder
the conversion uses for the estimate (llama.cpp's k-quant / i-quant search, weighted as the file
will be), ``H`` is the second moment of the tensor's inputs (self-calibration: ``E[x x^T]`` or
its diagonal; an imatrix's diagonal; none: the identity, plain squared error). The sum over the
sampled rows is scaled to all rows. :mod:`ggufq.alloc.probe` turns these per-tensor errors into
KL divergence with one measured factor per layer group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

from .. import quant
from ..plan import layer_of, rules as R

# the types the allocator chooses among, cheapest first (each then through llama.cpp's row fallback);
# i-quants below 4 bits need an imatrix in llama-quantize and are left out
CANDIDATES: tuple[T, ...] = (T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.F16)
SAMPLE_ROWS = 256        # rows encoded per tensor and type (in 8 evenly spaced runs)
ALIGN = 32               # GGUF data alignment: each tensor's bytes are padded to it


def padded_bytes(qtype: T, n_elements: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return -(-(n_elements // bs * ts) // ALIGN) * ALIGN


def candidates(shape: tuple[int, ...], allowed: tuple[T, ...] = CANDIDATES) -> list[T]:
    """The distinct types a tensor of ``shape`` can be written as from ``allowed``, cheapest first."""
    out: list[T] = []
    for t in allowed:
        f, _ = R.fallback(t, shape[-1])
        if f not in out:
            out.append(f)
    n = int(np.prod(shape))
    return sorted(out, key=lambda t: (padded_bytes(t, n), int(t)))


def group_of(name: str) -> str:
    """The layer group whose sensitivity scales a tensor's error: ``blk.N.attn``, ``blk.N.ffn``,
    ``blk.N.exps`` (routed experts: MoE), or the tensor's own name outside the layers."""
    layer = layer_of(name)
    if layer is None:
        return name.rsplit(".", 1)[0]
    if "_exps." in name:
        role = "exps"
    elif ".attn_" in name:
        role = "attn"
    else:
        role = "ffn"
    return f"blk.{layer}.{role}"


def sample_rows(n_rows: int, n: int = SAMPLE_ROWS) -> list[tuple[int, int]]:
    """Up to ``n`` rows in 8 evenly spaced contiguous runs: [(lo, hi), ...]."""
    if n_rows <= n:
        return [(0, n_rows)]
    runs, per = 8, n // 8
    starts = np.linspace(0, n_rows - per, runs).astype(int)
    return [(int(s), int(s) + per) for s in starts]


def output_error(e: np.ndarray, h: Optional[np.ndarray]) -> float:
    """``sum_rows e H e^T`` (``h`` [n, n], [n] diagonal, or None for the identity)."""
    if h is None:
        return float(np.einsum("ij,ij->", e, e, dtype=np.float64))
    if h.ndim == 1:
        return float(np.einsum("ij,ij,j->", e, e, h, dtype=np.float64))
    return float(np.einsum("ij,ij->", e @ h.astype(e.dtype, copy=False), e, dtype=np.float64))


def error_of(qtype: T, rows: np.ndarray, weights: Optional[np.ndarray], h: Optional[np.ndarray],
             encoder=None) -> float:
    """Output error of ``rows`` [n, k] encoded as ``qtype`` (by ``encoder``, default ggufq's k-quant /
    i-quant search)."""
    return output_error(encoded(qtype, rows, weights, encoder) - rows, h)


def encoded(qtype: T, rows: np.ndarray, weights, encoder=None) -> np.ndarray:
    """``rows`` [n, k] after encoding as ``qtype`` and decoding (float32). ``encoder``: a method's
    ``(qtype, rows, weights) -> blocks`` (:mod:`ggufq.quant.methods`; ``weights`` may then be a
    :class:`~ggufq.quant.gptq.Hessian`: error-feedback rounding, rows independent of each other),
    None: ggufq's k-quant / i-quant search with ``weights`` as its imatrix."""
    if qtype in (T.F32, T.F16, T.BF16):
        return rows
    blocks = (quant.encode if encoder is None else encoder)(qtype, rows, weights)
    return dequantize(blocks, qtype).reshape(rows.shape)


@dataclass
class Sample:
    """The rows a table estimate encoded, kept at one type for the probe: ``runs`` [(lo, hi)],
    ``rows`` the decoded rows (float16), ``error`` their (unscaled) output error."""
    runs: list
    rows: np.ndarray
    error: float


def tensor_losses(tensor, types: list[T], weights, h: Optional[np.ndarray],
                  n_sample: int = SAMPLE_ROWS, keep: Optional[T] = None, encoder=None):
    """Predicted ``tr(E H E^T)`` of the whole tensor for each of ``types`` (sampled rows, scaled);
    with ``keep`` (one of ``types``) also that type's :class:`Sample`: (errors, sample). ``encoder``
    and ``weights``: what the file's writer will encode with (:func:`encoded`); a Hessian as
    ``weights`` goes to ``encoder`` as it is (error-feedback rounding of the sampled rows)."""
    from ..quant.gptq import Hessian
    runs = sample_rows(tensor.n_rows, n_sample)
    rows = np.concatenate([tensor.read(lo, hi) for lo, hi in runs]).astype(np.float32)
    scale = tensor.n_rows / rows.shape[0]
    if isinstance(weights, Hessian):
        w = weights if encoder is not None else weights.diag
    else:
        w = None if weights is None else np.asarray(weights, np.float32).reshape(-1)[:tensor.row_len] \
            if np.asarray(weights).ndim == 1 else None
    hh = None if h is None else np.asarray(h, np.float32)
    out, sample = [], None
    for t in types:
        d = encoded(t, rows, w, encoder)
        e = output_error(d - rows, hh)
        out.append(e * scale)
        if t == keep:
            sample = Sample(runs, d.astype(np.float16), e)
    errs = np.array(out)
    return errs if keep is None else (errs, sample)
