"""The common dense decoder: an :class:`~ggufq.arch.ArchRecord` + config.json -> GGUF.

Follows llama.cpp's ``TextModel`` (``conversion/base.py``): the config is read as
transformers would give it (``text_config`` merged to the top, the record's
defaults for keys its config class fills in), the common hyperparameter keys come
from the same ``find_hparam`` key lists, rope settings are normalised the same way
(transformers 4's ``rope_theta`` + ``rope_scaling`` and 5's ``rope_parameters``,
with or without ``full_attention`` / ``sliding_attention``), and HF tensor names
go through gguf-py's ``TensorNameMap`` for the record's ``MODEL_ARCH``. Every
tensor's shape is checked against the config before anything is read; a missing
key or tensor, or a wrong shape, is one :class:`~ggufq.GgufqError` line.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Callable, Optional

import gguf
import numpy as np

from .. import GgufqError
from ..plan import ModelInfo
from ..source import Model, SourceTensor
from . import MT, SHAPES, ArchRecord, OutTensor

# HF tensors that carry nothing llama.cpp loads (TextModel.prepare_tensors skips them)
IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_MISSING = object()


class Config:
    """config.json as llama.cpp's converter sees it: ``text_config`` merged to the top,
    then the record's defaults for keys transformers' config class always has."""

    def __init__(self, raw: dict, record: ArchRecord):
        c = dict(raw)
        if isinstance(c.get("text_config"), dict):
            c = {**c, **c["text_config"]}
        for k in record.drop_keys:
            c.pop(k, None)
        for k, v in record.defaults.items():
            if k not in c:
                try:
                    c[k] = v(c) if callable(v) else v
                except KeyError:
                    pass  # the default needs a key that is missing too; need() names it
        self.d = c
        self.arch = record.hf_names[0]

    def find(self, *keys: str, default=None):
        """llama.cpp's find_hparam(optional=True): the value of the first key present."""
        for k in keys:
            if k in self.d:
                return self.d[k]
        return default

    def need(self, *keys: str):
        v = self.find(*keys, default=_MISSING)
        if v is _MISSING or v is None:
            raise GgufqError(f"config.json lacks {keys[0]} needed for {self.arch}")
        return v

    def get(self, key: str, default=None):
        return self.d.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.d


def rope_parameters(c: Config) -> dict:
    """TextModel.__init__'s rope normalisation: one dict with rope_theta, rope_type, ...
    (and ``sliding_attention`` / ``full_attention`` sub-dicts where the config has them)."""
    rp = c.get("rope_parameters", c.get("rope_scaling")) or {}
    rp = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(rp).items()}
    theta = c.find("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
    local = c.find("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq")
    partial = c.find("partial_rotary_factor", "rope_pct", "rope_percent")
    orig = c.find("original_max_position_embeddings")
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
        if "partial_rotary_factor" not in rp and partial is not None:
            rp["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rp and orig is not None:
            rp["original_max_position_embeddings"] = orig
    return rp


@contextmanager
def _overwrites_allowed():
    """Arch keys may overwrite common ones in place, as llama.cpp's subclasses do; gguf-py
    logs a warning for each, which is noise here."""
    log = logging.getLogger("gguf.gguf_writer")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives Q/K (``LlamaModel.permute``) as an index array:
    output row i is input row perm[i]. Each head's rows go from [first half | second half]
    to interleaved pairs, so chunks aligned to heads read only their own rows."""
    idx = np.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


_BLK = re.compile(r"blk\.(\d+)\.")


class TextArch:
    """An architecture instance: the record applied to one config.json."""

    def __init__(self, record: ArchRecord, config: dict):
        self.record = record
        self.hf_names = record.hf_names
        self.cfg = c = Config(config, record)
        self.config = c.d
        self.n_layer = int(c.need("num_hidden_layers", "n_layers", "n_layer", "num_layers"))
        self.n_embd = int(c.need("hidden_size", "n_embd", "dim"))
        self.n_head = int(c.need("num_attention_heads", "n_head", "n_heads"))
        self.n_ff = int(c.need("intermediate_size", "n_inner", "hidden_dim"))
        self.n_vocab = int(c.need("vocab_size"))
        self.n_head_kv = int(c.find("num_key_value_heads", "n_kv_heads") or self.n_head)
        hd = c.get("head_dim")
        self.head_dim = int(hd) if hd else self.n_embd // self.n_head
        self.tied = bool(c.get("tie_word_embeddings", False))
        for what, v in (("num_hidden_layers", self.n_layer), ("hidden_size", self.n_embd),
                        ("num_attention_heads", self.n_head), ("num_key_value_heads", self.n_head_kv),
                        ("head_dim", self.head_dim), ("vocab_size", self.n_vocab)):
            if v <= 0:
                raise GgufqError(f"config.json: {what} = {v} for {self.hf_names[0]}")
        if self.n_head % self.n_head_kv:
            raise GgufqError(f"config.json: num_attention_heads {self.n_head} is not a multiple of "
                             f"num_key_value_heads {self.n_head_kv}")
        self.rope_parameters = rope_parameters(c)
        # the rope settings of full-attention layers, flat (what calib and rope_freqs read)
        self.rope = dict(self.rope_parameters.get("full_attention", self.rope_parameters))
        self.permute_qk = record.permute_qk

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        return self.record.gguf_arch

    def model_info(self) -> ModelInfo:
        return ModelInfo(arch=self.name, n_layer=self.n_layer, n_embd=self.n_embd,
                         n_head=self.n_head, n_head_kv=self.n_head_kv,
                         n_expert=int(self.cfg.find("num_local_experts", "num_experts", "n_routed_experts") or 0))

    # ---- metadata ---------------------------------------------------------------------
    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        """TextModel.set_gguf_parameters, then the record's own keys (all before general.file_type)."""
        c = self.cfg
        if not self.record.common_keys:
            self.record.keys(self, w)
            return
        w.add_block_count(self.n_layer)
        if (n_ctx := c.find("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                            "max_sequence_length", "model_max_length")) is not None:
            w.add_context_length(n_ctx)
        if (v := c.find("hidden_size", "n_embd", "dim")) is not None:
            w.add_embedding_length(v)
        if (v := c.find("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                        "n_inner", "hidden_dim")) is not None:
            w.add_feed_forward_length(v)
        if (v := c.find("num_attention_heads", "n_head", "n_heads")) is not None:
            w.add_head_count(v)
        if (v := c.find("num_key_value_heads", "n_kv_heads")) is not None:
            w.add_head_count_kv(v)
        if c.get("is_causal") is False:
            w.add_causal_attention(False)
        self._write_rope(w)
        if (v := c.find("rms_norm_eps", "norm_eps")) is not None:
            w.add_layer_norm_rms_eps(v)
        if (v := c.find("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
            w.add_layer_norm_eps(v)
        if (v := c.find("num_local_experts", "num_experts", "n_routed_experts")) is not None:
            w.add_expert_count(v)
        if (v := c.find("num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
            w.add_expert_used_count(v)
        if (v := c.get("head_dim")) is not None:
            w.add_key_length(v)
            w.add_value_length(v)
        if self.record.keys is not None:
            with _overwrites_allowed():
                self.record.keys(self, w)

    def write_arch_extras(self, w: gguf.GGUFWriter) -> None:
        """Keys llama.cpp's converter adds after general.file_type for this arch."""
        if self.record.keys_after_ftype is not None:
            with _overwrites_allowed():
                self.record.keys_after_ftype(self, w)

    def _write_rope(self, w: gguf.GGUFWriter) -> None:
        rp = self.rope
        rtype = rp.get("rope_type")
        if rtype is not None:
            factor = rp.get("factor")
            if rtype == "linear" and factor is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(factor)
            elif rtype == "yarn" and factor is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                w.add_rope_scaling_factor(factor)
                if rp.get("original_max_position_embeddings") is None:
                    raise GgufqError(f"config.json: yarn rope scaling lacks original_max_position_embeddings "
                                     f"needed for {self.hf_names[0]}")
                w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
                if (v := rp.get("extrapolation_factor")) is not None:
                    w.add_rope_scaling_yarn_ext_factor(v)
                if (v := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
                    w.add_rope_scaling_yarn_attn_factor(v)
                if (v := rp.get("beta_fast")) is not None:
                    w.add_rope_scaling_yarn_beta_fast(v)
                if (v := rp.get("beta_slow")) is not None:
                    w.add_rope_scaling_yarn_beta_slow(v)
            elif rtype in ("su", "longrope"):
                w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            elif rtype not in ("llama3", "dynamic", "default", "linear", "yarn"):
                # llama.cpp's converter only warns and writes a model without the scaling: refuse instead
                raise GgufqError(f"config.json: rope type {rtype!r} is not supported for {self.hf_names[0]} "
                                 "(known: default, linear, yarn, longrope, llama3, dynamic)")
            # llama3: the rope_freqs tensor; dynamic/default: nothing
        if (v := rp.get("rope_theta")) is not None:
            w.add_rope_freq_base(v)
        swa = self.rope_parameters.get("sliding_attention")
        if isinstance(swa, dict) and swa.get("rope_theta") is not None:
            w.add_rope_freq_base_swa(swa["rope_theta"])

    # ---- tensors ----------------------------------------------------------------------
    def dims(self) -> dict[str, int]:
        E, H, KV, hd = self.n_embd, self.n_head, self.n_head_kv, self.head_dim
        d = {"E": E, "F": self.n_ff, "2F": 2 * self.n_ff, "V": self.n_vocab, "hd": hd, "H": H,
             "q": H * hd, "kv": KV * hd, "qkv": (H + 2 * KV) * hd}
        if self.record.moe is not None:
            from .moe import moe_dims
            d.update(moe_dims(self))
        return d

    def shape_of(self, mt: MT, bias: bool = False) -> Optional[tuple[int, ...]]:
        terms = self.record.shapes.get(mt, SHAPES.get(mt))
        if terms is None:
            return None
        d = self.dims()
        shape = tuple(d[t] for t in terms)
        if bias and len(shape) > 1:
            return shape[:-1]      # a matrix's bias: [rows]; a stacked expert tensor's: [n_expert, rows]
        return shape

    def required(self) -> list[tuple[MT, str]]:
        """(tensor type, suffix) every layer must have."""
        out = [(mt, "weight") for mt in self.record.layer]
        out += [(mt, "bias") for mt in self.record.biases]
        if self.record.bias_key and self.cfg.get(self.record.bias_key):
            out += [(mt, "bias") for mt in self.record.bias_tensors if (mt, "bias") not in out]
        return out

    def tensors(self, model: Model) -> list[OutTensor]:
        """Every GGUF tensor, checked against the config; nothing is read yet."""
        rec = self.record
        tmap = gguf.get_tensor_name_map(rec.gguf_arch, self.n_layer)
        order = {mt: i for i, mt in enumerate(gguf.MODEL_TENSORS[rec.gguf_arch])}
        found: dict[str, tuple] = {}
        unmapped = []
        items = model.tensors
        if rec.moe is not None:   # per-expert tensors become one stacked tensor each (ggufq.arch.moe)
            from .moe import stacked_sources
            if rec.moe.gate_up == "interleaved":      # gpt-oss's fused (MXFP4) experts
                from .gpt_oss import expert_sources
                items = expert_sources(self, items)
            items = stacked_sources(self, items)
        for hf, t in items.items():
            if hf.endswith(IGNORED_SUFFIXES) or hf in rec.skip_tensors:
                continue
            if hf.endswith(".sinks"):       # GptOssModel.filter_tensors: attention sinks get ".weight"
                hf += ".weight"
            m = tmap.get_type_and_name(hf, try_suffixes=(".weight", ".bias"))
            if m is None:
                unmapped.append(hf)
                continue
            mt, gname = m
            found[gname] = (hf, t, mt)
        if unmapped:
            more = f" (and {len(unmapped) - 3} more)" if len(unmapped) > 3 else ""
            raise GgufqError(f"{self.name}: no GGUF name for tensor {', '.join(sorted(unmapped)[:3])}{more}")

        want = [(MT.TOKEN_EMBD, None, "weight"), (MT.OUTPUT_NORM, None, "weight")]
        want += [(mt, i, sfx) for i in range(self.n_layer) for mt, sfx in self.required()]
        for mt, bid, sfx in want:
            gname = gguf.TENSOR_NAMES[mt].format(bid=bid) + "." + sfx
            if gname not in found:
                raise GgufqError(f"{self.name}: tensor {self._hf_name(tmap, found, gname, sfx, bid)} is "
                                 f"missing (GGUF {gname})")

        out: list[tuple[tuple, OutTensor]] = []
        for t in (rec.generated(self) if rec.generated is not None else []):
            out.append(((0, 0, 0, t.name), t))
        for gname, (hf, t, mt) in found.items():
            bias = gname.endswith(".bias")
            shape = self.shape_of(mt, bias)
            src_shape = tuple(t.shape)
            if mt == MT.TOKEN_EMBD and rec.vocab_rows_from_tokenizer and shape and src_shape[0] > shape[0]:
                src_shape = (shape[0],) + src_shape[1:]   # rows past the vocabulary are dropped
            if shape is not None and src_shape != shape:
                raise GgufqError(f"tensor {hf} has shape {list(t.shape)}, config.json implies {list(shape)}")
            m = _BLK.match(gname)
            bid = int(m.group(1)) if m else -1
            group = 1 if mt == MT.TOKEN_EMBD else (2 if bid >= 0 else 3)
            key = (group, bid, order.get(mt, 999) * 2 + bias, gname)
            native = getattr(t, "native", None)
            out.append((key, OutTensor(gname, src_shape, self._reader(t, mt, hf, src_shape), native,
                                       t.raw if native is not None else None)))
        out.sort(key=lambda kv: kv[0])
        return [t for _, t in out]

    @staticmethod
    def _hf_name(tmap, found: dict, gname: str, sfx: str, bid) -> str:
        """The HF spelling of a missing GGUF tensor, in this checkpoint's naming (its layer prefix)."""
        base = gname[:-len(sfx) - 1]
        cands = [k for k, v in tmap.mapping.items() if v[1] == base and k != base]
        seen = [hf for hf, _, _ in found.values()]
        if bid is not None:
            prefixes = {hf.split(f".{bid}.")[0] + f".{bid}." for hf in seen if f".{bid}." in hf}
        else:
            prefixes = {hf.split(".")[0] + "." for hf in seen}
        for c in cands:
            if any(c.startswith(p) for p in prefixes):
                return f"{c}.{sfx}"
        return gname

    def _reader(self, t: SourceTensor, mt: MT, hf: str, shape: tuple) -> Callable[[int, int], np.ndarray]:
        rec = self.record
        read = t.rows
        if rec.permute_qk and mt in (MT.ATTN_Q, MT.ATTN_K):
            read = _permuted(t, self.n_head if mt == MT.ATTN_Q else self.n_head_kv)
        if rec.norm_offset and hf.endswith("norm.weight"):
            off, dtype, inner = np.float32(rec.norm_offset), t.dtype, read
            # llama.cpp adds the offset after widening bf16 to float32 but keeps F16 as F16 (the sum is
            # rounded to half there)
            read = lambda lo, hi: round_to_dtype(inner(lo, hi) + off, dtype)   # noqa: E731
        return read


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as llama.cpp's converter holds a tensor of that safetensors dtype: F16 stays
    half (rounded to nearest even), everything else is widened to float32."""
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    return x


def _permuted(t: SourceTensor, heads: int) -> Callable[[int, int], np.ndarray]:
    perm = permute_rows(t.shape[0], heads)
    if len(t.shape) == 1:   # a bias: tiny, permute the whole vector
        return lambda lo, hi: t.rows(0, 1)[:, perm][lo:hi]

    def read(lo: int, hi: int) -> np.ndarray:
        src = perm[lo:hi]
        a, b = int(src.min()), int(src.max()) + 1
        return t.rows(a, b)[src - a]
    return read
