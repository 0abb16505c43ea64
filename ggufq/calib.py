"""Self-calibration: the model writes its own calibration text, with no user data.

Error-feedback rounding (:mod:`ggufq.quant.gptq`) needs each matrix's input second
moment ``E[x x^T]``. Measured on tinyllama-spm-10m (Q4_K_M, mean KLD): moments from
random tokens made files *worse* than no moments at all; 64 x 32-token samples were
no better than the data-free importance; 16 sequences of 512 tokens that the model
sampled itself (temperature 1, from BOS) were as good as 16 x 512 tokens of its real
held-out text, but their gain varied with the sampling seed (0.836x to 0.891x of
llama-quantize's KLD); 64 x 512 tokens gave 0.836x and 0.855x. So, by default, 64 x 512:

1. :func:`generate` samples ``n_seq`` sequences of ``n_tok`` tokens from the model
   (NumPy forward with a KV cache, Gumbel-max sampling, fixed seed: files are
   reproducible);
2. :class:`Moments` runs those tokens through the model one layer at a time, as the
   writer asks for that layer's matrices, and hands out ``E[x x^T]`` of the inputs
   of q/k/v (shared), attn_output, gate/up (shared), output, and the diagonal only
   for ffn_down (its full moment is ``n_ff^2`` and did not pay on tinyllama).

Llama-family archs (llama, mistral, qwen2): RMSNorm, GQA, SwiGLU, rope (llama.cpp's
interleaved layout for llama/mistral, NeoX for qwen2; ``rope_freqs`` factors, linear
scaling), q/k/v biases. Sliding windows are ignored (sequences are 512 tokens).
Memory: the layer-major pass holds ``n_seq * n_tok`` hidden states (a few copies: ~1 GiB
for a 1B model's 2048-wide states at 32k tokens) plus one layer's moments; generation
caches up to ``cache_bytes`` of float32 weights, streams the rest (in row chunks) at every
step, and runs the sequences in rounds whose KV cache fits ``KV_BYTES`` (512 MiB).
"""
from __future__ import annotations

import functools
import math
import re
import time
from typing import Callable, Optional

import numpy as np

from . import GgufqError

N_SEQ, N_TOK = 64, 512
CACHE_BYTES = 1 << 30
_ROWS = 1 << 13              # row chunk of a streamed matrix
_TOKENS = 2048               # token chunk of the layer-major pass (bounds ffn activations)
SUPPORTED = ("llama", "mistral", "qwen2")


def _rms(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * g


def _silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


class Forward:
    """The model's forward pass on the GGUF tensors of a ``convert.Prepared``."""

    def __init__(self, prepared, cache_bytes: int = CACHE_BYTES):
        arch = prepared.arch
        if arch.name not in SUPPORTED:
            raise GgufqError(f"self-calibration supports {', '.join(SUPPORTED)}, not {arch.name}")
        c = arch.config
        self.t = {t.name: t for t in prepared.tensors}
        self._vecs: dict[str, np.ndarray] = {}
        self.n_layer, self.n_embd = arch.n_layer, arch.n_embd
        self.n_head, self.n_kv, self.hd = arch.n_head, arch.n_head_kv, arch.head_dim
        self.eps = float(c.get("rms_norm_eps") or 1e-6)
        self.neox = not arch.permute_qk
        rope = arch.rope
        theta = float(rope.get("rope_theta", 10000.0))
        inv = theta ** (-np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        if "rope_freqs.weight" in self.t:
            inv = inv / self.vec("rope_freqs.weight")
        elif rope.get("rope_type") == "linear" and rope.get("factor"):
            inv = inv / float(rope["factor"])
        self.inv_freq = inv
        self.head = "output.weight" if "output.weight" in self.t else "token_embd.weight"
        self.n_vocab = self.t[self.head].n_rows
        self._cache: dict[str, np.ndarray] = {}
        self._budget = cache_bytes

    # ---- weights ------------------------------------------------------------------
    def vec(self, name: str) -> Optional[np.ndarray]:
        """A 1-D tensor (norm, bias, rope factors) as float32, read once."""
        t = self.t.get(name)
        if t is None:
            return None
        if name not in self._vecs:
            self._vecs[name] = t.read(0, t.n_rows).reshape(-1).astype(np.float32)
        return self._vecs[name]

    def stream(self) -> None:
        """Drop the weight cache: from now on every matrix is read in row chunks when used
        (the layer-major pass uses each matrix once)."""
        self._cache.clear()
        self._budget = 0

    def mm(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W^T (+ bias), W cached while the budget lasts, else streamed in row chunks."""
        t = self.t[name]
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])          # one GEMM, not a batch of GEMVs
        w = self._cache.get(name)
        if w is None and t.n_rows * t.row_len * 4 <= self._budget:
            w = self._cache[name] = t.read(0, t.n_rows).astype(np.float32, copy=False)
            self._budget -= w.nbytes
        if w is not None:
            y = x @ w.T
        else:
            y = np.empty((x.shape[0], t.n_rows), np.float32)
            for lo in range(0, t.n_rows, _ROWS):
                hi = min(t.n_rows, lo + _ROWS)
                y[:, lo:hi] = x @ t.read(lo, hi).T
        b = name.replace(".weight", ".bias")
        if b in self.t:
            y += self.vec(b)
        return y.reshape(lead + (t.n_rows,))

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        t = self.t["token_embd.weight"]
        flat = np.asarray(tokens).reshape(-1)
        uniq, inv = np.unique(flat, return_inverse=True)
        rows = np.stack([t.read(int(i), int(i) + 1)[0] for i in uniq]).astype(np.float32)
        return rows[inv].reshape(np.shape(tokens) + (self.n_embd,))

    # ---- pieces -------------------------------------------------------------------
    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [..., T, n_heads, hd], pos [T]."""
        ang = np.outer(pos, self.inv_freq)                       # [T, hd/2]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        if self.neox:
            h = self.hd // 2
            a, b = x[..., :h], x[..., h:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def qkv(self, i: int, h: np.ndarray, pos: np.ndarray):
        """h [B, T, n_embd] -> q [B, T, H, hd], k, v [B, T, KV, hd] (roped)."""
        B, Tn = h.shape[:2]
        p = f"blk.{i}."
        q = self.mm(h, p + "attn_q.weight").reshape(B, Tn, self.n_head, self.hd)
        k = self.mm(h, p + "attn_k.weight").reshape(B, Tn, self.n_kv, self.hd)
        v = self.mm(h, p + "attn_v.weight").reshape(B, Tn, self.n_kv, self.hd)
        return self.rope(q, pos), self.rope(k, pos), v

    def attend(self, q, k, v, q_pos0: int) -> np.ndarray:
        """Causal attention: q [B, Tq, H, hd] at positions q_pos0.., k/v [B, Tk, KV, hd] from 0.
        GQA without copies: query head h reads kv head h // (H / KV), as llama.cpp."""
        B, Tq, H, hd = q.shape
        Tk, KV = k.shape[1], self.n_kv
        rep = H // KV
        qh = q.reshape(B, Tq, KV, rep, hd).transpose(0, 2, 3, 1, 4).reshape(B, KV, rep * Tq, hd)
        s = (qh @ k.transpose(0, 2, 3, 1)) * np.float32(1.0 / math.sqrt(hd))      # [B, KV, rep*Tq, Tk]
        qp = np.tile(np.arange(q_pos0, q_pos0 + Tq), rep)[:, None]
        if Tk > 1:
            s = np.where(np.arange(Tk)[None, :] <= qp, s, np.float32(-np.inf))
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = s @ v.transpose(0, 2, 1, 3)                                           # [B, KV, rep*Tq, hd]
        return o.reshape(B, KV, rep, Tq, hd).transpose(0, 3, 1, 2, 4).reshape(B, Tq, H * hd)

    def ffn_act(self, i: int, h: np.ndarray) -> np.ndarray:
        p = f"blk.{i}."
        return _silu(self.mm(h, p + "ffn_gate.weight")) * self.mm(h, p + "ffn_up.weight")

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.mm(_rms(x, self.vec("output_norm.weight"), self.eps), self.head)


KV_BYTES = 512 << 20        # KV cache per generation round


def generate(fwd: Forward, start: int, n_seq: int = N_SEQ, n_tok: int = N_TOK, seed: int = 0,
             temperature: float = 1.0, on_step: Optional[Callable[[int], None]] = None,
             kv_bytes: int = KV_BYTES) -> np.ndarray:
    """int64 [n_seq, n_tok]: ``start`` then tokens sampled from the model (KV cache, Gumbel-max).

    Sequences are generated in rounds whose KV cache fits ``kv_bytes``; ``on_step(k)`` is
    called after each of the ``rounds * (n_tok - 1)`` steps."""
    rounds = generation_rounds(fwd, n_seq, n_tok, kv_bytes)
    rng = np.random.default_rng(seed)
    toks = np.empty((n_seq, n_tok), np.int64)
    toks[:, 0] = start
    norms = [(fwd.vec(f"blk.{i}.attn_norm.weight"), fwd.vec(f"blk.{i}.ffn_norm.weight")) for i in range(fwd.n_layer)]
    bounds = np.linspace(0, n_seq, rounds + 1).astype(int)
    step = 0
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        kc = np.zeros((fwd.n_layer, s1 - s0, n_tok, fwd.n_kv, fwd.hd), np.float32)
        vc = np.zeros_like(kc)
        for t in range(n_tok - 1):
            x = fwd.embed(toks[s0:s1, t:t + 1])                      # [B, 1, E]
            pos = np.array([t])
            for i in range(fwd.n_layer):
                q, kc[i, :, t:t + 1], vc[i, :, t:t + 1] = fwd.qkv(i, _rms(x, norms[i][0], fwd.eps), pos)
                a = fwd.attend(q, kc[i, :, :t + 1], vc[i, :, :t + 1], t)
                x = x + fwd.mm(a, f"blk.{i}.attn_output.weight")
                x = x + fwd.mm(fwd.ffn_act(i, _rms(x, norms[i][1], fwd.eps)), f"blk.{i}.ffn_down.weight")
            z = fwd.logits(x[:, 0]).astype(np.float64) / temperature
            toks[s0:s1, t + 1] = np.argmax(z - np.log(-np.log(rng.random(z.shape))), -1)
            step += 1
            if on_step:
                on_step(step)
    return toks


def generation_rounds(fwd: Forward, n_seq: int, n_tok: int, kv_bytes: int = KV_BYTES) -> int:
    per_seq = fwd.n_layer * n_tok * fwd.n_kv * fwd.hd * 2 * 4
    return -(-n_seq // max(1, min(n_seq, kv_bytes // max(1, per_seq))))


_LAYER = re.compile(r"blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
_KEY = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "attn_out",
        "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_down": "ffn_down"}


class Moments:
    """E[x x^T] of every matrix's inputs over ``tokens`` [n_seq, n_tok], computed layer by
    layer on demand (in tensor-file order); layers already passed are dropped."""

    def __init__(self, fwd: Forward, tokens: np.ndarray):
        self.fwd = fwd
        self.tokens = np.asarray(tokens)
        self.x: Optional[np.ndarray] = None          # hidden states [B, T, E] entering layer `done`
        self.done = -1                               # layers passed
        self.cur: dict[str, np.ndarray] = {}         # moments of layer `done` (or of the head)
        self.seconds = 0.0                           # time spent in the layer-major pass

    @staticmethod
    def key(name: str) -> Optional[tuple[Optional[int], str]]:
        """(layer, moment) a GGUF tensor reads; layer None = after the last block."""
        if name == "output.weight":
            return (None, "output")
        m = _LAYER.match(name)
        return (int(m.group(1)), _KEY[m.group(2)]) if m else None

    def get(self, name: str) -> Optional[np.ndarray]:
        """The moment for a GGUF tensor (2-D, or 1-D for diagonal-only inputs), or None."""
        k = self.key(name)
        if k is None:
            return None
        layer = self.fwd.n_layer if k[0] is None else k[0]
        if layer < self.done:
            raise GgufqError(f"moments asked out of order: {name} after layer {self.done}")
        while self.done < layer:
            self._advance()
        return self.cur.get(k[1])

    @staticmethod
    def _acc(acc: dict, key: str, x: np.ndarray, diag: bool = False) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        m = (x2 * x2).sum(0, dtype=np.float64) if diag else (x2.T @ x2).astype(np.float64)
        acc[key] = acc.get(key, 0) + m

    def logits(self) -> np.ndarray:
        """float32 [n_seq, n_tok, n_vocab] after the last layer (for tests and checks)."""
        while self.done < self.fwd.n_layer:
            self._advance()
        return self.fwd.logits(self.x)

    def _advance(self) -> None:
        t0 = time.monotonic()
        try:
            self._layer()
        finally:
            self.seconds += time.monotonic() - t0

    def _layer(self) -> None:
        f = self.fwd
        B, Tn = self.tokens.shape
        if self.x is None:
            self.x = f.embed(self.tokens)
        i = self.done + 1
        acc: dict[str, np.ndarray] = {}
        if i == f.n_layer:
            h = _rms(self.x, f.vec("output_norm.weight"), f.eps)
            self._acc(acc, "output", h)
        else:
            pos = np.arange(Tn)
            h = _rms(self.x, f.vec(f"blk.{i}.attn_norm.weight"), f.eps)
            self._acc(acc, "attn_in", h)
            a = np.empty((B, Tn, f.n_head * f.hd), np.float32)
            g = max(1, _TOKENS // Tn)                                # sequences per q/k/v group
            for b0 in range(0, B, g):
                q, k, v = f.qkv(i, h[b0:b0 + g], pos)
                for b in range(q.shape[0]):
                    a[b0 + b] = f.attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], 0)[0]
            del h
            self._acc(acc, "attn_out", a)
            x = self.x + f.mm(a, f"blk.{i}.attn_output.weight")
            g = f.vec(f"blk.{i}.ffn_norm.weight")
            flat = x.reshape(-1, f.n_embd)
            for lo in range(0, flat.shape[0], _TOKENS):
                h2 = _rms(flat[lo:lo + _TOKENS], g, f.eps)
                self._acc(acc, "ffn_in", h2)
                act = f.ffn_act(i, h2)
                self._acc(acc, "ffn_down", act, diag=True)
                flat[lo:lo + _TOKENS] += f.mm(act, f"blk.{i}.ffn_down.weight")
            self.x = x
        n = float(B * Tn)
        self.cur = {k: v / n for k, v in acc.items()}
        self.done = i


class SelfCalibration:
    """Per-tensor weights for the writer's jobs: a :class:`~ggufq.quant.gptq.Hessian` for
    matrices with a full moment, the moment's diagonal (an imatrix) for ffn_down."""

    def __init__(self, fwd: Forward, tokens: np.ndarray, gen_seconds: float = 0.0):
        self.fwd = fwd
        self.tokens = tokens
        self.gen_seconds = gen_seconds
        self.moments = Moments(fwd, tokens)
        self._key = None
        self._h = None

    def summary(self) -> str:
        n, t = self.tokens.shape
        return (f"self-calibration: {n}x{t} tokens generated in {self.gen_seconds:.1f} s, "
                f"input moments in {self.moments.seconds:.1f} s")

    def covers(self, name: str) -> bool:
        return name in self.fwd.t and Moments.key(name) is not None

    def lazy(self, name: str, real: Optional[np.ndarray] = None):
        """A callable the writer runs when it reaches ``name`` (in file order)."""
        return functools.partial(self.weights, name, real)

    def weights(self, name: str, real: Optional[np.ndarray] = None):
        from .quant.gptq import Hessian
        m = self.moments.get(name)
        if m is None:
            return real
        if m.ndim == 1:
            return real if real is not None else m.astype(np.float32)
        key = (self.moments.done, Moments.key(name)[1])
        if key != self._key:
            self._key, self._h = key, Hessian.from_moment(m)
        # a real imatrix (--imatrix) picks the block scales; the moment steers the rounding
        return self._h if real is None else Hessian(np.asarray(real, np.float32), self._h.u)


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


def self_calibrate(prepared, vocab, n_tokens: int = N_SEQ * N_TOK, *, seq_len: int = N_TOK, seed: int = 0,
                   progress: bool = True, cache_bytes: int = CACHE_BYTES,
                   tokens: Optional[np.ndarray] = None) -> SelfCalibration:
    """Sample ``n_tokens`` (in sequences of ``seq_len``) from the model; moments follow lazily.
    ``tokens``: reuse an earlier sample (``SelfCalibration.tokens``) instead."""
    from .progress import Progress
    n_seq = max(1, n_tokens // seq_len)
    fwd = Forward(prepared, cache_bytes)
    t0 = time.monotonic()
    if tokens is None:
        steps = generation_rounds(fwd, n_seq, seq_len) * (seq_len - 1)
        with Progress(steps, f"self-calibration ({n_seq}x{seq_len} tokens)", n_items=steps,
                      enabled=progress) as bar:
            tokens = generate(fwd, start_token(vocab), n_seq, seq_len, seed=seed,
                              on_step=lambda t: bar.advance(1, items=1))
    toks = tokens
    fwd.stream()
    return SelfCalibration(fwd, toks, time.monotonic() - t0)
