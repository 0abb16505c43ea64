"""A NumPy reference forward pass of a Hugging Face Llama-family folder.

Independent of ggufq's converter on purpose: it parses the safetensors files itself and
follows the Hugging Face conventions (``transformers``' modeling_llama / mistral / qwen2 /
qwen3 / gemma2 / gemma3 / phi3 / smollm3 / olmo2 / granite), not llama.cpp's, so comparing it with
llama.cpp running a converted GGUF checks the whole conversion (names, Q/K permutation, rope
layout, biases, norm offsets, tied output, rope_freqs). The few facts that tell the families
apart (activation, q/k norms, post-norms, multipliers) are read from ggufq's arch record, so a
wrong record shows up as llama.cpp disagreeing with this forward.

- safetensors: 8-byte little-endian header length, JSON header, raw data; BF16, F16, F32.
- Q/K as stored by HF (rotate-half RoPE, no permutation), GQA, RMSNorm in float32,
  SwiGLU MLP, tied embeddings, q/k/v(/o) biases, rope_theta from ``rope_theta`` or
  ``rope_parameters``, llama3 and yarn rope scaling computed on inv_freq as transformers does,
  linear rope scaling, Mistral's sliding window.
- Mixture of experts (transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE sparse blocks) and
  gpt-oss (``modeling_gpt_oss.py``): attention sinks, sliding / full attention per ``layer_types``,
  yarn rope (``truncate`` honoured), a router with bias and softmax over the top-k logits, experts
  with biases and the clamped SwiGLU ``(clamp(up) + 1) * g * sigmoid(alpha g)``, ``g = min(gate, limit)``;
  MXFP4 experts (``*_blocks`` + ``*_scales``) decoded as transformers' ``convert_moe_packed_tensors``.

Weights are memory-mapped and converted to float layer by layer, so memory holds one
layer's weights plus the activations.

    python -m ggufq_ref.forward MODEL_DIR 1 450 4 9   # prints argmax and logits norm per position
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

_ST_DTYPES = {"BF16": np.dtype("<u2"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
              "U8": np.dtype("u1")}    # U8: MXFP4 blocks and scales (decoded by mxfp4_values)
# transformers' FP4_VALUES (integrations/mxfp4.py): E2M1 code -> value
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


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


def mxfp4_values(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' ``_convert_moe_packed_tensors`` without its final transpose: blocks
    ``[..., G, 16]`` U8 (code 2j in the low nibble, 2j+1 in the high one), scales ``[..., G]`` U8
    (exponent + 127) -> float32 ``[..., G * 32]``."""
    blocks = np.asarray(blocks, np.uint8)
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    v = np.ldexp(FP4_VALUES[codes], (np.asarray(scales).astype(np.int32) - 127)[..., None])
    return v.reshape(*blocks.shape[:-2], -1).astype(np.float32)


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
    if rtype == "yarn":
        return _yarn_inv_freq(rope, config, float(theta), head_dim)
    raise NotImplementedError(f"rope type {rtype!r}")


def _yarn_inv_freq(rope: dict, config: dict, base: float, dim: int) -> tuple[np.ndarray, float]:
    """transformers' ``_compute_yarn_parameters``: interpolated and extrapolated frequencies blended by a
    linear ramp between the correction dims of ``beta_fast`` / ``beta_slow`` (floored / ceiled unless
    ``truncate`` is false, as gpt-oss ships), cos/sin scaled by ``0.1 ln(factor) + 1``."""
    orig = rope.get("original_max_position_embeddings") or config["max_position_embeddings"]
    factor = rope.get("factor") or config["max_position_embeddings"] / orig

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        ms, ms_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = get_mscale(factor, ms) / get_mscale(factor, ms_all) if ms and ms_all \
            else get_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))
    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    extrap = (1.0 / pos_freqs).astype(np.float32)
    interp = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrap_factor = (1 - ramp).astype(np.float32)
    return (interp * (1 - extrap_factor) + extrap * extrap_factor).astype(np.float32), float(attention_factor)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


# family -> HF names of (attention pre-norm, attention post-norm, MLP pre-norm, MLP post-norm)
NORMS = {
    "llama": ("input_layernorm", None, "post_attention_layernorm", None),
    "gemma3": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "olmo2": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


class Reference:
    """``Reference(model_dir).logits(tokens) -> float [n_tokens, vocab]``.

    The HF-side facts of an architecture (activation, norm offset, q/k norms, post-norms,
    multipliers, rope-less layers, fused tensors) come from ggufq's arch record
    (``ArchRecord.forward``); tensor names, rope and attention follow transformers' modeling code.
    """

    def __init__(self, model_dir, dtype=np.float32):
        from ggufq.arch import record_for
        self.config, self.t = load_folder(model_dir)
        c = self.config
        if isinstance(c.get("text_config"), dict):
            c = self.config = {**c, **c["text_config"]}
        rec = record_for(c)
        self.arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
        self.f = rec.forward
        self.family = "gemma3" if rec.name in ("gemma2", "gemma3") else "olmo2" if rec.name == "olmo2" else "llama"
        self.dtype = dtype
        self.n_layer = c["num_hidden_layers"]
        self.n_embd = c["hidden_size"]
        self.n_head = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads") or self.n_head
        self.head_dim = c.get("head_dim") or self.n_embd // self.n_head
        if rec.name == "granite":
            self.head_dim = self.n_embd // self.n_head
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq, self.attn_scaling = rope_inv_freq(c, self.head_dim)
        self.window = None
        if self.arch == "MistralForCausalLM" and c.get("sliding_window"):
            self.window = int(c["sliding_window"])
        # Gemma 3: sliding layers use the local rope base and the window
        self.sliding = [False] * self.n_layer
        if self.family == "gemma3" and c.get("sliding_window"):
            pattern = 2 if rec.name == "gemma2" else c.get("sliding_window_pattern", 6)   # Gemma 2: every other
            types = c.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                             for i in range(self.n_layer)]
            self.sliding = [t == "sliding_attention" for t in types]
            local = dict(c, rope_theta=c.get("rope_local_base_freq", 10000.0), rope_scaling=None)
            self.inv_freq_local, _ = rope_inv_freq(local, self.head_dim)
        # gpt-oss: sliding layers per layer_types (even layers when absent), same rope as the full ones
        self.gpt_oss = rec.name == "gpt-oss"
        if self.gpt_oss and c.get("sliding_window"):
            types = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(self.n_layer)]
            self.sliding = [t == "sliding_attention" for t in types]
            self.inv_freq_local = self.inv_freq
        self.moe = rec.moe
        if rec.moe is not None:
            from ggufq.arch.moe import renormalizes
            self.moe_k = int(c["num_experts_per_tok"])
            self.moe_renorm = renormalizes(rec, c)
        self.use_rope = [True] * self.n_layer
        if self.f.no_rope_every:
            nrl = c.get("no_rope_layers")
            self.use_rope = [bool(x) for x in nrl] if nrl else \
                [(i + 1) % self.f.no_rope_every != 0 for i in range(self.n_layer)]

    def _mlp(self, h: np.ndarray, gate: str, up: str, down: str) -> np.ndarray:
        g = self._linear(h, gate)
        act = _gelu_tanh(g) if self.f.act == "gelu_tanh" else g / (1 + np.exp(-g))
        return self._linear(act * self._linear(h, up), down)

    def _moe(self, h: np.ndarray, p: str) -> np.ndarray:
        """transformers' sparse MoE block: softmax over the router logits (float32), the top-k
        experts per token (renormalised to sum 1 where the model does: Mixtral always, Qwen/OLMoE
        when norm_topk_prob), their SwiGLU outputs weighted; Qwen2-MoE adds a shared expert
        scaled by sigmoid(shared_expert_gate)."""
        if self.gpt_oss:
            return self._gpt_oss_moe(h, p + "mlp.")
        if p + "block_sparse_moe.gate.weight" in self.t:   # Mixtral
            m, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
        else:
            m, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
        logits = (h @ self.w(m + "gate.weight").T).astype(np.float32)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :self.moe_k]
        wts = np.take_along_axis(probs, top, axis=-1)
        if self.moe_renorm:
            wts = wts / wts.sum(axis=-1, keepdims=True)
        out = np.zeros_like(h)
        for e in np.unique(top):
            rows = np.nonzero((top == e).any(axis=-1))[0]
            wt = (wts * (top == e)).sum(axis=-1)[rows, None].astype(self.dtype)
            ex = m + f"experts.{e}."
            out[rows] += self._mlp(h[rows], *(ex + n for n in names)) * wt
        if m + "shared_expert.gate_proj.weight" in self.t:
            sh = self._mlp(h, *(m + f"shared_expert.{n}" for n in names))
            gate = h @ self.w(m + "shared_expert_gate.weight").T
            out = out + sh / (1 + np.exp(-gate))
        return out

    def _gpt_oss_moe(self, h: np.ndarray, m: str) -> np.ndarray:
        """transformers' GptOssMLP: router logits with bias, the top-k of them softmaxed (float32); per
        expert ``gate_up = h @ W[e] + b[e]`` (``W`` ``[expert, in, 2 ff]``, gate = even columns, up = odd),
        ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g)`` with ``g = min(gate, limit)``, then
        ``@ down[e] + down_bias[e]``, weighted."""
        alpha = float(self.config.get("swiglu_alpha", 1.702))
        limit = float(self.config.get("swiglu_limit", 7.0))
        logits = self._linear(h, m + "router").astype(np.float32)
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :self.moe_k]
        vals = np.take_along_axis(logits, top, axis=-1)
        wts = np.exp(vals - vals.max(axis=-1, keepdims=True))
        wts /= wts.sum(axis=-1, keepdims=True)
        gu_b, down_b = self.w(m + "experts.gate_up_proj_bias"), self.w(m + "experts.down_proj_bias")
        out = np.zeros_like(h)
        for e in np.unique(top):
            rows = np.nonzero((top == e).any(axis=-1))[0]
            wt = (wts * (top == e)).sum(axis=-1)[rows, None].astype(self.dtype)
            gu = self._expert_matmul(h[rows], m + "experts.gate_up_proj", e) + gu_b[e]
            gate, up = np.minimum(gu[:, ::2], limit), np.clip(gu[:, 1::2], -limit, limit)
            act = (up + 1) * (gate / (1 + np.exp(-alpha * gate)))
            out[rows] += (self._expert_matmul(act, m + "experts.down_proj", e) + down_b[e]) * wt
        return out

    def _expert_matmul(self, x: np.ndarray, name: str, e: int) -> np.ndarray:
        """``x @ W[e]`` of a gpt-oss expert tensor (a seam for tests that model a runtime's kernel)."""
        return x @ self._expert(name, e)

    def _expert(self, name: str, e: int) -> np.ndarray:
        """One expert's ``[in, out]`` matrix of a gpt-oss stacked tensor: BF16 checkpoints store
        ``[expert, in, out]``; MXFP4 ones ``_blocks`` ``[expert, out, in / 32, 16]`` + ``_scales``,
        which transformers decodes and transposes."""
        if name in self.t:
            return self.w(name)[e]
        (blocks, _), (scales, _) = self.t[name + "_blocks"], self.t[name + "_scales"]
        return mxfp4_values(blocks[e], scales[e]).T.astype(self.dtype)

    def w(self, name: str) -> Optional[np.ndarray]:
        raw = self.t.get(name)
        return None if raw is None else to_float(raw, self.dtype)

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        h = x.astype(np.float32) if self.dtype == np.float32 else x
        var = np.mean(h * h, axis=-1, keepdims=True)
        h = h / np.sqrt(var + h.dtype.type(self.eps))
        if self.f.norm_offset:
            weight = weight + weight.dtype.type(self.f.norm_offset)
        return (weight * h).astype(self.dtype)

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        y = x @ self.w(prefix + ".weight").T
        b = self.w(prefix + ".bias")
        return y + b if b is not None else y

    def _norm(self, x: np.ndarray, p: str, which: int) -> np.ndarray:
        name = NORMS[self.family][which]
        return x if name is None else self._rms(x, self.w(p + name + ".weight"))

    def _cfg(self, key: Optional[str], default: float) -> float:
        v = self.config.get(key) if key else None
        return float(v) if v is not None else default

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        n, H, KV, hd = len(tokens), self.n_head, self.n_kv, self.head_dim
        f = self.f
        emb_raw = self.t["model.embed_tokens.weight"]
        x = to_float((emb_raw[0][tokens], emb_raw[1]), self.dtype)
        if f.embed_scale == "sqrt_embd":
            x = x * self.dtype(np.float32(self.n_embd ** 0.5))
        elif f.embed_scale:
            x = x * self.dtype(self._cfg(f.embed_scale, 1.0))

        pos = np.arange(n, dtype=np.float32)

        def cos_sin(inv):
            freqs = np.outer(pos, inv).astype(np.float32)
            ang = np.concatenate([freqs, freqs], axis=-1)
            return ((np.cos(ang) * self.attn_scaling).astype(self.dtype)[None],
                    (np.sin(ang) * self.attn_scaling).astype(self.dtype)[None])
        cs_full = cos_sin(self.inv_freq)
        cs_local = cos_sin(self.inv_freq_local) if any(self.sliding) else None
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        visible = j <= i
        if self.window is not None:
            visible &= (i - j) < self.window
        neg = np.where(visible, 0.0, -np.inf).astype(self.dtype)
        if any(self.sliding):
            win = int(self.config["sliding_window"])
            neg_local = np.where(visible & ((i - j) < win), 0.0, -np.inf).astype(self.dtype)
        if f.attn_scale == "query_pre_attn_scalar":
            scale = float(self.config["query_pre_attn_scalar"]) ** -0.5
        elif f.attn_scale:
            scale = self._cfg(f.attn_scale, 1.0 / math.sqrt(hd))
        else:
            scale = 1.0 / math.sqrt(hd)   # a Python float keeps the array dtype
        res = self._cfg(f.residual_scale, 1.0)

        for L in range(self.n_layer):
            p = f"model.layers.{L}."
            h = self._norm(x, p, 0)
            if f.fused_qkv:
                qkv = self._linear(h, p + "self_attn.qkv_proj")
                q, k, v = qkv[:, :H * hd], qkv[:, H * hd:(H + KV) * hd], qkv[:, (H + KV) * hd:]
            else:
                q = self._linear(h, p + "self_attn.q_proj")
                k = self._linear(h, p + "self_attn.k_proj")
                v = self._linear(h, p + "self_attn.v_proj")
            if f.qk_norm == "full":
                q = self._rms(q, self.w(p + "self_attn.q_norm.weight"))
                k = self._rms(k, self.w(p + "self_attn.k_norm.weight"))
            q = q.reshape(n, H, hd).transpose(1, 0, 2)
            k = k.reshape(n, KV, hd).transpose(1, 0, 2)
            v = v.reshape(n, KV, hd).transpose(1, 0, 2)
            if f.qk_norm == "head":
                q = self._rms(q, self.w(p + "self_attn.q_norm.weight"))
                k = self._rms(k, self.w(p + "self_attn.k_norm.weight"))
            if self.use_rope[L]:
                cos, sin = cs_local if self.sliding[L] else cs_full
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            rep = H // KV
            k = np.repeat(k, rep, axis=0)
            v = np.repeat(v, rep, axis=0)
            s = (q @ k.transpose(0, 2, 1)) * scale
            if f.attn_softcap and self.config.get(f.attn_softcap):     # Gemma 2: tanh soft-capping of the scores
                cap = self.dtype(self.config[f.attn_softcap])
                s = np.tanh(s / cap) * cap
            s = s + (neg_local if self.sliding[L] else neg)
            s = s.astype(np.float32) if self.dtype == np.float32 else s
            if self.gpt_oss:     # one sink logit per head joins the softmax, then is dropped
                sink = self.w(p + "self_attn.sinks").astype(s.dtype)
                s = np.concatenate([s, np.broadcast_to(sink[:, None, None], (H, n, 1))], axis=-1)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s = (s / s.sum(axis=-1, keepdims=True)).astype(self.dtype)
            if self.gpt_oss:
                s = s[..., :-1]
            a = (s @ v).transpose(1, 0, 2).reshape(n, H * hd)
            x = x + self._norm(self._linear(a, p + "self_attn.o_proj"), p, 1) * self.dtype(res)
            h = self._norm(x, p, 2)
            if self.moe is not None:
                x = x + self._norm(self._moe(h, p), p, 3) * self.dtype(res)
                continue
            if f.fused_gate_up:
                gu = self._linear(h, p + "mlp.gate_up_proj")
                g, u = gu[:, :gu.shape[1] // 2], gu[:, gu.shape[1] // 2:]
            else:
                g = self._linear(h, p + "mlp.gate_proj")
                u = self._linear(h, p + "mlp.up_proj")
            act = _gelu_tanh(g) if f.act == "gelu_tanh" else g / (1 + np.exp(-g))
            x = x + self._norm(self._linear(act * u, p + "mlp.down_proj"), p, 3) * self.dtype(res)

        x = self._rms(x, self.w("model.norm.weight"))
        tied = self.config.get("tie_word_embeddings", False) or "lm_head.weight" not in self.t
        head = self.w("model.embed_tokens.weight" if tied else "lm_head.weight")
        out = x @ head.T
        if f.logit_scale:
            out = out / self.dtype(self._cfg(f.logit_scale, 1.0))
        if f.final_softcap and self.config.get(f.final_softcap):
            cap = float(self.config[f.final_softcap])
            out = np.tanh(out / cap) * cap
        return out


class LlamaCppDeviations(Reference):
    """The reference with the two things llama.cpp's CPU backend computes differently from transformers
    on gpt-oss, to tell conversion errors from runtime ones (tests/test_moe.py, tools/moe_parity.py):

    - yarn: ``ggml_rope_yarn_corr_dims`` always floors / ceils the correction range, where gpt-oss ships
      ``rope_scaling.truncate = false`` (transformers and OpenAI's reference keep it unrounded);
    - MXFP4: ggml-cpu multiplies MXFP4 weights with activations first rounded to Q8_0 (its
      ``vec_dot_type``): per block of 32, d = amax / 127 stored as F16, values rounded to nearest.
    """

    def __init__(self, model_dir, dtype=np.float32):
        super().__init__(model_dir, dtype)
        key = "rope_parameters" if self.config.get("rope_parameters") else "rope_scaling"
        rope = self.config.get(key) or {}
        if rope.get("rope_type", rope.get("type")) == "yarn" and not rope.get("truncate", True):
            c = dict(self.config, **{key: dict(rope, truncate=True)})
            self.inv_freq, self.attn_scaling = rope_inv_freq(c, self.head_dim)
            if self.gpt_oss:
                self.inv_freq_local = self.inv_freq

    def _expert_matmul(self, x: np.ndarray, name: str, e: int) -> np.ndarray:
        if name in self.t:       # BF16 experts: F32 in the GGUF, no activation rounding
            return super()._expert_matmul(x, name, e)
        xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
        amax = np.abs(xb).max(axis=-1, keepdims=True)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
        return super()._expert_matmul((np.round(xb * inv) * d).reshape(x.shape).astype(self.dtype), name, e)


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
