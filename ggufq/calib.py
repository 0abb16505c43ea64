"""Self-calibration through llama.cpp: the model writes its own calibration text, with no user
data, and the input moments of its matrices are collected while it writes.

Error-feedback rounding (:mod:`ggufq.quant.gptq`) needs each matrix's input second moment
``E[x x^T]``; the text is sampled from the model itself (temperature 1, from BOS), 64 x 512
tokens by default (why, with the measurements: docs/HQQ.md). :func:`self_calibrate`:

1. writes the model as a temporary F16 GGUF (BF16 when the source matrices are BF16, Q8_0 from
   :data:`Q8_PARAMS` parameters up: :func:`temp_type`) with ggufq's own streaming writer, in a temporary folder beside the output;
2. runs :mod:`ggufq.calib_worker` (llama-cpp-python, CPU or ``gpu_layers`` on a GPU build) in a
   child process: it samples ``n_seq`` sequences of ``n_tok`` tokens, decoded together in one
   batch (seeded: files are reproducible), and llama.cpp's graph-evaluation callback hands it
   the input of every matrix multiplication with a weight; it sums ``X^T X`` (the diagonal only
   for ``ffn_down``: its full moment is ``n_ff^2`` and did not pay) in float64 into a
   memory-mapped scratch file beside the output;
3. removes the temporary GGUF; the writer then asks :class:`SelfCalibration` for each tensor's
   weights in file order: a :class:`~ggufq.quant.gptq.Hessian` (one shared input at a time is
   factored and kept, and the next one is factored ahead on a thread while the encoders work:
   :meth:`SelfCalibration.prefetch`) or the diagonal. :meth:`SelfCalibration.close` removes the scratch.

Nothing here is per architecture: weights sharing an input (q/k/v, gate/up) are found from
the graph (they read the same graph tensor), so every arch llama.cpp runs is calibrated.
Memory: the worker holds the KV cache (``kv_bytes``, rounds of sequences beyond it), the
buffered inputs (``buffer_bytes``) and the scratch's pages it touches; the scratch file is
``8 * sum(n^2)`` bytes over the distinct full inputs (sizes measured: docs/HQQ.md).
Failures (no llama-cpp-python, a build that cannot load, a full disk, Ctrl-C) raise
:class:`~ggufq.GgufqError` or propagate the interrupt, with the worker killed and reaped and
the temporary folder removed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import GgufqError, blas

N_SEQ, N_TOK = 64, 512
KV_BYTES = 2 << 30           # f16 KV cache of the sequences decoded together
BUFFER_BYTES = 512 << 20     # full-moment inputs buffered before they are folded into the sums (>= 1024 rows)
Q8_PARAMS = 1_000_000_000    # the temporary model is Q8_0 from here up, else F16
SMALL_FACTOR = 1024         # Hessians up to this size are factored on one BLAS thread
DIAG_ONLY = ("ffn_down",)    # GGUF tensor roles whose moment is the diagonal only ...
# ... unless the matrix is planned at one of these types (error feedback into blocks of under 8 bits, with the
# refits of quant.kq_refit / quant.scale_refit) and its inputs are at most FULL_DOWN_MAX wide (the scratch holds
# n^2 float64s per layer: 128 MiB at 4096, and one more factorization). Paired KLD with the full moment:
# tinyllama IQ2_M 0.2931 -> 0.2774, Q4_K_M 0.02699 -> 0.02679; SmolLM2 IQ4_XS (whose IQ4_XS blocks are the
# ffn_downs alone) 0.1401 -> 0.1261
FULL_DOWN_TYPES = frozenset(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                             "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"))
FULL_DOWN_MAX = 4096
# An expert routed fewer tokens than this gets the data-free importance instead of its moments: a mean
# of x^2 over n Gaussian-like samples is off by ~sqrt(2 / n) per column (35% at 16), more on heavy tails.
FEW_EXPERT_TOKENS = 16
_ENTRY = "import llama_cpp; from ggufq.calib_worker import main; main()"
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def missing_message() -> str:
    return ("self-calibration (--method hqq) runs the model with llama-cpp-python, which is not installed: "
            "pip install 'ggufq[eval]', or pass --calib-tokens 0 for the data-free method")


def check_rpc(servers: Sequence[str]) -> None:
    """One line unless every ``--rpc`` entry is ``HOST:PORT`` that accepts a connection and the llama.cpp
    libraries (llamalib's folder: llama-cpp-python's, or ``$LLAMA_CPP_LIB_PATH``) have the RPC backend
    (``libggml-rpc``; the worker checks the registry itself too)."""
    import glob
    for s in servers:
        host, sep, port = s.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise GgufqError(f"--rpc {s}: expected HOST:PORT (of a running ggml-rpc-server)")
    from . import llamalib
    try:
        d = llamalib.lib_dir()
    except RuntimeError as e:
        raise GgufqError(str(e)) from None
    if not glob.glob(os.path.join(d, "libggml-rpc.*")):
        raise GgufqError(f"--rpc: the llama.cpp libraries in {d} have no RPC backend (no libggml-rpc); build them "
                         "with tools/build_rpc.sh and set LLAMA_CPP_LIB_PATH to its folder")
    import socket
    for s in servers:           # llama.cpp aborts the worker on a server it cannot reach: one line here instead
        host, _, port = s.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
                pass
        except OSError as e:
            raise GgufqError(f"--rpc {s}: cannot connect ({e.strerror or type(e).__name__}); start "
                             f"`ggml-rpc-server -H HOST -p PORT` there (tools/build_rpc.sh builds it)") from None


def start_token(vocab) -> int:
    """BOS where the tokenizer adds one, else the token that separates pretraining documents:
    ``<|endoftext|>`` when the vocabulary has it (an instruct model's EOS is often its
    end-of-turn token, which starts chat-shaped text), else EOS."""
    sp = getattr(vocab, "special", None)
    ids = dict(getattr(sp, "special_token_ids", {}) or {})
    add = dict(getattr(sp, "add_special_token", {}) or {})
    if ids.get("bos") is not None and add.get("bos", True):
        return int(ids["bos"])
    tokens = getattr(vocab, "tokens", None) or []
    for name in (b"<|endoftext|>", "<|endoftext|>"):
        if name in tokens:
            return tokens.index(name)
    for k in ("eos", "bos"):
        if ids.get(k) is not None:
            return int(ids[k])
    return 0


def full_down(tensors, types: dict) -> frozenset:
    """The DIAG_ONLY matrices that get a full moment all the same: planned (``types``: name -> GGML type
    name) at a FULL_DOWN_TYPES type (not F16, Q8_0, TQ*, MXFP4), with rows at most FULL_DOWN_MAX long."""
    return frozenset(t.name for t in tensors if _role_diag(t.name) and len(t.shape) == 2
                     and types.get(t.name) in FULL_DOWN_TYPES and t.row_len <= FULL_DOWN_MAX)


def wanted(tensors, full: frozenset = frozenset()) -> dict[str, str]:
    """GGUF matrices whose inputs are collected: name -> "full" | "diag" (``full``: DIAG_ONLY matrices
    that get a full moment, :func:`full_down`). The token embedding is a lookup (no input), also when
    the output matrix is tied to it."""
    out = {}
    for t in tensors:
        if len(t.shape) == 3 and "_exps." in t.name:     # stacked experts: llama.cpp's MUL_MAT_ID
            out[t.name] = "experts"
            continue
        if len(t.shape) != 2 or t.name.startswith("token_embd."):
            continue
        out[t.name] = "diag" if _role_diag(t.name) and t.name not in full else "full"
    return out


class SelfCalibration:
    """The moments the worker collected (the scratch file, read per tensor), handed out per
    GGUF tensor; a :class:`~ggufq.quant.gptq.Hessian` for full moments, the diagonal otherwise."""

    def __init__(self, tmpdir: Path, index: dict, tokens: np.ndarray, stats: dict):
        self.tmpdir = tmpdir
        self.index = index
        self.tokens = tokens
        self.stats = stats
        scratch = tmpdir / "moments.f64"
        # read with pread into fresh arrays, not through a mapping: the pages of a mapped 1.5 GB scratch
        # (a 1B model) stayed resident in this process once read (measured: parent peak RSS 1694 MiB for
        # a 1B IQ2_M, 335 MiB at 0.25B), where a read copy is freed with the array
        self._fd = os.open(scratch, os.O_RDONLY) if index["scratch_bytes"] else None
        self.count = int(index["count"])
        # factored Hessians by (input key, damp, group, unit, keep_h), in the order asked for: the one in use and the
        # next one, factored ahead on one thread (LAPACK releases the GIL) while the writer waits on encoders
        self._hessians: dict[tuple, "Future"] = {}
        self._lock = threading.Lock()
        self._factor_pool: Optional[ThreadPoolExecutor] = None
        self.fallback: dict[str, np.ndarray] = {}

    def use_data_free(self, free: dict) -> None:
        """Data-free importance (``ggufq.importance``, ``[n_expert * cols]`` per stacked expert tensor) for
        the experts that got fewer than FEW_EXPERT_TOKENS tokens; other tensors' entries are ignored."""
        self.fallback = {k: np.asarray(v, np.float32) for k, v in free.items()
                         if self.key(k) is not None and self.index["keys"][self.key(k)][2] == "experts"}

    def _read(self, o: int, count: int) -> np.ndarray:
        """float64 ``[count]`` from element ``o`` of the scratch, a fresh writable array."""
        a = np.empty(count, np.float64)
        view, pos = memoryview(a).cast("B"), 0
        while pos < view.nbytes:
            got = os.preadv(self._fd, [view[pos:]], 8 * o + pos)
            if got <= 0:
                raise GgufqError(f"the moment scratch ended early (element {o}, {count})")
            pos += got
        return a

    def _diagonal(self, o: int, n: int) -> np.ndarray:
        """The diagonal of the ``n x n`` sums at element ``o``: n small reads, not the n^2 matrix."""
        fd, out = self._fd, np.empty(n, np.float64)
        for i in range(n):
            out[i] = np.frombuffer(os.pread(fd, 8, 8 * (o + i * (n + 1))), np.float64)[0]
        return out

    # ---- moments -----------------------------------------------------------------------
    def _diag_only(self, name: str) -> bool:
        """``name`` asked for its moment's diagonal only (a DIAG_ONLY role not in the calibration's ``full``)."""
        w = self.index.get("wanted")
        return w.get(name) == "diag" if w is not None else _role_diag(name)

    def key(self, name: str) -> Optional[str]:
        return self.index["weight_key"].get(name)

    def covers(self, name: str) -> bool:
        return self.key(name) is not None

    def moment(self, name: str) -> Optional[np.ndarray]:
        """E[x x^T] [n, n] (float64, read from the scratch) or E[x^2] [n] of ``name``'s inputs; for
        stacked experts E[x^2] per expert over the tokens routed to it, [n_expert * n]; an expert that got
        fewer than FEW_EXPERT_TOKENS: its data-free importance (:meth:`use_data_free`) scaled to the mean of
        the well-sampled experts' moments (only ratios within an expert's vector steer its rows; the level
        keeps the allocator's predicted losses comparable), or without one, when it got none, ones (as llama-quantize reads
        a zero count)."""
        k = self.key(name)
        if k is None or not self.count:
            return None
        off, n, kind = self.index["keys"][k]
        o = off // 8
        if kind == "experts":
            # float32 sums / float32 counts: what llama-quantize (ggufq.imatrix) makes of the saved file
            c = np.asarray(self.index["expert_counts"][k], np.float32)
            sums = self._read(o, n * c.size).astype(np.float32).reshape(c.size, n)
            m = np.where(c[:, None] > 0, sums / np.maximum(c, 1)[:, None], np.float32(1))
            free, few = self.fallback.get(name), c < FEW_EXPERT_TOKENS
            if free is not None and few.any() and free.size == m.size:
                free = free.reshape(m.shape)
                ok = ~few
                level = float(m[ok].mean()) if ok.any() else (float(sums.sum() / c.sum() / n) if c.sum() else 1.0)
                scaled = free * (np.float32(level) / np.maximum(free.mean(axis=1, keepdims=True), np.float32(1e-30)))
                m = np.where(few[:, None], scaled, m).astype(np.float32)
            return m.reshape(-1)
        if kind == "full":
            if self._diag_only(name):
                return self._diagonal(o, n) / self.count
            m = self._read(o, n * n).reshape(n, n)
            m /= self.count
            return m
        return self._read(o, n) / self.count

    def lazy(self, name: str, imatrix: Optional[np.ndarray] = None, damp: Optional[float] = None, group: int = 0,
             unit: int = 1, keep_h: bool = True) -> "LazyWeights":
        """A callable the writer runs when it reaches ``name`` (``damp``: GPTQ damping, default gptq.DAMP;
        ``group``, ``unit``: the encoder's sweep order, gptq.sweep_order; ``keep_h``: the encoder refits
        scales against the moment itself, gptq.Hessian.from_moment); its ``prefetch`` starts the
        factorization early."""
        return LazyWeights(self, name, imatrix, damp, group, unit, keep_h)

    def _hessian_key(self, name: str, damp, group: int, unit: int, keep_h: bool = True) -> Optional[tuple]:
        """The factorization ``name`` needs, or None (no full moment: the diagonal, or nothing)."""
        k = self.key(name)
        if k is None or not self.count or self.index["keys"][k][2] != "full" or self._diag_only(name):
            return None
        return (k, damp, group, unit, keep_h)

    def _factor(self, name: str, damp, group: int, unit: int, keep_h: bool = True):
        from .quant.gptq import Hessian
        m = self.moment(name)
        # below ~1k inputs BLAS threads do not pay: on a busy machine they spin (SmolLM2's 576:
        # 0.44 CPU-s with 2 threads vs 0.036 s with one, per factorization)
        with blas.threads(1) if len(m) <= SMALL_FACTOR else contextlib.nullcontext():
            h = Hessian.from_moment(m, damp, group, unit, keep_h)
        h.spill = str(self.tmpdir)      # to encoder processes as a mapped file, not a pickled copy
        return h

    def prefetch(self, name: str, damp=None, group: int = 0, unit: int = 1, keep_h: bool = True) -> None:
        """Start factoring ``name``'s Hessian on a thread (no-op when it is done or under way, or needs none)."""
        hk = self._hessian_key(name, damp, group, unit, keep_h)
        if hk is None:
            return
        with self._lock:
            if hk in self._hessians:
                return
            if self._factor_pool is None:
                self._factor_pool = ThreadPoolExecutor(1, thread_name_prefix="ggufq-factor")
            self._hessians[hk] = self._factor_pool.submit(self._factor, name, damp, group, unit, keep_h)

    def weights(self, name: str, imatrix: Optional[np.ndarray] = None, damp: Optional[float] = None, group: int = 0,
                unit: int = 1, keep_h: bool = True):
        """``name``'s imatrix (write.Imatrix): a Hessian from full moments (its diag replaced by ``imatrix``
        when given), the moment diagonal otherwise; ``imatrix`` itself where the sample never reached it.
        Factorizations asked for before this one are dropped (the writer goes in file order), and so is
        one started ahead for another tensor when this one was not the one started."""
        hk = self._hessian_key(name, damp, group, unit, keep_h)
        if hk is None:
            m = self.moment(name)        # None, or a diagonal / per-expert diagonals
            return imatrix if m is None or imatrix is not None else m.astype(np.float32)
        with self._lock:
            keys = list(self._hessians)
            done = keys[:keys.index(hk)] if hk in keys else keys
            for old in done:
                self._hessians.pop(old).cancel()
            fut = self._hessians.get(hk)
        if fut is None:
            fut = Future()
            fut.set_result(self._factor(name, damp, group, unit, keep_h))
            with self._lock:
                self._hessians[hk] = fut
        h = fut.result()
        # an --imatrix file's entry picks the block scales; the moment steers the rounding
        return h if imatrix is None else dataclasses.replace(h, diag=np.asarray(imatrix, np.float32))

    def importance(self, name: str) -> Optional[np.ndarray]:
        """float32 E[x_j^2] of ``name``'s inputs (an imatrix entry for the k-quant/i-quant encoders),
        or None when the sample never reached it."""
        k = self.key(name)
        if k is not None and self.count and self.index["keys"][k][2] == "full":
            off, n, _ = self.index["keys"][k]
            return (self._diagonal(off // 8, n) / self.count).astype(np.float32)    # n reads, not n^2
        m = self.moment(name)
        if m is None:
            return None
        return m.astype(np.float32)

    def diagonals(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per weight: (column sums of squared inputs [n_mat, n] float64, token counts [n_mat]) -- an
        imatrix's ``in_sum2`` and ``counts``; ``n_mat`` is the expert count of a stacked tensor, else 1."""
        out = {}
        for w, k in self.index["weight_key"].items():
            off, n, kind = self.index["keys"][k]
            o = off // 8
            if kind == "experts":
                c = np.asarray(self.index["expert_counts"][k], np.float64)
                out[w] = (self._read(o, n * c.size).reshape(c.size, n), c)
                continue
            d = self._diagonal(o, n) if kind == "full" else self._read(o, n)
            out[w] = (d.reshape(1, n), np.array([float(self.count)]))
        return out

    def expert_tokens(self) -> Optional[tuple[int, int, int, int]]:
        """(stacked expert tensors' experts that got no token, that got fewer than FEW_EXPERT_TOKENS,
        experts in all, routed tokens) or None; counted per distinct input (gate and up share one)."""
        cs = [np.asarray(v) for v in self.index.get("expert_counts", {}).values()]
        if not cs:
            return None
        return (sum(int((c == 0).sum()) for c in cs), sum(int((c < FEW_EXPERT_TOKENS).sum()) for c in cs),
                sum(c.size for c in cs), int(sum(c.sum() for c in cs)))

    # ---- report ------------------------------------------------------------------------
    def summary(self) -> str:
        n, t = self.tokens.shape
        s = self.stats
        tm = s.get("times", {})
        return (f"self-calibration: {n}x{t} tokens generated and input moments collected in "
                f"{s['seconds']:.1f} s by llama.cpp ({'GPU' if s.get('offload') else 'CPU'}, {s['n_par']} sequences "
                f"per batch; decode {tm.get('decode', 0):.1f} s, sampling {tm.get('sample', 0):.1f} s, "
                f"moment sums {tm.get('sums', 0):.1f} s; CPU-s {tm.get('cpu_decode', 0):.1f} / "
                f"{tm.get('cpu_sample', 0):.1f} / {tm.get('cpu_sums', 0):.1f}); temporary {s['model_type']} model {_mib(s['model_bytes'])} written in "
                f"{s['model_seconds']:.1f} s, moment scratch {_mib(s['scratch_bytes'])}; peak RSS: "
                f"{self.peak_rss_line()}" + self._experts_line())

    def _experts_line(self) -> str:
        e = self.expert_tokens()
        if e is None:
            return ""
        idle, few, total, _ = e
        line = f"; experts: per-expert diagonal moments (MUL_MAT_ID) over {total} expert slots"
        if not self.fallback:
            return line + f", {idle} got no token: weighted uniformly"
        keys = {self.key(w) for w in self.fallback}
        fb = sum(int((np.asarray(c) < FEW_EXPERT_TOKENS).sum())
                 for k, c in self.index["expert_counts"].items() if k in keys)
        if not few:
            return line + f", each got at least {FEW_EXPERT_TOKENS} tokens"
        line += f", {few} got fewer than {FEW_EXPERT_TOKENS} tokens ({idle} none)"
        return line + (f": data-free importance for {fb} of them" if fb < few else ": data-free importance for those")

    def peak_rss_line(self) -> str:
        return f"worker {_mib(self.stats['worker_rss'])}, ggufq {_mib(_peak_rss())}"

    def close(self) -> None:
        with self._lock:
            for fut in self._hessians.values():
                fut.cancel()
            self._hessians.clear()
            pool, self._factor_pool = self._factor_pool, None
        if pool is not None:
            pool.shutdown(wait=True)      # a factorization under way ends in seconds; none is left running
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _role_diag(name: str) -> bool:
    return any(f".{r}." in f".{name}" for r in DIAG_ONLY)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def temp_type(prepared) -> str:
    """The temporary model's type: Q8_0 from :data:`Q8_PARAMS` up; below, BF16 when every source
    matrix is BF16 (the weights exactly, and llama.cpp's BF16 matmuls are faster on the CPU: SmolLM2's
    calibration decode 3.37 vs 4.58 ms/token, one AVX-512 thread, docs/CALIB_SPEED.md), else F16."""
    if prepared.n_params >= Q8_PARAMS:
        return "Q8_0"
    mats = [t.dtype for t in prepared.model if len(t.shape) >= 2]
    return "BF16" if mats and all(d == "BF16" for d in mats) else "F16"


def write_temp_model(prepared, add_metadata, path: Path, jobs: int, progress: bool) -> tuple[str, int]:
    """The model as :func:`temp_type` at ``path`` with ggufq's writer; (type, bytes)."""
    from .convert import make_plan
    from .write import Job, write_gguf
    ftype = temp_type(prepared)
    plan = make_plan(prepared, ftype)
    by = {e.name: e.qtype for e in plan.entries}
    jl = [Job(t, by[t.name]) for t in prepared.tensors]
    with prepared.model:
        paths = write_gguf(path, prepared.arch.name, functools.partial(add_metadata, plan), jl, n_jobs=jobs,
                           progress=progress, label=f"calibration model {ftype}", final=False)
    return ftype, sum(p.stat().st_size for p in paths)


def self_calibrate(prepared, vocab, add_metadata, out: Path, n_tokens: int = N_SEQ * N_TOK, *,
                   seq_len: int = N_TOK, seed: int = 0, temperature: float = 1.0, jobs: int = 1,
                   gpu_layers: Optional[int] = 0, kv_bytes: int = KV_BYTES, buffer_bytes: int = BUFFER_BYTES,
                   progress: bool = True, tokens: Optional[np.ndarray] = None, rpc: Sequence[str] = (),
                   full: frozenset = frozenset()) -> SelfCalibration:
    """Sample ``n_tokens`` (in sequences of ``seq_len``) with llama.cpp and collect the moments.

    ``add_metadata(plan, writer)`` writes the GGUF header keys (convert's). The temporary folder
    is created beside ``out`` and removed on any failure, or by ``SelfCalibration.close()``.
    ``tokens`` [n_seq, seq_len]: decode these instead of sampling (moments of a given text).
    ``rpc``: ``HOST:PORT`` of llama.cpp rpc-servers that hold the offloaded layers (``gpu_layers``; the
    libraries need the RPC backend: :func:`check_rpc`); the moments still accumulate here.
    ``full``: DIAG_ONLY matrices that get a full moment (:func:`full_down`).

    Long because the temporary model, the worker process and its scratch share one cleanup."""
    from .progress import Progress
    if not available():
        raise GgufqError(missing_message())
    if rpc:
        check_rpc(rpc)
    n_seq = max(1, n_tokens // seq_len)
    if tokens is not None:
        tokens = np.asarray(tokens)
        n_seq, seq_len = tokens.shape
    out = Path(out)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.calib-", dir=out.parent))
    proc = None
    try:
        t0 = time.monotonic()
        model = tmpdir / "calibration-model.gguf"
        try:
            mtype, mbytes = write_temp_model(prepared, add_metadata, model, jobs, progress)
        except GgufqError as e:
            raise GgufqError(f"self-calibration: {e}") from None
        t_model = time.monotonic() - t0
        req = {"model": str(model), "gpu_layers": gpu_layers, "threads": jobs, "n_seq": n_seq, "n_tok": seq_len,
               "seed": seed, "temperature": temperature, "start": start_token(vocab),
               "scratch": str(tmpdir / "moments.f64"), "kv_bytes": kv_bytes, "buffer_bytes": buffer_bytes,
               "weights": wanted(prepared.tensors, full), "tokens": None if tokens is None else tokens.tolist(),
               "rpc": list(rpc)}
        from .eval import proto
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(jobs)         # the moment sums use as many cores as llama.cpp, not all of them
        # llama.cpp's CPU backend (OpenMP builds) keeps its threads spinning between graph computes;
        # the moment callback splits every decode into ~4 computes per layer with Python in between,
        # and a spinning thread whose peer is descheduled burns its core: SmolLM2 64x32 tokens at -j 2
        # on a loaded 2-core machine, decode 101.8 CPU-s spinning vs 8.9 passive (docs/CALIB_SPEED.md)
        env.setdefault("OMP_WAIT_POLICY", "passive")
        from .procs import deferred, spawn_helper
        with deferred():               # a signal during the fork is raised after proc is known (and killed)
            proc = spawn_helper([sys.executable, "-c", _ENTRY], env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                bufsize=0)
        proto.send(proc.stdin, req)
        bar = None
        try:
            while True:
                try:
                    msg, arr = proto.recv(proc.stdout)
                except proto.ProtocolEOF:
                    rc = proc.wait()
                    raise GgufqError(f"self-calibration: the llama-cpp-python worker died (exit code {rc})"
                                     + _why_died(rc)) from None
                if not (isinstance(msg, tuple) and msg[0] in ("start", "progress")):
                    break
                if msg[0] == "start":
                    bar = Progress(msg[1], f"self-calibration ({n_seq}x{seq_len} tokens, llama.cpp, "
                                           f"{msg[2]} at a time)", n_items=msg[1], enabled=progress).__enter__()
                elif bar is not None:
                    bar.advance(1, items=1)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
        if "error" in msg:
            err = msg["error"]
            if "No space left" in err or "ENOSPC" in err or f"[Errno {errno.ENOSPC}]" in err:
                raise GgufqError(f"self-calibration: disk full in {out.parent} (the moment scratch needs "
                                 f"{_scratch_estimate(req['weights'], prepared)}); nothing was left behind")
            raise GgufqError(f"self-calibration: {err}")
        proc.wait()
        proc = None
        model.unlink()
        stats = dict(msg)
        stats.update(model_type=mtype, model_bytes=mbytes, model_seconds=t_model,
                     worker_rss=msg.get("peak_rss", 0))
        msg["wanted"] = req["weights"]
        return SelfCalibration(tmpdir, msg, arr, stats)
    except BaseException:
        from .procs import deferred
        with deferred(raise_at_exit=False):
            if proc is not None:
                _kill(proc)
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _why_died(rc) -> str:
    if rc is not None and rc < 0:
        import signal
        try:
            return f", {signal.Signals(-rc).name}: a llama-cpp-python build that cannot run here?"
        except ValueError:
            pass
    return ""


def _scratch_estimate(weights: dict, prepared) -> str:
    return "up to " + _mib(8 * sum(t.row_len ** 2 if weights.get(t.name) == "full" else t.shape[0] * t.row_len
                                   for t in prepared.tensors if weights.get(t.name) in ("full", "experts")))


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
    except OSError:
        pass
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass


def save_imatrix(cal: SelfCalibration, path: os.PathLike | str, dataset: str) -> int:
    """Write the diagonal of the self-generated moments as a GGUF imatrix in llama-imatrix's format
    (``<name>.in_sum2`` column sums of squares and ``<name>.counts`` token counts, sorted names,
    ``imatrix.datasets/chunk_count/chunk_size``); returns the number of entries."""
    import gguf
    path = Path(path)
    n_seq, n_tok = cal.tokens.shape
    w = gguf.GGUFWriter(None, "imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)     # llama-imatrix writes no architecture
    w.add_type("imatrix")
    w.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, n_seq)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, n_tok)
    diags = cal.diagonals()
    for name in sorted(diags):
        sums, counts = diags[name]      # stacked experts: one row and one count per expert, as llama-imatrix
        w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        w.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GgufqError(f"{path}: cannot write the imatrix ({e.strerror})") from None
    return len(diags)


def calibrate_folder(model_dir: os.PathLike | str, where: os.PathLike | str, n_tokens: int = N_SEQ * N_TOK,
                     **kw) -> SelfCalibration:
    """:func:`self_calibrate` for a model folder, the temporary folder in ``where`` (tests, tools/)."""
    from . import vocab as vocabs
    from .convert import metadata_for, prepare, write_header
    p = prepare(model_dir)
    vocab = vocabs.load(p.model.path, p.model.config)
    return self_calibrate(p, vocab, functools.partial(write_header, p, metadata_for(p), vocab),
                          Path(where) / "calibrated.gguf", n_tokens, **kw)


class LazyWeights:
    """A writer job's importance, computed when the writer reaches the tensor (``__call__``, in file
    order) and factored ahead on a thread when the writer reaches the tensor before it (``prefetch``).
    ``factor_key``: which factorization it needs (None: none), so the writer can look for the next one."""

    def __init__(self, cal: SelfCalibration, name: str, imatrix, damp, group: int, unit: int, keep_h: bool = True):
        self.cal, self.name, self.imatrix, self.damp = cal, name, imatrix, damp
        self.group, self.unit, self.keep_h = group, unit, keep_h
        self.factor_key = cal._hessian_key(name, damp, group, unit, keep_h)

    def __call__(self):
        return self.cal.weights(self.name, self.imatrix, self.damp, self.group, self.unit, self.keep_h)

    def prefetch(self) -> None:
        self.cal.prefetch(self.name, self.damp, self.group, self.unit, self.keep_h)
