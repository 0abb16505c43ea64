"""The llama-cpp-python side of ``ggufq eval``: one model, one process.

Started by :class:`ggufq.eval.Worker` as
``python -c "import llama_cpp; from ggufq.eval.worker import main; main()"``
so that ``llama_cpp`` is imported before NumPy (on a CUDA build, NumPy first
crashed at model load). It talks :mod:`ggufq.eval.proto` frames on its original
stdout/stdin; fd 1 is pointed at stderr so that nothing printed by C code can
corrupt the frames. llama.cpp's log goes to a ring buffer whose last error lines
are sent back when loading or decoding fails (``GGUFQ_EVAL_VERBOSE=1`` prints it).

Requests, each answered by one frame (``{"error": msg}`` on failure):

* ``("load", {path, gpu_layers})`` -> model facts (n_vocab, n_ctx_train, add_bos, ...)
* ``("context", {n_ctx, threads})`` -> ``{}``; one sequence, n_batch = n_ctx
* ``("tokenize", {text: bytes})`` -> int32 tokens, as llama-perplexity's ``common_tokenize(ctx, text, true)``
* ``("tokens_text", {ids})`` -> the vocab's text of those ids
* ``("eval", {first, last}) + int32 tokens`` -> float32 logits of positions ``[first, last)``
  after clearing the KV cache and decoding ``tokens`` from position 0
* ``("quit", {})``
"""
import llama_cpp  # noqa: I001  -- must come before numpy (see module docstring)

import collections
import ctypes
import os
import sys
import time

import numpy as np

from . import proto

_LOG = collections.deque(maxlen=40)
_VERBOSE = os.environ.get("GGUFQ_EVAL_VERBOSE", "") not in ("", "0")


@llama_cpp.llama_log_callback
def _log_cb(level, text, user_data):  # pragma: no cover - called from C
    try:
        s = text.decode("utf-8", "replace")
    except Exception:
        return
    _LOG.append((int(level), s))
    if _VERBOSE:
        sys.stderr.write(s)


def _last_errors() -> str:
    lines = [s.strip() for lvl, s in _LOG if lvl in (2, 3) and s.strip()]
    return lines[-1] if lines else ""


class _Model:
    def __init__(self) -> None:
        self.model = None
        self.ctx = None
        self.vocab = None
        self.batch = None
        self.n_ctx = 0
        self.n_vocab = 0

    # -- requests
    def load(self, path: str, gpu_layers) -> dict:
        supports = bool(llama_cpp.llama_supports_gpu_offload())
        params = llama_cpp.llama_model_default_params()
        if not supports:
            ngl = 0
        elif gpu_layers is None or gpu_layers < 0:
            ngl = -1
        else:
            ngl = int(gpu_layers)
        params.n_gpu_layers = ngl
        model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not model:
            why = _last_errors()
            raise RuntimeError(f"llama.cpp could not load {path}" + (f": {why}" if why else ""))
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        n_layer = llama_cpp.llama_model_n_layer(model)
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, buf, 256)
        offloaded = 0 if ngl == 0 else (n_layer + 1 if ngl < 0 else min(ngl, n_layer + 1))
        return {
            "n_vocab": self.n_vocab,
            "n_ctx_train": llama_cpp.llama_model_n_ctx_train(model),
            "n_layer": n_layer,
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)),
            "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(self.vocab)),
            "bos": int(llama_cpp.llama_vocab_bos(self.vocab)),
            "vocab_type": int(llama_cpp.llama_vocab_type(self.vocab)),
            "desc": buf.value.decode("utf-8", "replace"),
            "size": int(llama_cpp.llama_model_size(model)),
            "n_params": int(llama_cpp.llama_model_n_params(model)),
            "gpu_offload_supported": supports,
            "gpu_layers": offloaded,
            "gpu_layers_total": n_layer + 1,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
            "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
        }

    def context(self, n_ctx: int, threads: int) -> dict:
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = min(n_ctx, 512)      # llama-perplexity's default physical batch
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO   # llama-perplexity's default
        cp.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not ctx:
            why = _last_errors()
            raise RuntimeError("llama.cpp could not create a context" + (f": {why}" if why else ""))
        self.ctx = ctx
        self.n_ctx = n_ctx
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        for i in range(n_ctx):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(n_ctx,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_ctx,))
        self._out = np.ctypeslib.as_array(self.batch.logits, shape=(n_ctx,))
        self._pos[:] = np.arange(n_ctx, dtype=np.int32)
        return {}

    def tokenize(self, text: bytes) -> np.ndarray:
        n = len(text) + 16
        while True:
            buf = (llama_cpp.llama_token * n)()
            # add_special=True, parse_special=False: common_tokenize(ctx, text, true)
            got = llama_cpp.llama_tokenize(self.vocab, text, len(text), buf, n, True, False)
            if got >= 0:
                return np.ctypeslib.as_array(buf, shape=(n,))[:got].astype(np.int32)
            n = -got

    def tokens_text(self, ids) -> list:
        return [llama_cpp.llama_vocab_get_text(self.vocab, int(i)) for i in ids]

    def eval(self, tokens: np.ndarray, first: int, last: int) -> tuple[np.ndarray, float]:
        n = int(tokens.size)
        if n > self.n_ctx or not 0 <= first < last <= n:
            raise ValueError(f"bad eval request: {n} tokens, outputs [{first}, {last})")
        t0 = time.perf_counter()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self._tok[:n] = tokens
        self._out[:n] = 0
        self._out[first:last] = 1
        self.batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if rc != 0:
            why = _last_errors()
            raise RuntimeError(f"llama_decode failed with {rc}" + (f": {why}" if why else ""))
        ptr = llama_cpp.llama_get_logits(self.ctx)
        logits = np.ctypeslib.as_array(ptr, shape=(last - first, self.n_vocab))
        return logits, time.perf_counter() - t0

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def main() -> int:
    from ggufq.procs import die_with_parent   # stdlib only: keeps llama_cpp first
    die_with_parent()                          # never outlive ggufq; its Ctrl-C is the parent's to handle
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                      # stray prints from C go to stderr, never into the frames
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    m = _Model()
    try:
        while True:
            try:
                (cmd, args), arr = proto.recv(inp)
            except proto.ProtocolEOF:
                return 0
            try:
                if cmd == "quit":
                    proto.send(out, {})
                    return 0
                if cmd == "load":
                    proto.send(out, m.load(args["path"], args.get("gpu_layers")))
                elif cmd == "context":
                    proto.send(out, m.context(int(args["n_ctx"]), int(args["threads"])))
                elif cmd == "tokenize":
                    proto.send(out, {}, m.tokenize(args["text"]))
                elif cmd == "tokens_text":
                    proto.send(out, {"texts": m.tokens_text(args["ids"])})
                elif cmd == "eval":
                    logits, secs = m.eval(arr, int(args["first"]), int(args["last"]))
                    proto.send(out, {"seconds": secs}, logits)
                else:
                    raise ValueError(f"unknown request {cmd!r}")
            except (RuntimeError, ValueError, OSError) as e:
                proto.send(out, {"error": str(e)})
    finally:
        m.close()
