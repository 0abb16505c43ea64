"""Measured sensitivity: a short KL-divergence probe through llama-cpp-python.

``tr(E H E^T)`` says how much a tensor's output moves, not how much the model's prediction does:
a layer near the output, the embedding, attention's value/output against its query/key, an MLP's
down projection against its gate weigh differently per unit of output error. The probe perturbs a
set of tensors to ``PROBE_TYPE`` (their dequantized weights written in place into one F16 file,
restored afterwards), runs llama.cpp on a few of the model's own self-calibration sequences and
measures the mean KLD against the F16 model's logits. The sets (:data:`PROBE_SETS`): every free
tensor alone, its scale its KLD over its output error at the probe type; or every layer
(:func:`probe_group`; the embedding and the output on their own) and every role (``attn_v``,
``ffn_down`` ... in all layers at once), which :func:`fit_scales` turns into ``s[layer] * c[role]``
(fewer sets: L + 2 + roles instead of one per tensor). By default (``"auto"``) a set per tensor where
their decoded tokens together stay within the self-calibration's (tinyllama: 58 sets x 512 tokens
within 32768), the layer and role sets beyond (SmolLM2's 212 tensors would decode 108k tokens, 3.3x
the calibration: 471 CPU-s of probe against its 2048-token calibration's 30). Predicted KLD = scale x output error.
Layer tensors are perturbed in the rows the error table already encoded (no second encoding);
the embedding and output whole (their rows are tokens, not interchangeable).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from .. import GgufqError, quant
from .loss import output_error

PROBE_TYPE = T.Q2_K
PROBE_SEQS = 1            # self-calibration sequences the probe decodes per set (the second half is scored)
PROBE_SETS = "auto"       # "tensor": every free tensor alone; "layer": every layer and every role, fitted
                          # s[layer] x c[role]; "auto": "tensor" while its tokens fit the calibration's


def choose_sets(sets: str, n_free: int, tokens_per_set: int, calib_tokens: int) -> str:
    """``"auto"`` -> ``"tensor"`` when one set per free tensor decodes no more tokens than the
    self-calibration did (the probe then costs at most about a calibration pass), else ``"layer"``."""
    if sets != "auto":
        return sets
    return "tensor" if n_free * tokens_per_set <= calib_tokens else "layer"
FLOOR = 1e-6              # KLD below this is noise: the group's scale uses this floor


@dataclass
class ProbeResult:
    scales: dict[str, float]                       # tensor -> KLD per unit of tr(E H E^T)
    kld: dict[str, float]                          # group or 'role:R' -> measured mean KLD at PROBE_TYPE
    error: dict[str, float]                        # group -> tr(E H E^T) of the whole tensors at PROBE_TYPE
    n_tokens: int = 0
    probe_type: T = PROBE_TYPE
    seconds: float = 0.0
    rows: list = field(default_factory=list)       # (tensor, error of what was perturbed) at PROBE_TYPE
    whole: set = field(default_factory=set)        # tensors perturbed whole (their row validates the row sample)
    sets: str = "tensor"                           # "tensor": one set per tensor; "layer": layers and roles


def _open(path: Path, n_ctx: int, threads: int):
    from ..eval import Worker
    w = Worker(path, "probe")
    try:
        w.info = w.call("load", {"path": str(path), "gpu_layers": 0})[0]
        w.call("context", {"n_ctx": n_ctx, "threads": threads})
    except BaseException:
        w.close()
        raise
    return w


def _logits(w, tokens: np.ndarray) -> list[np.ndarray]:
    n_ctx = tokens.shape[1]
    out = []
    for seq in tokens:
        _, lg = w.call("eval", {"first": n_ctx // 2, "last": n_ctx - 1}, np.ascontiguousarray(seq))
        out.append(np.array(lg, np.float32))
    return out


def _mean_kld(logits: list, ref: list, tokens: np.ndarray) -> float:
    from ..eval.stats import token_scores
    n_ctx = tokens.shape[1]
    ks = [token_scores(lg, seq[n_ctx // 2 + 1:], rf).kld for lg, rf, seq in zip(logits, ref, tokens)]
    return float(np.concatenate(ks).mean())


def write_f16(p, add_metadata: Callable, path: Path, jobs: int) -> dict[str, tuple[int, int, T]]:
    """The model as F16 at ``path`` (ggufq's writer); name -> (data offset, bytes, type)."""
    import gguf

    from ..convert import make_plan
    from ..write import Job, write_gguf
    plan = make_plan(p, "F16")
    by = {e.name: e.qtype for e in plan.entries}
    with p.model:
        write_gguf(path, p.arch.name, functools.partial(add_metadata, plan), [Job(t, by[t.name]) for t in p.tensors],
                   n_jobs=jobs, progress=False, label="probe model F16")
    r = gguf.GGUFReader(path)
    out = {t.name: (int(t.data_offset), int(t.n_bytes), T(int(t.tensor_type))) for t in r.tensors}
    del r
    return out


def probe_group(name: str, by_layer: bool = True) -> str:
    """The layer set a tensor is probed in: ``blk.N`` (the whole layer; ``by_layer=False``: its
    attention and MLP apart, :func:`ggufq.alloc.loss.group_of`), or the tensor's own group outside
    the layers. Attention against MLP within a layer is then told apart by the role factors."""
    from .loss import group_of
    g = group_of(name)
    return g.rsplit(".", 1)[0] if by_layer and role_of(name) is not None else g


def role_of(name: str) -> Optional[str]:
    """The role of a layer tensor (``attn_q``, ``ffn_down``, ``ffn_up_exps`` ...); None outside the layers."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 3 else None


def fit_scales(rows: list, group_of: Callable, kld: dict, roles: dict) -> dict[str, float]:
    """Per-tensor scales ``s[group] * c[role]`` from the measured KLDs of the layer groups (``kld[group]``)
    and of the role sets (``kld["role:" + role]``: that role in every layer at once). ``rows``: (tensor,
    whole-tensor output error at the probe type). The role KLDs only fix the roles' relative weights (they
    are rescaled to the groups' total, since one role in every layer is a larger, less additive
    perturbation than one layer), then ``s`` and ``c`` are scaled in turn (RAS / matrix balancing) until
    each group's and each role's predicted KLD matches its measurement."""
    err = dict(rows)
    grp = {n: group_of(n) for n in err}
    rol = {n: role_of(n) if role_of(n) in roles else None for n in err}
    g_kld = {g: max(kld[g], FLOOR) for g in set(grp.values()) if g in kld}
    r_kld = {r: max(kld["role:" + r], FLOOR) for r in roles if "role:" + r in kld}
    layered = {g for n, g in grp.items() if rol[n] is not None}
    tot_g, tot_r = sum(g_kld[g] for g in layered if g in g_kld), sum(r_kld.values())
    if tot_r > 0:
        r_kld = {r: v * tot_g / tot_r for r, v in r_kld.items()}
    c = {r: 1.0 for r in r_kld}
    s: dict = {}
    for _ in range(50):
        for g in g_kld:
            e = sum(err[n] * c.get(rol[n], 1.0) for n in err if grp[n] == g)
            s[g] = g_kld[g] / e if e > 0 else 0.0
        for r in r_kld:
            e = sum(err[n] * s.get(grp[n], 0.0) for n in err if rol[n] == r)
            c[r] = r_kld[r] / e if e > 0 else 1.0
    return {n: s.get(grp[n], 0.0) * c.get(rol[n], 1.0) for n in err}


def product_scales(res: ProbeResult) -> dict[str, float]:
    """Scales ``s[layer] x c[role]`` fitted to a per-tensor probe's measurements (each layer's and each
    role's summed KLD matched, :func:`fit_scales`): what the per-tensor scales add over a layer x role
    model (tools/pareto.py's ablation)."""
    err = dict(res.rows)
    kld: dict = {}
    roles: dict = {}
    for n in err:
        g = probe_group(n)
        kld[g] = kld.get(g, 0.0) + res.kld.get(n, 0.0)
        if role_of(n) is not None:
            kld["role:" + role_of(n)] = kld.get("role:" + role_of(n), 0.0) + res.kld.get(n, 0.0)
            roles[role_of(n)] = []
    return fit_scales(res.rows, probe_group, kld, roles)


def probe(p, groups: dict[str, list], weights_of: Callable, moment_of: Callable, tokens: np.ndarray,
          add_metadata: Callable, workdir: Path, *, jobs: int = 1, log: Optional[Callable] = None,
          probe_type: T = PROBE_TYPE, fresh: bool = False, roles: Optional[dict] = None,
          samples: Optional[dict] = None, seqs: int = PROBE_SEQS, encoder: Optional[Callable] = None,
          ctx: Optional[int] = None) -> ProbeResult:
    """Measure every group's and role's KLD and fit the per-tensor scales (:func:`fit_scales`).
    ``groups``: group -> tensors (one layer's attention, ...); ``roles``: role -> tensors (one role in
    every layer; None: one scale per group); ``weights_of(name)``: the importance the encoder gets;
    ``moment_of(name)``: H for the output error; ``tokens`` [n_seq, n_ctx] the text decoded;
    ``fresh``: a new llama.cpp process per set (what the shared one is checked against in the tests);
    ``samples``: name -> :class:`ggufq.alloc.loss.Sample` at the probe type, the rows the error table
    encoded: such a tensor is perturbed in those rows only (its error is theirs), the others whole;
    ``seqs``: how many of ``tokens``' sequences are decoded; ``encoder``: the method's encoder the
    tensors encoded whole go through with ``weights_of``'s weights (None: the k-quant search); ``ctx``:
    the first ``ctx`` tokens of each sequence only (None: all; the second half is scored).

    Long because one llama.cpp process and two F16 files (the model, its probe-type copy) live through
    every set's patch/measure/restore, in one try/finally."""
    import shutil
    import tempfile

    from gguf.quants import dequantize

    from ..plan import rules as R
    t0 = time.monotonic()
    tokens = np.asarray(tokens)[:seqs, :ctx]
    tmp = Path(tempfile.mkdtemp(prefix=".ggufq-probe-", dir=workdir))
    path, qpath = tmp / "probe-F16.gguf", tmp / "probe-Q.gguf"
    res = ProbeResult({}, {}, {}, probe_type=probe_type)
    sets = dict(groups)
    sets.update({"role:" + r: ts for r, ts in (roles or {}).items()})
    worker = None
    try:
        where = write_f16(p, add_metadata, path, jobs)
        # every free tensor encoded once at the probe type, dequantized into a copy of the F16 file:
        # a set's probe copies its tensors' bytes from there
        shutil.copyfile(path, qpath)
        full: dict = {}
        with p.model, open(qpath, "r+b") as fq:
            for t in {t.name: t for ts in sets.values() for t in ts}.values():
                off, nb, tt = where[t.name]
                if tt not in (T.F16, T.F32):
                    raise GgufqError(f"probe: {t.name} is {tt.name} in the F16 model")
                dt = np.float16 if tt == T.F16 else np.float32
                sm = (samples or {}).get(t.name)
                if sm is not None:      # the table's rows: written run by run
                    full[t.name] = sm.error
                    at = 0
                    for lo, hi in sm.runs:
                        fq.seek(off + lo * t.row_len * np.dtype(dt).itemsize)
                        fq.write(sm.rows[at:at + hi - lo].astype(dt).tobytes())
                        at += hi - lo
                    continue
                w = t.read(0, t.n_rows).astype(np.float32)
                qt, _ = R.fallback(probe_type, t.row_len)
                wts = weights_of(t.name)
                if encoder is None:
                    blocks = quant.encode(qt, w, wts if wts is not None and np.ndim(wts) == 1 else None)
                else:
                    blocks = encoder(qt, w, wts)
                d = dequantize(blocks, qt).reshape(w.shape)
                full[t.name] = output_error(d - w, moment_of(t.name))
                res.whole.add(t.name)
                fq.seek(off)
                fq.write(d.astype(dt).tobytes())
        res.rows = list(full.items())
        # one llama.cpp process for every set: it maps the F16 file and reads the weights from the
        # page cache, so the bytes patched into the file are what it computes with (a CPU backend
        # uses F16 weights in place); checked below, else each set gets a fresh process
        worker = _open(path, tokens.shape[1], jobs)
        ref = _logits(worker, tokens)
        for g, ts in sets.items():
            saved = []
            with open(path, "r+b") as f, open(qpath, "rb") as fq:
                for t in ts:
                    off, nb, _ = where[t.name]
                    f.seek(off)
                    saved.append((off, f.read(nb)))
                    fq.seek(off)
                    f.seek(off)
                    f.write(fq.read(nb))
            try:
                kld = None if fresh else _mean_kld(_logits(worker, tokens), ref, tokens)
                if kld == 0.0:       # this process does not see the patched file: fresh ones from here on
                    fresh = True
                if fresh:
                    w2 = _open(path, tokens.shape[1], jobs)
                    try:
                        kld = _mean_kld(_logits(w2, tokens), ref, tokens)
                    finally:
                        w2.close()
            finally:
                with open(path, "r+b") as f:
                    for off, b in saved:
                        f.seek(off)
                        f.write(b)
            res.kld[g], res.error[g] = kld, sum(full[t.name] for t in ts)
            if log is not None:
                log(f"probe {g}: {probe_type.name} KLD {kld:.5f}, output error {res.error[g]:.4g}")
        worker.close()
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    in_group = {t.name: g for g, ts in groups.items() for t in ts}
    res.sets = "tensor" if all(len(ts) == 1 and ts[0].name == g for g, ts in groups.items()) and not roles else "layer"
    res.scales = fit_scales(res.rows, in_group.get, res.kld, roles or {})
    res.n_tokens = int(tokens.shape[0] * (tokens.shape[1] - 1 - tokens.shape[1] // 2))
    res.seconds = time.monotonic() - t0
    return res
