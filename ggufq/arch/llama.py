"""Llama (2, 3, 3.x) -> GGUF arch ``llama``; also the base of the other Llama-family archs.

Follows llama.cpp's converter (``conversion/llama.py`` and ``TextModel`` in
``conversion/base.py``): same hyperparameter keys, Q/K rows permuted from HF's
rotate-half layout to llama.cpp's interleaved one, ``rope_freqs`` generated for
llama3 rope scaling, ``output.weight`` omitted when embeddings are tied.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import gguf
import numpy as np

from .. import GgufqError
from ..plan import ModelInfo
from ..source import Model, SourceTensor
from . import OutTensor, register

# keys whose first present name gives the value, as llama.cpp's find_hparam
CTX_KEYS = ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length")
# HF tensors that carry no weights llama.cpp needs
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives Q/K (``LlamaModel.permute``) as an index array:
    output row i is input row perm[i]. Each head's rows go from [first half | second half]
    to interleaved pairs, so chunks aligned to heads read only their own rows."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@register("LlamaForCausalLM", "LLaMAForCausalLM")
class Llama:
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    permute_qk = True          # HF rotate-half -> llama.cpp interleaved rope layout
    writes_vocab_size = True   # llama.cpp's LlamaModel adds llama.vocab_size and rope.dimension_count
    # llama.cpp reads the config through transformers, whose Llama/Mistral configs always carry
    # head_dim (hidden/heads by default), so key/value lengths are written even when config.json lacks it
    always_head_dim = True

    def __init__(self, config: dict):
        self.config = config
        try:
            self.n_layer = int(config["num_hidden_layers"])
            self.n_embd = int(config["hidden_size"])
            self.n_head = int(config["num_attention_heads"])
            self.n_ff = int(config["intermediate_size"])
            self.n_vocab = int(config["vocab_size"])
        except KeyError as e:
            raise GgufqError(f"config.json lacks {e.args[0]} needed for {self.hf_names[0]}") from None
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(config.get("head_dim") or self.n_embd // self.n_head)
        self.tied = bool(config.get("tie_word_embeddings", False))
        # transformers 5 keeps rope settings in rope_parameters, 4 in rope_theta + rope_scaling
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        if isinstance(rope.get("full_attention"), dict):
            rope = dict(rope["full_attention"])
        if "rope_theta" not in rope and config.get("rope_theta") is not None:
            rope["rope_theta"] = config["rope_theta"]
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if "original_max_position_embeddings" not in rope and config.get("original_max_position_embeddings"):
            rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        self.rope = rope

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def model_info(self) -> ModelInfo:
        return ModelInfo(arch=self.name, n_layer=self.n_layer, n_embd=self.n_embd,
                         n_head=self.n_head, n_head_kv=self.n_head_kv,
                         n_expert=int(self.config.get("num_local_experts") or 0))

    # ---- metadata ---------------------------------------------------------------------
    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_block_count(self.n_layer)
        for k in CTX_KEYS:
            if c.get(k) is not None:
                w.add_context_length(int(c[k]))
                break
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        if c.get("num_key_value_heads") is not None:
            w.add_head_count_kv(self.n_head_kv)
        self._write_rope(w)
        if c.get("rms_norm_eps") is not None:
            w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
        if c.get("head_dim") is not None or self.always_head_dim:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)

    def write_arch_extras(self, w: gguf.GGUFWriter) -> None:
        """Keys llama.cpp's converter adds after general.file_type for this arch."""
        if self.writes_vocab_size:
            w.add_vocab_size(self.n_vocab)
            w.add_rope_dimension_count(self.head_dim)

    def _write_rope(self, w: gguf.GGUFWriter) -> None:
        rope = self.rope
        rtype = rope.get("rope_type")
        factor = rope.get("factor")
        if rtype == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rtype == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rope.get(key) is not None:
                    add(float(rope[key]))
            attn = rope.get("attention_factor", rope.get("attn_factor"))
            if attn is not None:
                w.add_rope_scaling_yarn_attn_factor(float(attn))
        elif rtype in (None, "default", "llama3", "dynamic"):
            pass  # llama3 is carried by the rope_freqs tensor
        else:
            raise GgufqError(f"rope type {rtype!r} is not supported for {self.name}")
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(float(rope["rope_theta"]))

    # ---- tensors ----------------------------------------------------------------------
    def expected(self) -> list[tuple[str, str, tuple[int, ...], Optional[int]]]:
        """(HF name, GGUF name, HF shape, permute heads or None) for every tensor the config implies."""
        E, F, V, hd = self.n_embd, self.n_ff, self.n_vocab, self.head_dim
        q_rows, kv_rows = self.n_head * hd, self.n_head_kv * hd
        pq = self.n_head if self.permute_qk else None
        pk = self.n_head_kv if self.permute_qk else None
        out = [("model.embed_tokens.weight", "token_embd.weight", (V, E), None)]
        for i in range(self.n_layer):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            out += [
                (p + "input_layernorm.weight", b + "attn_norm.weight", (E,), None),
                (p + "self_attn.q_proj.weight", b + "attn_q.weight", (q_rows, E), pq),
                (p + "self_attn.k_proj.weight", b + "attn_k.weight", (kv_rows, E), pk),
                (p + "self_attn.v_proj.weight", b + "attn_v.weight", (kv_rows, E), None),
                (p + "self_attn.o_proj.weight", b + "attn_output.weight", (E, q_rows), None),
                (p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (E,), None),
                (p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (F, E), None),
                (p + "mlp.up_proj.weight", b + "ffn_up.weight", (F, E), None),
                (p + "mlp.down_proj.weight", b + "ffn_down.weight", (E, F), None),
            ]
            out += self.layer_biases(p, b, q_rows, kv_rows, pq, pk)
        out.append(("model.norm.weight", "output_norm.weight", (E,), None))
        return out

    def layer_biases(self, p: str, b: str, q_rows: int, kv_rows: int, pq, pk) -> list:
        if not self.config.get("attention_bias"):
            return []
        return [
            (p + "self_attn.q_proj.bias", b + "attn_q.bias", (q_rows,), pq),
            (p + "self_attn.k_proj.bias", b + "attn_k.bias", (kv_rows,), pk),
            (p + "self_attn.v_proj.bias", b + "attn_v.bias", (kv_rows,), None),
            (p + "self_attn.o_proj.bias", b + "attn_output.bias", (self.n_embd,), None),
        ]

    def tensors(self, model: Model) -> list[OutTensor]:
        """Every GGUF tensor, checked against the config; nothing is read yet."""
        out: list[OutTensor] = []
        if self.rope.get("rope_type") == "llama3":
            factors = llama3_rope_factors(self.rope, self.head_dim)
            out.append(OutTensor("rope_freqs.weight", factors.shape, lambda lo, hi, f=factors: f.reshape(1, -1)[lo:hi]))
        seen = set()
        for hf, gg, shape, heads in self.expected():
            t = model[hf]
            if t.shape != shape:
                raise GgufqError(f"tensor {hf} has shape {list(t.shape)}, config.json implies {list(shape)}")
            out.append(OutTensor(gg, shape, self._reader(t, heads)))
            seen.add(hf)
        if "lm_head.weight" in model and not self.tied:
            t = model["lm_head.weight"]
            if t.shape != (self.n_vocab, self.n_embd):
                raise GgufqError(f"tensor lm_head.weight has shape {list(t.shape)}, "
                                 f"config.json implies {[self.n_vocab, self.n_embd]}")
            out.append(OutTensor("output.weight", t.shape, self._reader(t, None)))
        # no lm_head: llama.cpp uses token_embd for the output, as with tied embeddings
        seen.add("lm_head.weight")
        extra = [n for n in model.tensors if n not in seen and not n.endswith(IGNORED_SUFFIXES)]
        if extra:
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise GgufqError(f"{self.name}: no GGUF name for tensor {', '.join(sorted(extra)[:3])}{more}")
        return out

    @staticmethod
    def _reader(t: SourceTensor, heads: Optional[int]) -> Callable[[int, int], np.ndarray]:
        if heads is None:
            return t.rows
        if len(t.shape) == 1:  # a bias: tiny, permute the whole vector
            perm = permute_rows(t.shape[0], heads)
            return lambda lo, hi: t.rows(0, 1)[:, perm][lo:hi]
        perm = permute_rows(t.shape[0], heads)

        def read(lo: int, hi: int) -> np.ndarray:
            src = perm[lo:hi]
            a, b = int(src.min()), int(src.max()) + 1
            return t.rows(a, b)[src - a]
        return read
