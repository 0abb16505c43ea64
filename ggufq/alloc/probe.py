"""Measured sensitivity per layer group: a short KL-divergence probe through llama-cpp-python.

``tr(E H E^T)`` says how much a tensor's output moves, not how much the model's prediction does:
a layer near the output, the embedding, or attention against MLP weigh differently. For every
group (:func:`ggufq.alloc.loss.group_of`) the probe quantizes that group alone to ``PROBE_TYPE``
in an otherwise F16 model (the dequantized weights written in place into one F16 file, restored
afterwards), runs llama.cpp on a few of the model's own self-calibration sequences and measures the
mean KLD against the F16 model's logits. The group's scale is that KLD over the group's summed
``tr(E H E^T)`` of the same encoding (whole tensors): predicted KLD = scale x output error.
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
PROBE_SEQS = 2            # self-calibration sequences the probe decodes (the second half of each is scored)
FLOOR = 1e-6              # KLD below this is noise: the group's scale uses this floor


@dataclass
class ProbeResult:
    scales: dict[str, float]                       # group -> KLD per unit of tr(E H E^T)
    kld: dict[str, float]                          # group -> measured mean KLD at PROBE_TYPE
    error: dict[str, float]                        # group -> tr(E H E^T) of the whole tensors at PROBE_TYPE
    n_tokens: int = 0
    seconds: float = 0.0
    rows: list = field(default_factory=list)       # (tensor, full error) at PROBE_TYPE (validates the row sample)


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


def probe(p, groups: dict[str, list], weights_of: Callable, moment_of: Callable, tokens: np.ndarray,
          add_metadata: Callable, workdir: Path, *, jobs: int = 1, log: Optional[Callable] = None,
          probe_type: T = PROBE_TYPE, fresh: bool = False) -> ProbeResult:
    """Measure every group's scale. ``weights_of(name)``: the importance the encoder gets;
    ``moment_of(name)``: H for the output error; ``tokens`` [n_seq, n_ctx] the text decoded;
    ``fresh``: a new llama.cpp process per group (what the shared one is checked against in the tests).

    Long because one llama.cpp process and one patched F16 file live through every group's patch/measure/restore, in one try/finally."""
    import tempfile

    from ..plan import rules as R
    t0 = time.monotonic()
    tokens = np.asarray(tokens)[:PROBE_SEQS]
    tmp = Path(tempfile.mkdtemp(prefix=".ggufq-probe-", dir=workdir))
    path = tmp / "probe-F16.gguf"
    res = ProbeResult({}, {}, {})
    worker = None
    try:
        where = write_f16(p, add_metadata, path, jobs)
        # one llama.cpp process for every group: it maps the F16 file and reads the weights from the
        # page cache, so the bytes patched into the file are what it computes with (a CPU backend
        # uses F16 weights in place); checked below, else each group gets a fresh process
        worker = _open(path, tokens.shape[1], jobs)
        ref = _logits(worker, tokens)
        with p.model:
            for g, ts in groups.items():
                saved, err = [], 0.0
                with open(path, "r+b") as f:
                    for t in ts:
                        off, nb, tt = where[t.name]
                        if tt not in (T.F16, T.F32):
                            raise GgufqError(f"probe: {t.name} is {tt.name} in the F16 model")
                        w = t.read(0, t.n_rows).astype(np.float32)
                        qt, _ = R.fallback(probe_type, t.row_len)
                        from gguf.quants import dequantize
                        wts = weights_of(t.name)
                        d = dequantize(quant.encode(qt, w, wts if wts is not None and np.ndim(wts) == 1 else None),
                                       qt).reshape(w.shape)
                        e = output_error(d - w, moment_of(t.name))
                        res.rows.append((t.name, e))
                        err += e
                        f.seek(off)
                        saved.append((off, f.read(nb)))
                        f.seek(off)
                        f.write(d.astype(np.float16 if tt == T.F16 else np.float32).tobytes())
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
                res.kld[g], res.error[g] = kld, err
                res.scales[g] = max(kld, FLOOR) / err if err > 0 else 0.0
                if log is not None:
                    log(f"probe {g}: {probe_type.name} KLD {kld:.5f}, output error {err:.4g}")
        worker.close()
    finally:
        import shutil
        if worker is not None:
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res.n_tokens = int(tokens.shape[0] * (tokens.shape[1] - 1 - tokens.shape[1] // 2))
    res.seconds = time.monotonic() - t0
    return res
