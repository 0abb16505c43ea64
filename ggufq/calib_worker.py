"""The llama-cpp-python side of self-calibration: sample text from the model and, in the same
decode calls, accumulate the second moments of every weight matrix's inputs.

Started by :func:`ggufq.calib.self_calibrate` as
``python -c "import llama_cpp; from ggufq.calib_worker import main; main()"`` (``llama_cpp``
before NumPy: a CUDA build crashed at model load otherwise, see :mod:`ggufq.eval.worker`).
It reads one request frame (:mod:`ggufq.eval.proto`) on stdin, answers with ``("progress", k)``
frames and one final frame on its original stdout (fd 1 points at stderr, so that C code
cannot corrupt the frames):

* request ``{model, gpu_layers, threads, n_seq, n_tok, seed, temperature, start, scratch,
  kv_bytes, buffer_bytes, weights: {name: "full"|"diag"}, tokens: None | [n_seq][n_tok], rpc: [HOST:PORT]}``
  (``tokens``: decode these instead of sampling; ``rpc``: llama.cpp ``rpc-server`` endpoints whose
  devices take the offloaded layers, as llama.cpp's ``--rpc``: see :func:`add_rpc_servers`)
* reply ``{keys: {key: [offset, n, kind]}, weight_key: {name: key}, count, n_par, offload,
  seconds, scratch_bytes, peak_rss}`` + int32 tokens ``[n_seq, n_tok]``, or ``{"error": msg}``.

Generation: ``n_par`` sequences (as many as ``kv_bytes`` of f16 KV cache holds; rounds for the
rest) are decoded together, one token of each per ``llama_decode`` (several ``seq_id``s in one
``llama_batch``, a KV stream per sequence), and sampled at ``temperature`` by inverse CDF with
one uniform from a per-sequence generator ``default_rng([seed, s])``: the file does not depend
on ``n_par``. Every position (the last one too) is decoded with its logits requested, so every
layer runs on every token.

Moments: llama.cpp's graph-evaluation callback (``cb_eval``, as llama-imatrix) sees each
``MUL_MAT`` whose ``src0`` is a weight named in the request; its ``src1`` (F32, copied to the
host when it lives on a GPU) is the matrix's input. Weights that read the same graph tensor
(q/k/v read ``attn_norm-i``, gate/up read ``ffn_norm-i``) share one moment, keyed by that
tensor's name, so nothing here knows an architecture. Rows of "full" inputs are buffered
(``buffer_bytes``, at least 1024 rows: fewer passes over the n^2 sums) and their float32
``X^T X`` (syrk) is added to float64 sums in a memory-mapped scratch file, the inputs spread over
``threads`` threads of one BLAS thread each (the ``+=`` into the sums is a pass over n^2 float64s
as long as the product itself at 2048 wide: one thread doing it for every input was the sums' wall
time on the GPU); "diag" inputs are summed (squares, float64) at once. With the layers offloaded to
a GPU, a flush is summed on a background thread from a second set of buffers while the next tokens
decode (the GPU waits on nothing), unless the 1024-row minimum already makes a buffer larger than
``buffer_bytes``.

Experts: ``MUL_MAT_ID`` (a stacked ``[n_expert, rows, cols]`` weight, the routed tokens' inputs in
``src1`` ``[cols, n_used or 1, n_tokens]``, the chosen experts in ``src[2]`` ``[n_used, n_tokens]``)
is read as llama-imatrix's ``collect_imatrix`` reads it: the input row of slot ``k`` of token ``t``
(``src1`` row ``k % ne1``) is added, squared, to the sums of expert ``ids[k, t]``, whose count goes
up by one. These "experts" moments are per-expert diagonals ``[n_expert, cols]`` with per-expert
counts (a full ``cols^2`` moment per expert would be ``n_expert`` times a dense layer's scratch:
gpt-oss-120b 128 x 2880^2 x 8 bytes = 8.5 GB per tensor), keyed ``ids:`` + the input's name (the
router's ``MUL_MAT`` reads the same tensor whole).
"""
import llama_cpp  # noqa: I001  -- must come before numpy (see module docstring)

import contextlib
import ctypes
import gc
import os
import resource
import sys
import threading
import time

import numpy as np

from . import blas, llamalib
from .eval import proto

_MAX_SRC = 10


class _Tensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h; GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64). Checked against ``ggml_get_name``/``ggml_nbytes`` at the first call."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * _MAX_SRC), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
                ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
                ("padding", ctypes.c_char * 8)]


def _ggml() -> ctypes.CDLL:
    lib = llamalib.ggml_base()
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def _op_index(lib, name: bytes) -> int:
    for i in range(200):
        if lib.ggml_op_name(i) == name:
            return i
        if lib.ggml_op_name(i) in (None, b"COUNT"):
            break
    raise RuntimeError(f"ggml op {name.decode()} not found")


class Collector:
    """The ``cb_eval`` callback and the moment sums it feeds."""

    def __init__(self, weights: dict, scratch: str, buffer_bytes: int):
        self.lib = _ggml()
        self.mul_mat = _op_index(self.lib, b"MUL_MAT")
        self.mul_mat_id = _op_index(self.lib, b"MUL_MAT_ID")
        self.experts: dict[bytes, np.ndarray] = {}     # "experts" key -> float64 sums [n_expert, cols]
        self.expert_counts: dict[bytes, np.ndarray] = {}
        self.n_as: dict[bytes, int] = {}
        self.ids_buf = ctypes.create_string_buffer(0)
        self.f32 = 0                                  # GGML_TYPE_F32
        self.want = {k.encode(): v for k, v in weights.items()}
        self.claim: dict[bytes, bytes] = {}           # input key -> the one weight that collects it
        self.weight_key: dict[bytes, bytes] = {}      # weight -> input key
        self.kind: dict[bytes, str] = {}              # input key -> "full" | "diag"
        self.width: dict[bytes, int] = {}
        self.bufs: dict[bytes, np.ndarray] = {}   # full-moment inputs not yet summed: float32 [capacity, n]
        self.fill: dict[bytes, int] = {}          # rows of bufs[key] in use
        self.reserve_rows = 0                     # rows a buffer is given room for (a flush's, once known)
        self.diag: dict[bytes, np.ndarray] = {}    # diagonal-only sums (kept in memory, small)
        self.diag_rows: dict[bytes, int] = {}
        self.count = 0                                # tokens folded in (per key)
        self.scratch_path = scratch
        self.buffer_bytes = buffer_bytes
        self.acc: dict[bytes, np.ndarray] = {}
        self.offsets: dict[bytes, int] = {}
        self.sum_pool = None                      # threads the inputs' sums are spread over (run() sets it)
        self.background = None                    # a one-thread executor: flushes summed while decoding goes on
        self.pending = None                       # (future, its buffers) of the flush being summed
        self.spare: dict[bytes, np.ndarray] = {}  # the other set of buffers (background flushes)
        self.mm = None
        self.checked = False
        self.error = None
        self.host = ctypes.create_string_buffer(0)
        self.cb = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def _check(self, ptr: int, t: _Tensor) -> None:
        name = self.lib.ggml_get_name(ptr)
        rows = t.ne[1] * t.ne[2] * t.ne[3]
        if name != t.name or (t.nb[1] == 4 * t.ne[0] and self.lib.ggml_nbytes(ptr) != 4 * t.ne[0] * rows):
            raise RuntimeError("struct ggml_tensor layout differs from this build of llama.cpp")
        self.checked = True

    def _callback(self, ptr, ask, _user):
        try:
            t = _Tensor.from_address(ptr)
            if t.op not in (self.mul_mat, self.mul_mat_id) or not t.src[0] or not t.src[1]:
                return False
            w = _Tensor.from_address(t.src[0]).name
            kind = self.want.get(w)
            if kind is None or (kind == "experts") != (t.op == self.mul_mat_id) or (kind == "experts" and not t.src[2]):
                return False
            x = _Tensor.from_address(t.src[1])
            if x.type != self.f32:
                return False
            key = x.name or w
            if kind == "experts":
                key = b"ids:" + key
                if ask:
                    owner = self.claim.setdefault(key, w)
                    self.weight_key[w] = key
                    if owner == w:
                        self.kind[key] = "experts"
                        self.width[key] = int(x.ne[0])
                        self.n_as[key] = int(_Tensor.from_address(t.src[0]).ne[2])
                    return owner == w
                self._collect_experts(key, x, t.src[1], t.src[2])
                return True
            if ask:
                if not self.checked:
                    self._check(t.src[1], x)
                owner = self.claim.setdefault(key, w)
                self.weight_key[w] = key
                if owner == w:
                    # the moment's kind is the richest any reader asks for
                    self.kind[key] = "full" if "full" in (kind, self.kind.get(key)) else "diag"
                    self.width[key] = int(x.ne[0])
                    return True
                if kind == "full":
                    self.kind[key] = "full"
                return False
            self._collect(key, x, t.src[1])
            return True
        except BaseException as e:            # never let an exception unwind through C
            self.error = self.error or e
            return False

    def _collect(self, key: bytes, x: _Tensor, ptr: int) -> None:
        ne0, rows = int(x.ne[0]), int(x.ne[1]) * int(x.ne[2]) * int(x.ne[3])
        span = int(self.lib.ggml_nbytes(ptr))
        if self.lib.ggml_backend_buffer_is_host(x.buffer):
            base = x.data
        else:
            if len(self.host) < span:
                self.host = ctypes.create_string_buffer(span)
            self.lib.ggml_backend_tensor_get(ptr, self.host, 0, span)
            base = ctypes.addressof(self.host)
        raw = (ctypes.c_char * span).from_address(base)
        a = np.lib.stride_tricks.as_strided(
            np.frombuffer(raw, np.float32), shape=(int(x.ne[3]), int(x.ne[2]), int(x.ne[1]), ne0),
            strides=(int(x.nb[3]), int(x.nb[2]), int(x.nb[1]), 4)).reshape(rows, ne0)
        if self.kind[key] == "diag":      # cheap: summed at once, nothing buffered
            d = self.diag.get(key)
            if d is None:
                d = self.diag[key] = np.zeros(ne0)
            d += np.einsum("ij,ij->j", a, a, dtype=np.float64)
            self.diag_rows[key] = self.diag_rows.get(key, 0) + rows
        else:
            self._buffer(key, a)

    def _buffer(self, key: bytes, a: np.ndarray) -> None:
        """Copies the rows ``a`` into ``key``'s buffer, kept from flush to flush (allocating fresh
        arrays per call and concatenating them at each flush touched new pages every time)."""
        k, rows = self.fill.get(key, 0), a.shape[0]
        buf = self.bufs.get(key)
        if buf is None or k + rows > buf.shape[0]:
            cap = max(k + rows, self.reserve_rows, 2 * buf.shape[0] if buf is not None else 0)
            grown = np.empty((cap, a.shape[1]), np.float32)
            if buf is not None:
                grown[:k] = buf[:k]
            buf = self.bufs[key] = grown
        buf[k:k + rows] = a
        self.fill[key] = k + rows

    def _host(self, ptr: int, x: _Tensor, buf_name: str) -> int:
        """The address of a tensor's data in host memory (copied from a GPU when needed)."""
        span = int(self.lib.ggml_nbytes(ptr))
        if self.lib.ggml_backend_buffer_is_host(x.buffer):
            return x.data
        buf = getattr(self, buf_name)
        if len(buf) < span:
            buf = ctypes.create_string_buffer(span)
            setattr(self, buf_name, buf)
        self.lib.ggml_backend_tensor_get(ptr, buf, 0, span)
        return ctypes.addressof(buf)

    def _collect_experts(self, key: bytes, x: _Tensor, ptr: int, ids_ptr: int) -> None:
        """llama-imatrix's MUL_MAT_ID branch: per (slot, token), the input row squared into the sums
        of the expert the router chose, and one count for that expert."""
        ids = _Tensor.from_address(ids_ptr)
        ne0, ne1, n_tok = int(x.ne[0]), int(x.ne[1]), int(x.ne[2])
        n_ids = int(ids.ne[0])
        if int(ids.ne[1]) != n_tok or int(x.ne[3]) != 1:
            raise RuntimeError(f"{key.decode()}: MUL_MAT_ID inputs of an unexpected shape")
        span = int(self.lib.ggml_nbytes(ptr))
        xs = np.lib.stride_tricks.as_strided(
            np.frombuffer((ctypes.c_char * span).from_address(self._host(ptr, x, "host")), np.float32),
            shape=(n_tok, ne1, ne0), strides=(int(x.nb[2]), int(x.nb[1]), 4))
        ispan = int(self.lib.ggml_nbytes(ids_ptr))
        e = np.lib.stride_tricks.as_strided(
            np.frombuffer((ctypes.c_char * ispan).from_address(self._host(ids_ptr, ids, "ids_buf")), np.int32),
            shape=(n_tok, n_ids), strides=(int(ids.nb[1]), int(ids.nb[0])))
        n_as = self.n_as[key]
        if e.size and (e.min() < 0 or e.max() >= n_as):
            raise RuntimeError(f"{key.decode()}: expert id outside 0..{n_as - 1}")
        acc = self.experts.get(key)
        if acc is None:
            acc = self.experts[key] = np.zeros((n_as, ne0))
            self.expert_counts[key] = np.zeros(n_as, np.int64)
        for k in range(n_ids):
            rows = xs[:, k % ne1, :].astype(np.float64)
            np.add.at(acc, e[:, k], rows * rows)
            self.expert_counts[key] += np.bincount(e[:, k], minlength=n_as)

    # ---- sums --------------------------------------------------------------------
    def buffered_tokens(self) -> int:
        return next(iter(self.fill.values()), 0)

    def per_token_bytes(self) -> int:
        return 4 * sum(n for k, n in self.width.items() if self.kind[k] == "full")

    def _allocate(self) -> None:
        off = 0
        for key in sorted(self.kind):
            n = self.width[key]
            self.offsets[key] = off
            off += 8 * {"full": n * n, "diag": n, "experts": n * self.n_as.get(key, 0)}[self.kind[key]]
        fd = os.open(self.scratch_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(off, 1)) if hasattr(os, "posix_fallocate") else os.ftruncate(fd, max(off, 1))
        finally:
            os.close(fd)
        self.mm = np.memmap(self.scratch_path, np.float64, "r+", shape=(max(off, 8) // 8,))
        for key in self.kind:
            n = self.width[key]
            o = self.offsets[key] // 8
            self.acc[key] = (self.mm[o:o + n * n].reshape(n, n) if self.kind[key] == "full"
                             else self.mm[o:o + n * self.n_as[key]].reshape(-1, n) if self.kind[key] == "experts"
                             else self.mm[o:o + n])

    def _sum(self, bufs: dict, fill: dict) -> None:
        """``acc[key] += X^T X`` for every buffered input (float32 products of one flush, float64 sums),
        the inputs spread over ``sum_pool``'s threads, one BLAS thread each (blas.set_threads(1) in run)."""
        def one(key):
            x = bufs[key][:fill[key]]
            self.acc[key] += x.T @ x
        keys = list(fill)
        if self.sum_pool is not None and len(keys) > 1:
            for f in [self.sum_pool.submit(one, k) for k in keys]:
                f.result()
        else:
            for k in keys:
                one(k)

    def wait(self) -> None:
        """Wait for the flush being summed in the background (its error raised here); its buffers
        become the spare set."""
        if self.pending is not None:
            fut, bufs = self.pending
            self.pending = None
            fut.result()
            self.spare = bufs

    def flush(self, final: bool = False) -> None:
        self.wait()
        if self.mm is None and (self.fill or final):
            self._allocate()
        n = None
        for key, rows in self.fill.items():
            if n is not None and rows != n:
                raise RuntimeError(f"{key.decode()}: {rows} rows vs {n} for the other inputs")
            n = rows
        self.count += n or 0
        if self.background is not None and not final and self.fill:
            bufs, fill = self.bufs, self.fill
            self.bufs, self.fill, self.spare = self.spare, {}, {}
            self.pending = (self.background.submit(self._sum, bufs, fill), bufs)
        else:
            self._sum(self.bufs, self.fill)
            self.fill = {}
        if final:
            for key, d in self.diag.items():
                if self.mm is not None and self.count and self.diag_rows[key] != self.count:
                    raise RuntimeError(f"{key.decode()}: {self.diag_rows[key]} rows vs {self.count}")
                self.acc[key][:] = d
            if not self.count and self.diag_rows:
                self.count = next(iter(self.diag_rows.values()))
            for key, d in self.experts.items():
                self.acc[key][:] = d
            self.bufs.clear()
            self.spare.clear()

    def index(self) -> dict:
        return {"keys": {k.decode(): [self.offsets[k], self.width[k], self.kind[k]] for k in self.kind},
                "expert_counts": {k.decode(): [int(c) for c in self.expert_counts.get(k, np.zeros(self.n_as[k]))]
                                  for k in self.kind if self.kind[k] == "experts"},
                "weight_key": {w.decode(): k.decode() for w, k in self.weight_key.items()},
                "count": self.count, "scratch_bytes": int(self.mm.size * 8) if self.mm is not None else 0}


_BLOCK = 256
_BUFS = threading.local()


def _sample(logits: np.ndarray, gens: list, temperature: float) -> np.ndarray:
    """One token per row of ``logits`` [n, vocab]: inverse CDF of softmax(logits / T) with one
    uniform from each row's own generator, found block by block (two short cumulative sums
    instead of one over the vocabulary)."""
    n, v = logits.shape
    # p: kept per thread and shape (two fresh [n, vocab] arrays per step cost page faults); its padding
    # columns stay zero, exp(z) is written into the first v
    key = (n, -(-v // _BLOCK) * _BLOCK)
    p = getattr(_BUFS, "p", None)
    if p is None or p.shape != key:
        p = _BUFS.p = np.zeros(key, np.float32)
    z = p[:, :v]
    if temperature == 1.0:     # logits * 1 is the logits: the same z without the product
        np.subtract(logits, logits.max(1, keepdims=True), out=z)
    else:
        np.multiply(logits, np.float32(1.0 / temperature), out=z)
        z -= z.max(1, keepdims=True)
    np.exp(z, out=z)
    blocks = p.reshape(n, -1, _BLOCK).sum(2, dtype=np.float64)
    cb = np.cumsum(blocks, 1)
    u = np.array([g.random() for g in gens]) * cb[:, -1]
    b = np.minimum((cb <= u[:, None]).sum(1), cb.shape[1] - 1)
    rest = u - np.where(b > 0, cb[np.arange(n), b - 1], 0.0)
    inner = np.cumsum(p.reshape(n, -1, _BLOCK)[np.arange(n), b].astype(np.float64), 1)
    j = np.minimum((inner <= rest[:, None]).sum(1), _BLOCK - 1)
    return np.minimum(b * _BLOCK + j, v - 1)


def _sample_rows(pool, logits, gens, temperature):
    """:func:`_sample` with the rows split over threads (NumPy releases the GIL in the passes)."""
    if pool is None or logits.shape[0] < 2:
        return _sample(logits, gens, temperature)
    k = min(pool._max_workers, logits.shape[0])
    cuts = np.linspace(0, logits.shape[0], k + 1).astype(int)
    parts = pool.map(lambda ab: _sample(logits[ab[0]:ab[1]], gens[ab[0]:ab[1]], temperature),
                     zip(cuts[:-1], cuts[1:]))
    return np.concatenate(list(parts))


RPC_MISSING = ("these llama.cpp libraries have no RPC backend (built without -DGGML_RPC=ON); build them with "
               "tools/build_rpc.sh and set LLAMA_CPP_LIB_PATH to that folder")


def add_rpc_servers(servers: list) -> None:
    """Register each ``HOST:PORT`` rpc-server's devices in ggml's backend registry, as llama.cpp's
    ``--rpc`` does (``common/arg.cpp`` ``add_rpc_devices``): ``ggml_backend_reg_by_name("RPC")``, its
    ``ggml_backend_rpc_add_server`` through ``ggml_backend_reg_get_proc_address``, then
    ``ggml_backend_register``. A model loaded afterwards (default ``devices``: all) puts its offloaded
    layers on them, RPC devices first (``llama_model_load``). llama-cpp-python 0.3.36 has no argument for it."""
    lib = llamalib.load("ggml")
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RuntimeError(RPC_MISSING)
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not fn:
        raise RuntimeError("this llama.cpp's RPC backend has no ggml_backend_rpc_add_server")
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(fn)
    for server in servers:
        r = add(server.encode())
        if not r:
            raise RuntimeError(f"the RPC server {server} did not answer (is ggml-rpc-server running there, "
                               "of the same llama.cpp version?)")
        lib.ggml_backend_register(r)


def run(req: dict, send) -> tuple[dict, np.ndarray]:
    """Long because one llama.cpp model/context lifetime (load, eval callback, free) in one try/finally."""
    llama_cpp.llama_backend_init()
    log = _quiet()
    if req.get("rpc"):
        add_rpc_servers(list(req["rpc"]))
    mp = llama_cpp.llama_model_default_params()
    supports = bool(llama_cpp.llama_supports_gpu_offload())
    ngl = req.get("gpu_layers")
    mp.n_gpu_layers = 0 if not supports else (-1 if ngl is None or ngl < 0 else int(ngl))
    model = llama_cpp.llama_model_load_from_file(os.fsencode(req["model"]), mp)
    if not model:
        raise RuntimeError("llama.cpp could not load the temporary model" + (f": {log()}" if log() else ""))
    n_seq, n_tok = int(req["n_seq"]), int(req["n_tok"])
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd, n_head = llama_cpp.llama_model_n_embd(model), max(1, llama_cpp.llama_model_n_head(model))
    n_kv = max(1, llama_cpp.llama_model_n_head_kv(model))
    per_seq = n_layer * n_tok * 2 * 2 * n_kv * max(1, n_embd // n_head)      # f16 K and V
    n_par = max(1, min(n_seq, int(req["kv_bytes"]) // max(1, per_seq)))
    col = Collector(req["weights"], req["scratch"], int(req["buffer_bytes"]))
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_par * n_tok
    cp.n_batch = cp.n_ubatch = max(n_par, 16)
    cp.n_seq_max = n_par
    cp.kv_unified = False                         # one KV stream per sequence
    cp.n_threads = cp.n_threads_batch = int(req["threads"])
    cp.cb_eval = col.cb
    cp.cb_eval_user_data = None
    cp.no_perf = True
    # --gpu-layers 0 on a GPU build means the CPU: without this, llama.cpp still copies host weights
    # to the GPU for every matmul of a batch of >= 32 tokens (op offload), and the run is neither
    cp.op_offload = mp.n_gpu_layers != 0
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context" + (f": {log()}" if log() else ""))
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(n_par, 0, 1)
    given = req.get("tokens")
    toks = np.empty((n_seq, n_tok), np.int32)
    toks[:, 0] = int(req["start"])
    if given is not None:                 # decode these tokens instead of sampling (tests, studies)
        toks[:] = np.asarray(given, np.int32).reshape(n_seq, n_tok)
    gens = [np.random.default_rng([int(req["seed"]), s]) for s in range(n_seq)]
    t0 = time.monotonic()
    step, flush_rows = 0, None
    times = {k: 0.0 for k in ("decode", "sample", "sums", "cpu_decode", "cpu_sample", "cpu_sums")}
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(min(8, int(req["threads"]))) if int(req["threads"]) > 1 else None
    blas.set_threads(1)                   # the sums are spread over threads by input instead
    col.sum_pool = ThreadPoolExecutor(int(req["threads"])) if int(req["threads"]) > 1 else None
    offload = bool(supports and mp.n_gpu_layers != 0)
    send(("start", -(-n_seq // n_par) * n_tok, n_par), None)
    mem = llama_cpp.llama_get_memory(ctx)
    with _no_gc():
        for s0 in range(0, n_seq, n_par):
            s1 = min(n_seq, s0 + n_par)
            llama_cpp.llama_memory_clear(mem, True)
            for t in range(n_tok):
                batch.n_tokens = s1 - s0
                for j in range(s1 - s0):
                    batch.token[j] = int(toks[s0 + j, t])
                    batch.pos[j] = t
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = j
                    batch.logits[j] = 1
                tick = (time.monotonic(), time.process_time())
                rc = llama_cpp.llama_decode(ctx, batch)
                tick = _lap(times, "decode", tick)
                if col.error is not None:
                    raise col.error
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed ({rc})" + (f": {log()}" if log() else ""))
                if t + 1 < n_tok and given is None:
                    lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(s1 - s0, n_vocab))
                    toks[s0:s1, t + 1] = _sample_rows(pool, lg, gens[s0:s1], float(req["temperature"]))
                    tick = _lap(times, "sample", tick)
                if flush_rows is None:    # at least 1024 rows per product, else the float64 sums dominate
                    flush_rows = max(1024, int(req["buffer_bytes"]) // max(1, col.per_token_bytes()))
                    col.reserve_rows = flush_rows + n_par     # a flush's rows and the decode that crosses it
                    if offload and flush_rows * col.per_token_bytes() <= int(req["buffer_bytes"]):
                        col.background = ThreadPoolExecutor(1)     # the CPU sums while the GPU decodes
                if col.buffered_tokens() >= flush_rows:
                    col.flush()
                    tick = _lap(times, "sums", tick)
                step += 1
                send(("progress", step), None)
    tick = (time.monotonic(), time.process_time())
    col.flush(final=True)
    if col.mm is not None:
        col.mm.flush()
    _lap(times, "sums", tick)
    out = col.index()
    out.update(n_par=n_par, times=times, seconds=time.monotonic() - t0, peak_rss=_peak_rss(),
               offload=offload,
               system_info=llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip())
    for p in (pool, col.sum_pool, col.background):
        if p is not None:
            p.shutdown()
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return out, toks


@contextlib.contextmanager
def _no_gc():
    """The garbage collector off (what exists frozen) for the decode loop: it makes no cyclic garbage, but
    the callback's ctypes objects trigger collections that walk every object of llama_cpp and NumPy: ~3 %
    of the decode's CPU in a perf profile (docs/CALIB_SPEED.md)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _lap(times: dict, key: str, since: tuple[float, float]) -> tuple[float, float]:
    """Adds the wall and CPU seconds (of the whole process: llama.cpp's and BLAS's threads) since
    ``since`` to ``times[key]`` and ``times["cpu_" + key]``."""
    now = (time.monotonic(), time.process_time())
    times[key] += now[0] - since[0]
    times["cpu_" + key] += now[1] - since[1]
    return now


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_LOG: list = []
_LOG_CB = None


def _quiet():
    """llama.cpp's log into a ring (GGUFQ_CALIB_VERBOSE=1 prints it); returns a function giving the
    last error line."""
    verbose = os.environ.get("GGUFQ_CALIB_VERBOSE", "") not in ("", "0")

    @llama_cpp.llama_log_callback
    def cb(level, text, _):  # pragma: no cover - called from C
        s = text.decode("utf-8", "replace")
        _LOG.append((int(level), s))
        del _LOG[:-40]
        if verbose:
            sys.stderr.write(s)
    global _LOG_CB
    _LOG_CB = cb               # keep the callback alive as long as llama.cpp may call it
    llama_cpp.llama_log_set(cb, None)
    return lambda: next((s.strip() for lvl, s in reversed(_LOG) if lvl in (2, 3) and s.strip()), "")


def main() -> None:
    from .procs import die_with_parent   # stdlib only: llama_cpp stays first
    die_with_parent()
    fin = os.fdopen(os.dup(0), "rb", buffering=0)
    fout = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)                    # C code printing to stdout goes to stderr
    req, _ = proto.recv(fin)
    try:
        out, toks = run(req, lambda m, a: proto.send(fout, m, a))
    except Exception as e:           # noqa: BLE001 -- reported to the parent as one line
        proto.send(fout, {"error": f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)})
        sys.exit(1)
    proto.send(fout, out, toks)
