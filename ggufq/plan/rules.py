"""llama-quantize's mixtures as tables.

Everything here restates, one rule per line, what llama.cpp's
``src/llama-quant.cpp`` does (``tensor_allows_quantization``,
``tensor_get_category``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``, ``llama_ftype_get_default_type``), plus the F32 rules
of ``convert_hf_to_gguf.py`` that decide what an unquantized tensor is written
as. :mod:`ggufq.plan` walks these tables; nothing here knows about files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

# --type -> (general.file_type, default type of a quantizable matrix)   [llama_ftype_get_default_type]
FTYPES: dict[str, tuple[F, T]] = {
    "F32":    (F.ALL_F32,       T.F32),
    "F16":    (F.MOSTLY_F16,    T.F16),
    "BF16":   (F.MOSTLY_BF16,   T.BF16),
    "Q8_0":   (F.MOSTLY_Q8_0,   T.Q8_0),
    "Q4_0":   (F.MOSTLY_Q4_0,   T.Q4_0),
    "Q4_1":   (F.MOSTLY_Q4_1,   T.Q4_1),
    "Q5_0":   (F.MOSTLY_Q5_0,   T.Q5_0),
    "Q5_1":   (F.MOSTLY_Q5_1,   T.Q5_1),
    "Q2_K":   (F.MOSTLY_Q2_K,   T.Q2_K),
    "Q3_K_S": (F.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K":   (F.MOSTLY_Q6_K,   T.Q6_K),
    # i-quants, ternary and MXFP4 mixtures
    "IQ1_S":     (F.MOSTLY_IQ1_S,     T.IQ1_S),
    "IQ1_M":     (F.MOSTLY_IQ1_M,     T.IQ1_M),
    "IQ2_XXS":   (F.MOSTLY_IQ2_XXS,   T.IQ2_XXS),
    "IQ2_XS":    (F.MOSTLY_IQ2_XS,    T.IQ2_XS),
    "IQ2_S":     (F.MOSTLY_IQ2_S,     T.IQ2_XS),
    "IQ2_M":     (F.MOSTLY_IQ2_M,     T.IQ2_S),
    "IQ3_XXS":   (F.MOSTLY_IQ3_XXS,   T.IQ3_XXS),
    "IQ3_XS":    (F.MOSTLY_IQ3_XS,    T.IQ3_S),
    "IQ3_S":     (F.MOSTLY_IQ3_S,     T.IQ3_S),
    "IQ3_M":     (F.MOSTLY_IQ3_M,     T.IQ3_S),
    "IQ4_NL":    (F.MOSTLY_IQ4_NL,    T.IQ4_NL),
    "IQ4_XS":    (F.MOSTLY_IQ4_XS,    T.IQ4_XS),
    "Q2_K_S":    (F.MOSTLY_Q2_K_S,    T.Q2_K),
    "TQ1_0":     (F.MOSTLY_TQ1_0,     T.TQ1_0),
    "TQ2_0":     (F.MOSTLY_TQ2_0,     T.TQ2_0),
    "MXFP4_MOE": (F.MOSTLY_MXFP4_MOE, T.MXFP4),
}

FLOAT_TYPES = (T.F32, T.F16, T.BF16)

# types a map rule may name (the ones ggufq plans; Plan.check_encoders says which it cannot encode yet)
MAP_TYPES: dict[str, T] = {t.name: t for t in (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
    T.IQ4_NL, T.IQ4_XS, T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S,
    T.TQ1_0, T.TQ2_0, T.MXFP4)}

# the IQ2-and-below mixtures: one branch of llama_tensor_get_type_impl of their own (no 70B / 8-expert bumps)
IQ2_GROUP = "IQ2_XXS IQ2_XS IQ2_S IQ2_M IQ1_S IQ1_M"
# types llama-quantize refuses to write without an imatrix (but never for token_embd / output)   [tensor_requires_imatrix]
NEEDS_IMATRIX: tuple[T, ...] = (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S)
NEEDS_IMATRIX_IN: dict[str, tuple[T, ...]] = {"Q2_K_S": (T.Q2_K,)}   # the only k-quant exception
IMATRIX_EXEMPT = ("token_embd.weight", "per_layer_token_embd.weight", "output.weight")

# a type whose block does not divide the row falls back to   [tensor_type_fallback]
# (32-block types have no smaller block: they, and a fallback that still does not fit, become F16)
FALLBACK: dict[T, T] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
}


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def fallback(t: T, n_per_row: int) -> tuple[T, Optional[str]]:
    """``tensor_type_fallback``: the type actually written for rows of ``n_per_row``, and why (None: no fallback)."""
    bs = block_size(t)
    if n_per_row % bs == 0:
        return t, None
    to = FALLBACK.get(t, t)
    if n_per_row % block_size(to):
        return T.F16, f"row {n_per_row} not a multiple of {bs} (nor {block_size(to)}): {t.name} -> F16 fallback"
    return to, f"row {n_per_row} not a multiple of {bs}: {t.name} -> {to.name} fallback"


# ---------------------------------------------------------------------------
# what is never quantized                                   [tensor_allows_quantization]
# (substrings of the GGUF name; besides: < 2 dims, names not ending in "weight")
NOT_QUANTIZED: tuple[str, ...] = (
    "_norm.weight",
    "ffn_gate_inp.weight",          # MoE router
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
NOT_QUANTIZED_EXACT: tuple[str, ...] = (
    "position_embd.weight",         # LLM_TENSOR_POS_EMBD
    "token_types.weight",           # LLM_TENSOR_TOKEN_TYPES
)

# 2-D tensors convert_hf_to_gguf.py always writes as F32 (the rest of the
# unquantized ones keep the intermediate F16/BF16 type)
_CONVERT_F32_TEMPLATES: tuple[str, ...] = (
    "blk.{bid}.ffn_gate_inp",
    "blk.{bid}.ffn_gate_inp_shexp",
    "position_embd",
    "token_types",
    "blk.{bid}.ssm_conv1d",
    "blk.{bid}.ssm_conv1d_q",
    "blk.{bid}.ssm_conv1d_k",
    "blk.{bid}.ssm_conv1d_v",
    "blk.{bid}.shortconv.conv",
    "blk.{bid}.time_mix_first",
    "blk.{bid}.time_mix_w1",
    "blk.{bid}.time_mix_w2",
    "blk.{bid}.time_mix_decay_w1",
    "blk.{bid}.time_mix_decay_w2",
    "blk.{bid}.time_mix_lerp_fused",
    "posnet.{bid}.norm1",
    "posnet.{bid}.norm2",
    "v.position_embd",
    "a.position_embd",
    "blk.{bid}.altup_correct_coef",
    "blk.{bid}.altup_predict_coef",
    "blk.{bid}.indexer.proj",
)
_CONVERT_F32_RE = re.compile("|".join(
    re.escape(t).replace(re.escape("{bid}"), r"\d+") + r"\.weight" for t in _CONVERT_F32_TEMPLATES))


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: dimensions up to the last one above 1 (numpy order is reversed: leading 1s drop)."""
    n = len(shape)
    for d in shape:
        if d != 1 or n == 1:
            break
        n -= 1
    return max(n, 1)


def unquantized_reason(name: str, shape: tuple[int, ...]) -> Optional[str]:
    """Why llama-quantize leaves this tensor as it is, or None when it quantizes it."""
    if ggml_n_dims(shape) < 2:
        return "1-D"
    if not name.endswith("weight"):
        return "not a weight"
    for s in NOT_QUANTIZED:
        if s in name:
            return "norm" if s == "_norm.weight" else s.strip("._").removesuffix(".weight")
    if name in NOT_QUANTIZED_EXACT:
        return name.removesuffix(".weight")
    return None


def convert_keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """convert_hf_to_gguf.py's F32 rule: 1-D, norms, non-weights and a few named tensors."""
    return (len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or bool(_CONVERT_F32_RE.fullmatch(name)))


# ---------------------------------------------------------------------------
# categories, in the order llama.cpp tests them              [tensor_get_category]
OUTPUT, TOKEN_EMBD, ATTN_QKV, ATTN_KV_B, ATTN_V, ATTN_K, ATTN_Q, ATTN_OUTPUT, FFN_UP, FFN_GATE, FFN_DOWN, OTHER = (
    "output", "token_embd", "attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output",
    "ffn_up", "ffn_gate", "ffn_down", "other")

# (exact name or substring, category); first hit wins
CATEGORIES: tuple[tuple[str, str, str], ...] = (
    ("exact", "output.weight",               OUTPUT),
    ("exact", "token_embd.weight",           TOKEN_EMBD),
    ("exact", "per_layer_token_embd.weight", TOKEN_EMBD),
    ("in",    "attn_qkv.weight",             ATTN_QKV),
    ("in",    "attn_kv_b.weight",            ATTN_KV_B),
    ("in",    "attn_v.weight",               ATTN_V),
    ("in",    "attn_k.weight",               ATTN_K),
    ("in",    "attn_q.weight",               ATTN_Q),
    ("in",    "attn_output.weight",          ATTN_OUTPUT),
    ("in",    "ffn_up",                      FFN_UP),
    ("in",    "ffn_gate",                    FFN_GATE),
    ("in",    "ffn_down",                    FFN_DOWN),
)
ATTN_V_LIKE = (ATTN_V, ATTN_QKV, ATTN_KV_B)   # counted by n_attention_wv  [category_is_attn_v]


def category(name: str) -> str:
    for how, s, cat in CATEGORIES:
        if (name == s) if how == "exact" else (s in name):
            return cat
    return OTHER


# architectures whose loader sets LLM_TYPE_70B (their attn_v gets the 70B bump)   [src/models/<arch>.cpp]
TYPE_70B: dict[str, Callable[[int, int, int, int], bool]] = {   # (n_layer, n_head, n_head_kv, n_expert)
    "llama": lambda n_layer, n_head, n_head_kv, n_expert: n_layer == 80 and n_head != n_head_kv and n_expert != 8,
    "qwen2": lambda n_layer, n_head, n_head_kv, n_expert: n_layer == 80,
    "deci":  lambda n_layer, n_head, n_head_kv, n_expert: n_layer == 80,
    "olmo":  lambda n_layer, n_head, n_head_kv, n_expert: n_layer == 80,
    "jais2": lambda n_layer, n_head, n_head_kv, n_expert: n_layer == 68,
}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class Ctx(NamedTuple):
    """What a preset rule may look at for one tensor."""
    arch: str
    ftype: str
    default: T          # the --type's default matrix type
    nx: int             # row length (ne[0])
    i_layer: int        # llama.cpp's layer counter for this category (ffn_*), or the layer from the name (experts)
    i_count: int        # the plain counter of this category (ffn_*), experts or not
    n_layer: int
    i_wv: int           # index among attn_v-like tensors (i_attention_wv)
    n_wv: int           # number of attn_v-like tensors (n_attention_wv)
    n_gqa: int
    n_expert: int
    is_70b: bool
    has_imatrix: bool
    n_mat: int = 1      # ne[2]: matrices stacked in the tensor (experts)

    @property
    def falcon(self) -> bool:
        return self.arch == "falcon"


@dataclass(frozen=True)
class Rule:
    ftypes: str                          # space separated --type names, or "*"
    when: Callable[[Ctx], bool]
    then: T
    why: str                             # formatted with the Ctx fields

    def applies(self, c: Ctx) -> bool:
        return (self.ftypes == "*" or c.ftype in self.ftypes.split()) and self.when(c)


ALWAYS = lambda c: True                  # noqa: E731
K_ALL = "Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K"
R = Rule

# Per category: ordered rules, the first that applies picks the type (none: the --type default).
# Then BUMPS of that category are applied in order, each seeing the type chosen so far.
# llama_tensor_get_type_impl tests MXFP4_MOE first, then the IQ2-and-below mixtures, then the rest
# category by category; each list keeps that order (a rule names its --types, so rules of different
# --types never compete).
_FFN = (FFN_UP, FFN_GATE, FFN_DOWN)


def _mxfp4_moe(cat: str) -> tuple[Rule, ...]:
    """MXFP4_MOE: expert tensors (ne[2] > 1) MXFP4, everything else Q8_0 (bailingmoe3: its FFN experts only)."""
    expert = (lambda c: c.n_mat > 1) if cat in _FFN else (lambda c: c.n_mat > 1 and c.arch != "bailingmoe3")
    return (R("MXFP4_MOE", expert, T.MXFP4, "MXFP4_MOE, expert tensor"),
            R("MXFP4_MOE", ALWAYS, T.Q8_0, "MXFP4_MOE, not an expert tensor"))


def _iq2s(c: Ctx) -> bool:
    return c.ftype in ("IQ2_S", "IQ2_M")


PRESET_RULES: dict[str, tuple[Rule, ...]] = {
    # output.weight, and token_embd.weight when there is no output.weight (tied embeddings)
    OUTPUT: (
        R("MXFP4_MOE", ALWAYS,                                   T.Q8_0, "MXFP4_MOE output"),
        R("*",      lambda c: c.falcon,                          T.Q8_0, "falcon output"),
        R("*",      lambda c: c.nx % block_size(c.default) != 0, T.Q8_0, "output row {nx} not a multiple of {bs} ({default.name})"),
        R(IQ2_GROUP + " IQ3_XXS", ALWAYS,                        T.Q5_K, "output"),
        R("*",      lambda c: c.default != T.Q8_0,               T.Q6_K, "output"),
    ),
    TOKEN_EMBD: _mxfp4_moe(TOKEN_EMBD) + (
        R("IQ2_XXS IQ2_XS IQ1_S IQ1_M", ALWAYS,                  T.Q2_K, "token_embd"),
        R("IQ2_S IQ2_M IQ3_XXS",        ALWAYS,                  T.IQ3_S, "token_embd"),
        R("TQ1_0 TQ2_0",                ALWAYS,                  T.Q4_K, "token_embd"),
    ),
    ATTN_V: _mxfp4_moe(ATTN_V) + (
        R(IQ2_GROUP, lambda c: c.n_gqa >= 4 or c.n_expert >= 4,  T.Q4_K, "attn_v, n_gqa {n_gqa} >= 4 or n_expert {n_expert} >= 4"),
        R(IQ2_GROUP, _iq2s,                                      T.IQ3_S, "attn_v"),
        R(IQ2_GROUP, ALWAYS,                                     T.Q2_K, "attn_v"),
        R("Q2_K",          lambda c: c.n_gqa >= 4,                      T.Q4_K, "attn_v, n_gqa {n_gqa} >= 4"),
        R("Q2_K",          ALWAYS,                                      T.Q3_K, "attn_v, n_gqa {n_gqa} < 4"),
        R("Q2_K_S",        lambda c: c.n_gqa >= 4,                      T.Q4_K, "attn_v, n_gqa {n_gqa} >= 4"),
        R("IQ3_XXS",       lambda c: c.n_gqa >= 4,                      T.Q4_K, "attn_v, n_gqa {n_gqa} >= 4"),
        R("IQ3_XXS",       lambda c: not c.has_imatrix,                 T.IQ3_S, "attn_v, no imatrix"),
        R("IQ3_XS IQ3_S",  lambda c: c.n_gqa >= 4,                      T.Q4_K, "attn_v, n_gqa {n_gqa} >= 4"),
        R("IQ3_M",         ALWAYS,                                      T.Q4_K, "attn_v"),
        R("Q3_K_M",        lambda c: c.i_wv < 2,                        T.Q5_K, "attn_v #{i_wv} < 2"),
        R("Q3_K_M",        ALWAYS,                                      T.Q4_K, "attn_v #{i_wv} >= 2"),
        R("Q3_K_L",        ALWAYS,                                      T.Q5_K, "attn_v"),
        R("IQ4_NL IQ4_XS", lambda c: c.n_gqa >= 4,                      T.Q5_K, "attn_v, n_gqa {n_gqa} >= 4"),
        R("Q4_K_M Q5_K_M", lambda c: use_more_bits(c.i_wv, c.n_wv),     T.Q6_K, "use_more_bits(attn_v, layer {i_wv})"),
        R("Q4_K_S",        lambda c: c.i_wv < 4,                        T.Q5_K, "attn_v #{i_wv} < 4"),
    ),
    ATTN_K: _mxfp4_moe(ATTN_K) + (
        R(IQ2_GROUP, lambda c: c.n_expert == 8,                  T.Q4_K, "attn_k, 8 experts"),
        R("*",       lambda c: c.n_expert == 8,                  T.Q8_0, "attn_k, 8 experts"),
        R("IQ3_XS",  ALWAYS,                                     T.IQ3_XXS, "attn_k"),
        R("IQ3_XXS", ALWAYS,                                     T.IQ2_S, "attn_k"),
    ),
    ATTN_Q: _mxfp4_moe(ATTN_Q) + (
        R("IQ3_XS",  ALWAYS,                                     T.IQ3_XXS, "attn_q"),
        R("IQ3_XXS", ALWAYS,                                     T.IQ2_S, "attn_q"),
    ),
    FFN_DOWN: _mxfp4_moe(FFN_DOWN) + (
        R(IQ2_GROUP, lambda c: c.i_count < c.n_layer // 8 and _iq2s(c), T.IQ3_S, "ffn_down #{i_count} < n_layer/8"),
        R(IQ2_GROUP, lambda c: c.i_count < c.n_layer // 8,        T.Q2_K, "ffn_down #{i_count} < n_layer/8"),
        R("Q2_K",   ALWAYS,                                                   T.Q3_K, "ffn_down"),
        R("Q2_K_S", lambda c: c.i_layer < c.n_layer // 8,                     T.Q4_K, "ffn_down layer {i_layer} < n_layer/8"),
        R("IQ3_XXS", lambda c: not c.has_imatrix and c.i_layer < c.n_layer // 8, T.Q4_K, "no imatrix, ffn_down layer {i_layer} < n_layer/8"),
        R("IQ3_XXS", lambda c: not c.has_imatrix,                             T.Q3_K, "no imatrix, ffn_down"),
        R("Q3_K_M", lambda c: c.i_layer < c.n_layer // 16,                    T.Q5_K, "ffn_down layer {i_layer} < n_layer/16"),
        R("Q3_K_M", lambda c: not c.falcon or use_more_bits(c.i_layer, c.n_layer), T.Q4_K, "ffn_down layer {i_layer}"),
        R("IQ3_M",  lambda c: c.i_layer < c.n_layer // 8,                     T.Q4_K, "ffn_down layer {i_layer} < n_layer/8"),
        R("IQ3_M",  lambda c: c.n_expert == 8 and use_more_bits(c.i_layer, c.n_layer), T.Q4_K, "8 experts, use_more_bits(ffn_down, layer {i_layer})"),
        R("Q3_K_L", lambda c: c.falcon,                                       T.Q4_K, "falcon ffn_down"),
        R("Q3_K_L", ALWAYS,                                                   T.Q5_K, "ffn_down"),
        R("Q4_K_M", lambda c: c.falcon and c.i_layer < c.n_layer // 16,       T.Q6_K, "falcon ffn_down layer {i_layer} < n_layer/16"),
        R("Q4_K_M", lambda c: c.falcon and use_more_bits(c.i_layer, c.n_layer), T.Q5_K, "falcon use_more_bits(ffn_down, layer {i_layer})"),
        R("Q4_K_M", lambda c: not c.falcon and use_more_bits(c.i_layer, c.n_layer), T.Q6_K, "use_more_bits(ffn_down, layer {i_layer})"),
        R("IQ4_NL IQ4_XS", lambda c: not c.has_imatrix and c.i_layer < c.n_layer // 8, T.Q5_K, "no imatrix, ffn_down layer {i_layer} < n_layer/8"),
        R("Q5_K_M", lambda c: use_more_bits(c.i_layer, c.n_layer),            T.Q6_K, "use_more_bits(ffn_down, layer {i_layer})"),
        R("Q4_K_S", lambda c: not c.falcon and c.i_layer < c.n_layer // 8,    T.Q5_K, "ffn_down layer {i_layer} < n_layer/8"),
        R("Q4_0",   lambda c: c.has_imatrix and c.i_layer < c.n_layer // 8,   T.Q4_1, "imatrix, ffn_down layer {i_layer} < n_layer/8"),
        R("Q5_0",   lambda c: c.has_imatrix and c.i_layer < c.n_layer // 8,   T.Q5_1, "imatrix, ffn_down layer {i_layer} < n_layer/8"),
    ),
    ATTN_OUTPUT: _mxfp4_moe(ATTN_OUTPUT) + (
        R(IQ2_GROUP, lambda c: c.n_expert == 8,                  T.Q5_K, "attn_output, 8 experts"),
        R("IQ1_S IQ1_M", ALWAYS,                                 T.IQ2_XXS, "attn_output"),
        R("IQ2_S IQ2_M", ALWAYS,                                 T.IQ3_S, "attn_output"),
        R("Q2_K Q3_K_S Q3_K_M Q4_K_S Q4_K_M IQ3_XS IQ3_XXS IQ4_NL IQ3_S IQ3_M IQ4_XS",
          lambda c: not c.falcon and c.n_expert == 8,            T.Q5_K, "attn_output, 8 experts"),
        R("Q2_K",   lambda c: not c.falcon and c.n_expert != 8,  T.Q3_K, "attn_output"),
        R("IQ3_XXS", lambda c: not c.falcon and c.n_expert != 8, T.IQ3_S, "attn_output"),
        R("Q3_K_M IQ3_M", lambda c: not c.falcon and c.n_expert != 8, T.Q4_K, "attn_output"),
        R("Q3_K_L", lambda c: not c.falcon and c.n_expert != 8,  T.Q5_K, "attn_output"),
        R("Q3_K_L", lambda c: c.falcon,                          T.Q4_K, "falcon attn_output"),
    ),
    FFN_GATE: _mxfp4_moe(FFN_GATE) + (
        R("IQ3_XS", lambda c: c.n_layer // 8 <= c.i_layer < 7 * c.n_layer // 8, T.IQ3_XXS, "ffn_gate layer {i_layer} in the middle 3/4"),
    ),
    FFN_UP: _mxfp4_moe(FFN_UP) + (
        R("IQ3_XS", lambda c: c.n_layer // 8 <= c.i_layer < 7 * c.n_layer // 8, T.IQ3_XXS, "ffn_up layer {i_layer} in the middle 3/4"),
    ),
    OTHER: _mxfp4_moe(OTHER),
}
PRESET_RULES[ATTN_QKV] = PRESET_RULES[ATTN_KV_B] = PRESET_RULES[ATTN_V]
# (llama.cpp's separate ATTENTION_QKV branch is never reached: attn_qkv is attn_v-like and taken above)


@dataclass(frozen=True)
class Bump:
    """Applied after the first-match rule, in order, each seeing the type chosen so far."""
    when: Callable[[Ctx, T], bool]
    then: T
    why: str


def _bumped(c: Ctx) -> bool:
    """The attn_v bumps belong to the general branch: not MXFP4_MOE's, not the IQ2-and-below one."""
    return c.ftype != "MXFP4_MOE" and c.ftype not in IQ2_GROUP.split()


_ATTN_V_BUMPS = (
    Bump(lambda c, t: _bumped(c) and c.is_70b and t in (T.Q3_K, T.Q4_K), T.Q5_K, "70B attn_v"),
    Bump(lambda c, t: _bumped(c) and c.n_expert == 8,                     T.Q8_0, "attn_v, 8 experts"),
)
BUMPS: dict[str, tuple[Bump, ...]] = {ATTN_V: _ATTN_V_BUMPS, ATTN_QKV: _ATTN_V_BUMPS, ATTN_KV_B: _ATTN_V_BUMPS}
