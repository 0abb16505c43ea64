"""Perplexity, KL divergence and top-token agreement through llama-cpp-python.

``evaluate(model, ref=None, text=..., ctx=512, chunks=None, gpu_layers=None,
threads=None)`` follows ``llama-perplexity``'s protocol (``perplexity()`` and
``kl_divergence()`` in llama.cpp's ``tools/perplexity/perplexity.cpp``):

* the text (one trailing newline dropped, as ``-f`` does) is tokenized whole,
  with the BOS the vocab asks for (``common_tokenize(ctx, text, true)``);
* it is cut into ``len(tokens) // ctx`` non-overlapping chunks of ``ctx``
  tokens (the tail is dropped), ``chunks`` of them are used;
* each chunk is decoded from an empty KV cache with its first token replaced
  by BOS when the vocab adds BOS; the logits of positions ``ctx/2 .. ctx-2``
  score the next token, so ``ctx - 1 - ctx/2`` tokens per chunk;
* with ``ref`` (the unquantized GGUF of the same model) both models decode the
  same chunk, one after the other, and only per-token scalars are kept: the
  memory stays one chunk of logits per model whatever the text length.

llama.cpp runs in worker processes (:mod:`ggufq.eval.worker`) that import
``llama_cpp`` before NumPy; this process never imports ``llama_cpp``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .. import GgufqError
from ..procs import usable_cpus as default_threads
from ..progress import Progress
from . import proto
from .stats import Accumulator, token_scores

PathLike = Union[str, os.PathLike]

_ENTRY = "import llama_cpp, sys; from ggufq.eval.worker import main; sys.exit(main())"
_PKG_ROOT = str(Path(__file__).resolve().parent.parent.parent)
# how many token ids are compared between model and reference vocabularies
VOCAB_SAMPLE = 256
# bytes of text tokenized by both models to check they tokenize alike
TOKENIZE_SAMPLE = 4096


def check_gguf(path: PathLike, what: str = "model") -> Path:
    """Existence and magic of a GGUF file; a one-line GgufqError otherwise."""
    p = Path(path)
    if not p.exists():
        raise GgufqError(f"{what} file not found: {p}")
    if not p.is_file():
        raise GgufqError(f"{what} is not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GgufqError(f"{what} {p} is not a GGUF file (starts with {magic!r})")
    return p


def read_text(path: PathLike) -> bytes:
    """The evaluation text as llama-perplexity's ``-f`` reads it: raw bytes, one trailing newline dropped."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise GgufqError(f"text file not found: {p}") from None
    except IsADirectoryError:
        raise GgufqError(f"text is a directory, not a file: {p}") from None
    if data.endswith(b"\n"):
        data = data[:-1]
    return data


class Worker:
    """One llama-cpp-python process holding one model."""

    def __init__(self, path: Path, label: str):
        self.path = path
        self.label = label
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        from ..procs import deferred, spawn_helper
        with deferred():
            self.proc = spawn_helper([sys.executable, "-c", _ENTRY], env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self._pending = 0
        self.info: dict = {}

    def request(self, cmd: str, args: Optional[dict] = None, arr: Optional[np.ndarray] = None) -> None:
        try:
            proto.send(self.proc.stdin, (cmd, args or {}), arr)
        except (BrokenPipeError, OSError):
            raise self._died() from None
        self._pending += 1

    def reply(self):
        try:
            msg, arr = proto.recv(self.proc.stdout)
        except proto.ProtocolEOF:
            raise self._died() from None
        self._pending -= 1
        if isinstance(msg, dict) and "error" in msg:
            raise GgufqError(f"{self.label} {self.path.name}: {msg['error']}")
        return msg, arr

    def call(self, cmd: str, args: Optional[dict] = None, arr: Optional[np.ndarray] = None):
        self.request(cmd, args, arr)
        return self.reply()

    def _died(self) -> GgufqError:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        return GgufqError(f"the llama-cpp-python worker for {self.path.name} died (exit code {rc})")

    def close(self) -> None:
        if self.proc.poll() is None and self._pending == 0:
            # an idle worker quits when asked; one cut off mid-request (error, signal) is killed at once
            try:
                self.call("quit")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (GgufqError, OSError, subprocess.TimeoutExpired):
                pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


@dataclass
class EvalResult:
    model: str
    ref: Optional[str]
    text: Optional[str]
    n_ctx: int
    n_chunks: int
    n_chunks_max: int
    n_text_tokens: int
    n_scored: int
    ppl: float
    ppl_err: float
    mean_nll: float
    device: str                       # "CPU" or "GPU (k/n layers)"
    gpu_layers: int
    threads: int
    model_size: int                   # bytes of tensors, as llama.cpp counts them
    model_params: int
    model_desc: str
    seconds: float                    # wall time of the whole evaluation
    seconds_model: float              # decode time of the model alone
    tokens_per_s: float               # chunk tokens decoded per second by the model
    kld: Optional[dict] = None        # kl_divergence() figures (see stats.kld_summary) when ref is given
    ref_seconds: float = 0.0
    llama_cpp_version: str = ""
    system_info: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.model_size * 8 / max(1, self.model_params)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        return d


def _check_same_vocab(m: Worker, r: Worker) -> None:
    a, b = m.info, r.info
    if a["n_vocab"] != b["n_vocab"]:
        raise GgufqError(f"{m.path.name} and reference {r.path.name} have different vocabularies "
                         f"({a['n_vocab']} vs {b['n_vocab']} tokens)")
    n = a["n_vocab"]
    ids = sorted(set(np.linspace(0, n - 1, min(n, VOCAB_SAMPLE)).astype(int).tolist()))
    (ta, _), (tb, _) = m.call("tokens_text", {"ids": ids}), r.call("tokens_text", {"ids": ids})
    for i, x, y in zip(ids, ta["texts"], tb["texts"]):
        if x != y:
            raise GgufqError(f"{m.path.name} and reference {r.path.name} have different vocabularies "
                             f"(token {i} is {x!r} vs {y!r})")
    if a["add_bos"] != b["add_bos"] or a["bos"] != b["bos"]:
        raise GgufqError(f"{m.path.name} and reference {r.path.name} differ in BOS handling")


def evaluate(model: PathLike, ref: Optional[PathLike] = None, text: Optional[PathLike] = None, *,
             ctx: int = 512, chunks: Optional[int] = None, gpu_layers: Optional[int] = None,
             threads: Optional[int] = None, progress: bool = True, text_bytes: Optional[bytes] = None,
             label: str = "eval") -> EvalResult:
    """Perplexity of ``model`` on ``text`` (a file path, or ``text_bytes``), and with ``ref`` its
    KL divergence from the reference, following llama-perplexity. ``chunks``: None or <= 0 for all;
    ``gpu_layers``: None = all layers when llama-cpp-python can offload, else CPU; -1 = all.

    Long because the workers (model and reference, each a llama.cpp process) live in one try/finally:
    start, tokenize check, the overlapped chunk loop and the report share them and a dozen locals."""
    t_start = time.perf_counter()
    mpath = check_gguf(model, "model")
    rpath = check_gguf(ref, "reference") if ref is not None else None
    if text_bytes is None:
        if text is None:
            raise GgufqError("no evaluation text given (--text FILE)")
        text_bytes = read_text(text)
    if ctx < 8:
        raise GgufqError(f"--ctx {ctx} is too small (at least 8)")
    threads = threads or default_threads()

    workers: list[Worker] = []
    try:
        mw = Worker(mpath, "model")
        workers.append(mw)
        rw = None
        mw.request("load", {"path": str(mpath), "gpu_layers": gpu_layers})
        if rpath is not None:
            rw = Worker(rpath, "reference")
            workers.append(rw)
            rw.request("load", {"path": str(rpath), "gpu_layers": gpu_layers})
        for w in workers:
            w.info = w.reply()[0]
        for w in workers:
            n_train = w.info["n_ctx_train"]
            if n_train and ctx > n_train:
                raise GgufqError(f"--ctx {ctx} is above the training context of {w.path.name} ({n_train})")
        if rw is not None:
            _check_same_vocab(mw, rw)
        for w in workers:
            w.request("context", {"n_ctx": ctx, "threads": threads})
        for w in workers:
            w.reply()

        # tokenize as llama-perplexity: with the base model when there is one
        tw = rw or mw
        _, tokens = tw.call("tokenize", {"text": text_bytes})
        if rw is not None:
            head = text_bytes[:TOKENIZE_SAMPLE]
            _, ta = mw.call("tokenize", {"text": head})
            _, tb = rw.call("tokenize", {"text": head})
            if not np.array_equal(ta, tb):
                raise GgufqError(f"{mpath.name} and reference {rpath.name} tokenize the text differently")
        info = mw.info
        if info["add_eos"] and tokens.size:
            tokens = tokens[:-1]          # llama-perplexity refuses such vocabs; score the text without it
        n_max = int(tokens.size) // ctx
        if tokens.size < 2 * ctx:
            raise GgufqError(f"the text tokenizes to {tokens.size} tokens; --ctx {ctx} needs at least "
                             f"{2 * ctx} (two chunks)")
        n_chunk = n_max if not chunks or chunks <= 0 else min(int(chunks), n_max)
        first = ctx // 2
        acc = Accumulator(with_ref=rw is not None)
        secs = {"model": 0.0, "ref": 0.0}

        def chunk_tokens(i: int) -> np.ndarray:
            t = tokens[i * ctx:(i + 1) * ctx].copy()
            if info["add_bos"]:
                t[0] = info["bos"]
            return t

        def ask(w: Worker, i: int) -> None:
            w.request("eval", {"first": first, "last": ctx - 1}, chunk_tokens(i))

        def get(w: Worker, key: str) -> np.ndarray:
            msg, logits = w.reply()
            secs[key] += msg["seconds"]
            return logits

        with Progress(n_chunk, label, n_items=n_chunk, enabled=progress) as bar:
            # the next chunk is asked for before this one is scored, so decoding overlaps the NumPy work
            (rw or mw).request("eval", {"first": first, "last": ctx - 1}, chunk_tokens(0))
            for i in range(n_chunk):
                targets = tokens[i * ctx + first + 1:(i + 1) * ctx]
                if rw is not None:
                    ref_logits = get(rw, "ref")
                    ask(mw, i)
                    logits = get(mw, "model")
                    if i + 1 < n_chunk:
                        ask(rw, i + 1)
                    acc.add(token_scores(logits, targets, ref_logits))
                    del ref_logits
                else:
                    logits = get(mw, "model")
                    if i + 1 < n_chunk:
                        ask(mw, i + 1)
                    acc.add(token_scores(logits, targets))
                del logits
                bar.advance(1, items=1, item=f"PPL {acc.running_ppl():.4f}")
    finally:
        for w in workers:
            w.close()

    s = acc.summary()
    ngl, ntot = info["gpu_layers"], info["gpu_layers_total"]
    device = f"GPU ({ngl}/{ntot} layers offloaded)" if ngl else "CPU"
    if not info["gpu_offload_supported"] and gpu_layers not in (None, 0):
        device += " (this llama-cpp-python build has no GPU offload)"
    return EvalResult(
        model=str(mpath), ref=str(rpath) if rpath else None, text=str(text) if text is not None else None,
        n_ctx=ctx, n_chunks=n_chunk, n_chunks_max=n_max, n_text_tokens=int(tokens.size),
        n_scored=s["n_tokens"], ppl=s["ppl"], ppl_err=s["ppl_err"], mean_nll=s["mean_nll"],
        device=device, gpu_layers=ngl, threads=threads, model_size=info["size"],
        model_params=info["n_params"], model_desc=info["desc"],
        seconds=time.perf_counter() - t_start, seconds_model=secs["model"],
        tokens_per_s=n_chunk * ctx / secs["model"] if secs["model"] > 0 else 0.0,
        kld=s.get("kld"), ref_seconds=secs["ref"], llama_cpp_version=info["llama_cpp_version"],
        system_info=info["system_info"],
    )
