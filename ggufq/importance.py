"""Data-free importance: a stand-in for an imatrix from the model's own weights.

A pre-norm block feeds ``gamma * x / rms(x)`` into q/k/v (``attn_norm``) and into
gate/up (``ffn_norm``), and the head into ``output`` (``output_norm``): input
column j is scaled by gamma_j, so its mean square activation is ~ gamma_j^2.
For the two matrices without a norm in front:

* ``attn_output`` column c reads head-dim c of the attention output, a mix of
  V rows; its scale ~ ||gamma (.) v_row||^2 for the V row that feeds it (GQA:
  query head h reads kv head h // (n_head / n_head_kv)).
* ``ffn_down`` column j reads silu(g_j . x) * (u_j . x) with x ~ gamma (.) N(0, I):
  ||gamma (.) u_j||^2 * E[silu(z)^2], z ~ N(0, ||gamma (.) g_j||^2) (quadrature).

Stacked experts ``[n_expert, rows, cols]`` (llama.cpp's MUL_MAT_ID) get one vector per expert,
``[n_expert * cols]`` as an imatrix holds them: ``ffn_{gate,up}_exps`` the FFN norm's gamma^2 for
every expert, ``ffn_down_exps`` expert e's own ``ffn_down`` proxy from its gate/up rows; a shared
expert (``*_shexp``) as a dense FFN. gpt-oss's experts read ``post_attention_norm`` and have no
``ffn_down_exps`` proxy (its clamped, biased SwiGLU is not the silu product above).

Returned per GGUF tensor name as float32 [row_len], in llama-quantize's imatrix
convention (mean squared activation per input column; only ratios matter).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

_ROWS = 4096       # rows read at a time (flat memory)

_Z = np.linspace(-6.0, 6.0, 241)
_PZ = np.exp(-_Z ** 2 / 2)
_PZ /= _PZ.sum()


def silu_sq_mean(s: np.ndarray, act: str = "silu") -> np.ndarray:
    """E[act(z)^2] for z ~ N(0, s^2), s [n] -> [n] (241-point quadrature); act "silu" or "gelu_tanh"."""
    z = np.asarray(s, np.float64)[:, None] * _Z[None, :]
    with np.errstate(over="ignore"):
        if act == "gelu_tanh":
            a = 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))
        else:
            a = z / (1.0 + np.exp(-z))
    return (a * a * _PZ).sum(1)


def _row_sq(t, col_scale: np.ndarray, rows: Optional[tuple[int, int]] = None) -> np.ndarray:
    """||col_scale (.) row||^2 for every row (or rows [a, b)) of an OutTensor, read in chunks."""
    a, b = rows or (0, t.n_rows)
    out = np.empty(b - a, np.float64)
    for lo in range(a, b, _ROWS):
        hi = min(b, lo + _ROWS)
        r = t.read(lo, hi).astype(np.float64) * col_scale
        out[lo - a:hi - a] = (r * r).sum(1)
    return out


def importance_from_tensors(tensors: dict, n_head: int, n_head_kv: int, n_layer: int,
                            proxies: bool = True, act: str = "silu", ffn_norm: str = "ffn_norm",
                            expert_down: bool = True) -> dict[str, np.ndarray]:
    """``tensors``: GGUF name -> OutTensor (name, shape, read(lo, hi)). Archs without a norm in front
    of attention / MLP (OLMo 2) get entries only where one is; a fused gate/up (Phi-3's ``ffn_up`` of
    ``2 n_ff`` rows, gate first) gives the ``ffn_down`` proxy from its halves.

    Long because each matrix role (q/k/v, attn_output, dense / fused / shared / routed FFNs, output)
    has its few lines over the same per-layer norm vectors."""
    def vec(name: str) -> Optional[np.ndarray]:
        t = tensors.get(name)
        return None if t is None else t.read(0, t.n_rows).reshape(-1).astype(np.float64)

    out: dict[str, np.ndarray] = {}

    def put(name: str, v: np.ndarray) -> None:
        t = tensors.get(name)
        if t is not None and len(t.shape) >= 2 and t.row_len == v.size:
            out[name] = np.maximum(v, 0).astype(np.float32)

    def put_experts(name: str, v: np.ndarray) -> None:       # v: [n_expert * cols], expert-major
        t = tensors.get(name)
        if t is not None and len(t.shape) == 3 and t.shape[0] * t.row_len == v.size:
            out[name] = np.maximum(v, 0).astype(np.float32)

    def ffn_down_proxy(g, u, fn) -> np.ndarray:
        return _row_sq(u, fn) * silu_sq_mean(np.sqrt(_row_sq(g, fn)), act)

    for i in range(n_layer):
        an, fn = vec(f"blk.{i}.attn_norm.weight"), vec(f"blk.{i}.{ffn_norm}.weight")
        if an is not None:
            for t in ("attn_q", "attn_k", "attn_v", "attn_qkv"):
                put(f"blk.{i}.{t}.weight", an * an)
        if fn is not None:
            for t in ("ffn_gate", "ffn_up", "ffn_gate_shexp", "ffn_up_shexp"):
                put(f"blk.{i}.{t}.weight", fn * fn)
            for t in ("ffn_gate_exps", "ffn_up_exps"):
                e = tensors.get(f"blk.{i}.{t}.weight")
                if e is not None and len(e.shape) == 3:
                    put_experts(e.name, np.tile(fn * fn, e.shape[0]))
        if not proxies:
            continue
        v, o = tensors.get(f"blk.{i}.attn_v.weight"), tensors.get(f"blk.{i}.attn_output.weight")
        if an is not None and v is not None and o is not None and n_head_kv:
            vimp = _row_sq(v, an)
            hd = v.n_rows // n_head_kv
            col = np.arange(o.row_len)
            kvrow = (col // hd) // max(1, n_head // n_head_kv) * hd + col % hd
            if kvrow.max() < vimp.size:
                put(o.name, vimp[kvrow])
        g, u = tensors.get(f"blk.{i}.ffn_gate.weight"), tensors.get(f"blk.{i}.ffn_up.weight")
        dn = tensors.get(f"blk.{i}.ffn_down.weight")
        if fn is not None and g is not None and u is not None and dn is not None:
            sg = np.sqrt(_row_sq(g, fn))
            put(dn.name, _row_sq(u, fn) * silu_sq_mean(sg, act))
        elif fn is not None and g is None and u is not None and dn is not None and u.n_rows == 2 * dn.row_len:
            F = dn.row_len
            sg = np.sqrt(_row_sq(u, fn, (0, F)))
            put(dn.name, _row_sq(u, fn, (F, 2 * F)) * silu_sq_mean(sg, act))
        gs, us, ds = (tensors.get(f"blk.{i}.ffn_{r}_shexp.weight") for r in ("gate", "up", "down"))
        if fn is not None and gs is not None and us is not None and ds is not None:
            put(ds.name, ffn_down_proxy(gs, us, fn))
        ge, ue, de = (tensors.get(f"blk.{i}.ffn_{r}_exps.weight") for r in ("gate", "up", "down"))
        if expert_down and fn is not None and ge is not None and ue is not None and de is not None \
                and len(ge.shape) == 3 and ge.shape == ue.shape and ge.shape[1] == de.row_len:
            # gate/up rows e * n_ff + j feed column j of expert e's down matrix: already expert-major
            put_experts(de.name, ffn_down_proxy(ge, ue, fn))
    on = vec("output_norm.weight")
    if on is not None:
        put("output.weight", on * on)
    if on is not None and "output.weight" not in tensors:
        # tied embeddings: token_embd is also the output projection, whose importance is kept
        put("token_embd.weight", on * on)
    else:
        put("token_embd.weight", residual_readers(vec, n_layer, ffn_norm))
    return out


def residual_readers(vec, n_layer: int, ffn_norm: str = "ffn_norm") -> np.ndarray:
    """Column importance of ``token_embd`` (a lookup: no input moment exists for it). A row of it is
    added to the residual stream, and every reader of that stream -- each layer's ``attn_norm`` and
    ``ffn_norm``, then ``output_norm`` -- takes ``gamma * x / rms(x)``: an error in column j reaches
    each reader scaled by its gamma_j. The sum of the readers' gamma^2, each normalised to mean 1.
    On tinyllama's calibrated IQ3_M this cut KLD by 7% against no weights at all (same bytes
    otherwise); weighting by layer 0 alone, or also by the readers' column norms, did the same within
    noise, and this needs the norm vectors only. ``ffn_norm``: the MLP's norm as the arch names it
    (gpt-oss: ``post_attention_norm``), as in :func:`importance_from_tensors`."""
    acc = None
    names = [f"blk.{i}.{n}.weight" for i in range(n_layer) for n in ("attn_norm", ffn_norm)] + ["output_norm.weight"]
    for name in names:
        g = vec(name)
        if g is None:
            continue
        g2 = g * g
        m = float(g2.mean())
        if not np.isfinite(m) or m <= 0 or (acc is not None and acc.size != g2.size):
            continue
        acc = g2 / m if acc is None else acc + g2 / m
    return acc if acc is not None else np.zeros(0)


def importance_for(prepared, proxies: bool = True) -> dict[str, np.ndarray]:
    """Data-free importance for a ``convert.Prepared`` model: GGUF name -> float32 [row_len].

    Reads only the norm vectors and the V / gate / up matrices (in row chunks).
    token_embd gets the output's entry when the embeddings are tied, else :func:`residual_readers`.
    """
    info = prepared.info
    ts = {t.name: t for t in prepared.tensors}
    rec = getattr(prepared.arch, "record", None)
    act = rec.forward.act if rec is not None else "silu"
    gpt_oss = rec is not None and rec.name == "gpt-oss"
    return importance_from_tensors(ts, info.n_head, info.n_head_kv, info.n_layer, proxies, act,
                                   ffn_norm="post_attention_norm" if gpt_oss else "ffn_norm",
                                   expert_down=not gpt_oss)


def combine(real: Optional[np.ndarray], free: Optional[np.ndarray], how: str = "real") -> Optional[np.ndarray]:
    """Merge a real imatrix row with the data-free one: 'real' (prefer real), 'product'
    (geometric mix: sqrt(real_n * free_n), both normalised to mean 1)."""
    if real is None:
        return free
    if free is None or how == "real":
        return real
    r = real / max(float(real.mean()), 1e-30)
    f = free / max(float(free.mean()), 1e-30)
    return np.sqrt(np.maximum(r, 0) * np.maximum(f, 0)).astype(np.float32)
