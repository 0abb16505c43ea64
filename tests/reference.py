"""A NumPy reference forward pass of a Hugging Face Llama-family folder.

Independent of ggufq on purpose: it parses the safetensors files itself and follows
the Hugging Face conventions (``transformers``' modeling_llama / mistral / qwen2), not
llama.cpp's, so comparing it with llama.cpp running a converted GGUF checks the whole
conversion (names, Q/K permutation, rope layout, biases, tied output, rope_freqs).

- safetensors: 8-byte little-endian header length, JSON header, raw data; BF16, F16, F32.
- Q/K as stored by HF (rotate-half RoPE, no permutation), GQA, RMSNorm in float32,
  SwiGLU MLP, tied embeddings, q/k/v(/o) biases, rope_theta from ``rope_theta`` or
  ``rope_parameters``, llama3 rope scaling computed on inv_freq as transformers does,
  linear rope scaling, Mistral's sliding window.

Weights are memory-mapped and converted to float layer by layer, so memory holds one
layer's weights plus the activations.

    python tests/reference.py MODEL_DIR 1 450 4 9   # prints argmax and logits norm per position
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

_ST_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> memory-mapped raw array (BF16 kept as uint16 bits; see :func:`to_float`)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path.name}: {name} has dtype {dt}, the reference reads BF16/F16/F32")
        a, b = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        assert (b - a) == count * _ST_DTYPES[dt].itemsize, name
        arr = np.memmap(path, dtype=_ST_DTYPES[dt], mode="r", offset=base + a, shape=(count,))
        out[name] = (arr.reshape(shape), dt)
    return out


def to_float(raw: tuple[np.ndarray, str], dtype=np.float32) -> np.ndarray:
    arr, dt = raw
    if dt == "BF16":
        f = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        f = arr
    return np.asarray(f, dtype=dtype)


def load_folder(model_dir: Path) -> tuple[dict, dict]:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    idx = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.is_file() \
        else ["model.safetensors"]
    tensors: dict = {}
    for fn in files:
        tensors.update(read_safetensors(model_dir / fn))
    return config, tensors


def rope_inv_freq(config: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """inv_freq and attention scaling, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    # transformers: base ** (torch.arange(0, dim, 2, dtype=int64).float() / dim), in float32
    exps = (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim))
    inv = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
    if rtype in (None, "default"):
        return inv, 1.0
    if rtype == "linear":
        return (inv / np.float32(rope["factor"])).astype(np.float32), 1.0
    if rtype == "llama3":
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_ctx = rope["original_max_position_embeddings"]
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32), 1.0
    raise NotImplementedError(f"rope type {rtype!r}")


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


class Reference:
    """``Reference(model_dir).logits(tokens) -> float [n_tokens, vocab]``."""

    def __init__(self, model_dir, dtype=np.float32):
        self.config, self.t = load_folder(model_dir)
        c = self.config
        arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
            raise NotImplementedError(arch)
        self.arch = arch
        self.dtype = dtype
        self.n_layer = c["num_hidden_layers"]
        self.n_embd = c["hidden_size"]
        self.n_head = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads") or self.n_head
        self.head_dim = c.get("head_dim") or self.n_embd // self.n_head
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq, self.attn_scaling = rope_inv_freq(c, self.head_dim)
        self.window = None
        if arch == "MistralForCausalLM" and c.get("sliding_window"):
            self.window = int(c["sliding_window"])

    def w(self, name: str) -> Optional[np.ndarray]:
        raw = self.t.get(name)
        return None if raw is None else to_float(raw, self.dtype)

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32) if self.dtype == np.float32 else x
        var = np.mean(h * h, axis=-1, keepdims=True)
        h = h / np.sqrt(var + h.dtype.type(self.eps))
        return (weight * h).astype(self.dtype)

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        y = x @ self.w(prefix + ".weight").T
        b = self.w(prefix + ".bias")
        return y + b if b is not None else y

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        n, H, KV, hd = len(tokens), self.n_head, self.n_kv, self.head_dim
        emb_raw = self.t["model.embed_tokens.weight"]
        x = to_float((emb_raw[0][tokens], emb_raw[1]), self.dtype)

        pos = np.arange(n, dtype=np.float32)
        freqs = np.outer(pos, self.inv_freq).astype(np.float32)
        ang = np.concatenate([freqs, freqs], axis=-1)
        cos = (np.cos(ang) * self.attn_scaling).astype(self.dtype)[None]
        sin = (np.sin(ang) * self.attn_scaling).astype(self.dtype)[None]
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        visible = j <= i
        if self.window is not None:
            visible &= (i - j) < self.window
        neg = np.where(visible, 0.0, -np.inf).astype(self.dtype)
        scale = 1.0 / math.sqrt(hd)   # a Python float keeps the array dtype

        for L in range(self.n_layer):
            p = f"model.layers.{L}."
            h = self._rms(x, self.w(p + "input_layernorm.weight"))
            q = self._linear(h, p + "self_attn.q_proj").reshape(n, H, hd).transpose(1, 0, 2)
            k = self._linear(h, p + "self_attn.k_proj").reshape(n, KV, hd).transpose(1, 0, 2)
            v = self._linear(h, p + "self_attn.v_proj").reshape(n, KV, hd).transpose(1, 0, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            rep = H // KV
            k = np.repeat(k, rep, axis=0)
            v = np.repeat(v, rep, axis=0)
            s = (q @ k.transpose(0, 2, 1)) * scale + neg
            s = s.astype(np.float32) if self.dtype == np.float32 else s
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s = (s / s.sum(axis=-1, keepdims=True)).astype(self.dtype)
            a = (s @ v).transpose(1, 0, 2).reshape(n, H * hd)
            x = x + self._linear(a, p + "self_attn.o_proj")
            h = self._rms(x, self.w(p + "post_attention_layernorm.weight"))
            g = self._linear(h, p + "mlp.gate_proj")
            u = self._linear(h, p + "mlp.up_proj")
            x = x + self._linear((g / (1 + np.exp(-g))) * u, p + "mlp.down_proj")

        x = self._rms(x, self.w("model.norm.weight"))
        tied = self.config.get("tie_word_embeddings", False) or "lm_head.weight" not in self.t
        head = self.w("model.embed_tokens.weight" if tied else "lm_head.weight")
        return x @ head.T


def hf_tokenize(model_dir, text: str, add_bos: bool = True) -> list[int]:
    """Token ids from the folder's own tokenizer: ``tokenizer.json`` through ``tokenizers`` when
    present, else ``tokenizer.model`` through sentencepiece; BOS from config.json when asked."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    else:
        import sentencepiece as spm
        ids = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).encode(text)
    bos = json.loads((model_dir / "config.json").read_text()).get("bos_token_id")
    return ([bos] if add_bos and bos is not None else []) + list(ids)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    ref = Reference(argv[0])
    lg = ref.logits([int(t) for t in argv[1:]])
    for i, row in enumerate(lg):
        print(i, int(np.argmax(row)), float(np.linalg.norm(row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
