"""Synthetic checkpoints of the architectures ggufq converts, shaped like the published ones.

    python -m tools.make_synthetic OUT_DIR --arch qwen3 --hidden 128 --layers 2   # tiny, for tests
    python -m tools.make_synthetic OUT_DIR --arch gemma3 --size 1B                 # 1B-scale, for bench_memory
    python -m tools.synthetic_archs ...                                          # the same command

Each folder has what a Hugging Face upload has: ``config.json`` written the way the family's
published configs are (transformers 4 style keys, ``rope_scaling``/``rope_theta``, Gemma 3's
``rope_local_base_freq``, Phi-3's ``original_max_position_embeddings``), BF16 weights in several
safetensors shards with an index, streamed (a few tens of MiB whatever the size), seeded (same
seed -> same bytes), and real tokenizer files with the family's chat template:

* byte-level BPE families (Qwen3, SmolLM3, OLMo 2, Granite): a ``tokenizer.json`` rebuilt with the
  ``tokenizers`` library from the Qwen2 vocabulary and merges that llama.cpp ships as
  ``models/ggml-vocab-qwen2.gguf``, with Qwen2's pre-tokenizer regex, so both converters identify
  it (``tokenizer.ggml.pre = qwen2``) and it tokenizes as Qwen's tokenizer does;
* SentencePiece families (Gemma 3, Phi-3): the tiny real model's ``tokenizer.model`` (8192 pieces)
  plus the family's control tokens (Gemma's ``<start_of_turn>``/``<end_of_turn>``, Phi-3's
  ``<|user|>``/``<|assistant|>``/``<|end|>``) as added tokens.

Weights: normal(0, 0.02) matrices (tests use larger scales through ``scale``), norms around 1 (Gemma's
around 0: it stores ``w`` and computes ``1 + w``).
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from ggufq_ref.st_writer import shard_name, st_header
from tools.common import LLAMA_CPP, TINY, f32_to_bf16_bits

QWEN2_VOCAB = LLAMA_CPP / "models" / "ggml-vocab-qwen2.gguf"
CHUNK = 4 << 20

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3's added tokens (id 151643 on): (content, special)
QWEN3_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
               ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
               ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
               ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
               ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
               ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
               ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
               ("<think>", False), ("</think>", False)]

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
# Qwen3's template, trimmed to its message / thinking logic (tools left out)
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] "
    "+ '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")
# Gemma 2's template (google/gemma-2-2b-it): refuses a system message
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")

# family -> (HF class, model_type, tokenizer kind)
FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", "qwen3", "bpe"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", "spm"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", "spm"),
    "phi3": ("Phi3ForCausalLM", "phi3", "spm"),
    "smollm3": ("SmolLM3ForCausalLM", "smollm3", "bpe"),
    "olmo2": ("Olmo2ForCausalLM", "olmo2", "bpe"),
    "granite": ("GraniteForCausalLM", "granite", "bpe"),
}
SIZES = {   # 1B-scale shapes of the published small models
    # Qwen3-1.7B's widths with 16 of its 28 layers (1.1 B parameters); gemma-3-1b (1.0 B, its 262144 vocab
    # padded from the 8192-piece tokenizer)
    "1B": {"qwen3": dict(hidden=2048, layers=16, heads=16, kv_heads=8, head_dim=128, ff=6144),
           "gemma3": dict(hidden=1152, layers=26, heads=4, kv_heads=1, head_dim=256, ff=6912, vocab=262144)},
}


def hf_tensors(fam: str, E: int, L: int, H: int, KV: int, hd: int, F: int, V: int, tied: bool):
    """(name, shape, init) in HF's order (alphabetical within a layer); init: normal | norm | zero-norm."""
    q, kv = H * hd, KV * hd
    gemma = fam in ("gemma2", "gemma3")
    norm = "zero-norm" if gemma else "norm"
    out = [("model.embed_tokens.weight", (V, E), "embed")]
    for i in range(L):
        p = f"model.layers.{i}."
        t = []
        if fam != "olmo2":
            t.append((p + "input_layernorm.weight", (E,), norm))
        if fam == "phi3":
            t += [(p + "mlp.down_proj.weight", (E, F), "normal"), (p + "mlp.gate_up_proj.weight", (2 * F, E), "normal"),
                  (p + "post_attention_layernorm.weight", (E,), norm),
                  (p + "self_attn.o_proj.weight", (E, q), "normal"),
                  (p + "self_attn.qkv_proj.weight", (q + 2 * kv, E), "normal")]
            out += t
            continue
        t += [(p + "mlp.down_proj.weight", (E, F), "normal"), (p + "mlp.gate_proj.weight", (F, E), "normal"),
              (p + "mlp.up_proj.weight", (F, E), "normal"), (p + "post_attention_layernorm.weight", (E,), norm)]
        if gemma:
            t += [(p + "post_feedforward_layernorm.weight", (E,), norm), (p + "pre_feedforward_layernorm.weight", (E,), norm)]
        if fam == "olmo2":
            t += [(p + "post_feedforward_layernorm.weight", (E,), norm)]
        if fam in ("qwen3", "gemma3"):
            t += [(p + "self_attn.k_norm.weight", (hd,), norm)]
        if fam == "olmo2":
            t += [(p + "self_attn.k_norm.weight", (kv,), norm)]
        t += [(p + "self_attn.k_proj.weight", (kv, E), "normal"), (p + "self_attn.o_proj.weight", (E, q), "normal")]
        if fam in ("qwen3", "gemma3"):
            t += [(p + "self_attn.q_norm.weight", (hd,), norm)]
        if fam == "olmo2":
            t += [(p + "self_attn.q_norm.weight", (q,), norm)]
        t += [(p + "self_attn.q_proj.weight", (q, E), "normal"), (p + "self_attn.v_proj.weight", (kv, E), "normal")]
        out += sorted(t)
    out.append(("model.norm.weight", (E,), norm))
    if not tied:
        out.append(("lm_head.weight", (V, E), "normal"))
    return out


def config_for(fam: str, E: int, L: int, H: int, KV: int, hd: int, F: int, V: int, tied: bool,
               tok: dict) -> dict:
    cls, mtype, _ = FAMILIES[fam]
    c = {"architectures": [cls], "model_type": mtype, "hidden_size": E, "num_hidden_layers": L,
         "num_attention_heads": H, "num_key_value_heads": KV, "intermediate_size": F, "vocab_size": V,
         "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "transformers_version": "4.53.0",
         "use_cache": True, "initializer_range": 0.02, "attention_dropout": 0.0,
         "bos_token_id": tok["bos"], "eos_token_id": tok["eos"]}
    if fam == "qwen3":
        c.update(attention_bias=False, head_dim=hd, hidden_act="silu", max_position_embeddings=40960,
                 max_window_layers=L, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1000000,
                 sliding_window=None, use_sliding_window=False)
    elif fam == "gemma2":
        c.update(attention_bias=False, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, head_dim=hd,
                 hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=8192, query_pre_attn_scalar=hd, rms_norm_eps=1e-6, rope_theta=10000.0,
                 sliding_window=4096, cache_implementation="hybrid", pad_token_id=0)
    elif fam == "gemma3":
        c.update(attention_bias=False, attn_logit_softcapping=None, final_logit_softcapping=None, head_dim=hd,
                 hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768, query_pre_attn_scalar=hd,
                 rms_norm_eps=1e-6, rope_local_base_freq=10000, rope_scaling=None, rope_theta=1000000,
                 sliding_window=512, sliding_window_pattern=6, pad_token_id=0)
    elif fam == "phi3":
        c.update(embd_pdrop=0.0, hidden_act="silu", max_position_embeddings=4096,
                 original_max_position_embeddings=4096, resid_pdrop=0.0, rms_norm_eps=1e-5, rope_scaling=None,
                 rope_theta=10000.0, sliding_window=2047, pad_token_id=tok.get("pad"))
    elif fam == "smollm3":
        c.update(attention_bias=False, hidden_act="silu", max_position_embeddings=65536, mlp_bias=False,
                 no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(L)],
                 rms_norm_eps=1e-6, rope_scaling=None, rope_theta=5000000.0, sliding_window=None,
                 use_sliding_window=False, pad_token_id=tok.get("pad"))
    elif fam == "olmo2":
        c.update(attention_bias=False, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
                 rope_scaling=None, rope_theta=500000, pad_token_id=tok.get("pad"))
    elif fam == "granite":
        c.update(attention_bias=False, attention_multiplier=0.015625, embedding_multiplier=12.0,
                 hidden_act="silu", logits_scaling=8.0, max_position_embeddings=131072, mlp_bias=False,
                 residual_multiplier=0.22, rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000000.0,
                 pad_token_id=tok.get("pad"))
    return c


# ---------------------------------------------------------------- tokenizers
_GGUF_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF scalar value types


@functools.lru_cache(maxsize=None)
def _gguf_strings(path: Path, keys: tuple[str, ...]) -> dict[str, list[str]]:
    """The string-array values ``keys`` of a GGUF file's metadata, read in one sequential pass (gguf's
    GGUFReader builds a NumPy view per array item: 8 CPU s for Qwen2's 300k tokens and merges)."""
    import struct
    data = path.read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos, out = 24, {}

    def string(p):
        n = struct.unpack_from("<Q", data, p)[0]
        return data[p + 8:p + 8 + n].decode("utf-8"), p + 8 + n

    def skip(t, p):
        if t == 8:
            return string(p)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, p)
            p += 12
            if et in _GGUF_SIZE:
                return p + n * _GGUF_SIZE[et]
            for _ in range(n):
                p = skip(et, p)
            return p
        return p + _GGUF_SIZE[t]
    for _ in range(n_kv):
        key, pos = string(pos)
        t = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if key in keys and t == 9:
            n = struct.unpack_from("<Q", data, pos + 4)[0]
            pos += 12
            vals = []
            for _ in range(n):
                v, pos = string(pos)
                vals.append(v)
            out[key] = vals
        else:
            pos = skip(t, pos)
    return out


def write_bpe_tokenizer(out: Path, fam: str, merges_kept: Optional[int] = None) -> dict:
    """tokenizer.json + tokenizer_config.json from llama.cpp's Qwen2 vocabulary; returns special ids.

    ``merges_kept`` N truncates it to the 256 byte tokens and the first N merges (Qwen2's token 256 + i is
    merge i's result, so the truncation is itself a complete BPE), the added tokens following at 256 + N:
    the same pre-tokenizer and byte-level rules with a vocabulary small enough to train on a CPU. Its chktxt
    hash is then unknown to llama.cpp (its converter refuses it); ggufq names the pre-tokenizer from the
    Split regex and normalizer (qwen2)."""
    if not QWEN2_VOCAB.is_file():
        raise FileNotFoundError(f"{QWEN2_VOCAB} (llama.cpp's source tree) is needed for a BPE tokenizer")
    kv = _gguf_strings(QWEN2_VOCAB, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tokens, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.merges"]
    n_base = 151643
    if merges_kept is not None:
        if not 0 <= merges_kept <= n_base - 256:
            raise ValueError(f"merges_kept {merges_kept}: 0 to {n_base - 256}")
        n_base, merges = 256 + merges_kept, merges[:merges_kept]
    added = [(n_base + i, t, s) for i, (t, s) in enumerate(QWEN3_ADDED)]
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": s} for i, t, s in added],
          "normalizer": {"type": "NFC"},
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False}, bl]},
          "post_processor": bl, "decoder": bl,
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {t: i for i, t in enumerate(tokens[:n_base])}, "merges": list(merges)}}
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    template = QWEN3_TEMPLATE if fam == "qwen3" else CHATML
    eos = "<|im_end|>" if fam in ("qwen3", "smollm3") else "<|endoftext|>"
    tc = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": eos,
          "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "model_max_length": 131072,
          "clean_up_tokenization_spaces": False, "split_special_tokens": False,
          "tokenizer_class": "Qwen2Tokenizer", "chat_template": template,
          "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": s} for i, t, s in added}}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=1, ensure_ascii=False))
    ids = {t: i for i, t, _ in added}
    return {"bos": ids["<|endoftext|>"], "eos": ids[eos], "pad": ids["<|endoftext|>"], "n": n_base + len(added)}


def write_spm_tokenizer(out: Path, fam: str) -> dict:
    """The tiny model's tokenizer.model plus the family's control tokens as added tokens (ids 8192...)."""
    shutil.copy(TINY / "tokenizer.model", out / "tokenizer.model")
    if fam in ("gemma2", "gemma3"):   # Gemma's SentencePiece adds no dummy prefix (llama.cpp: add_space_prefix False)
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
        mp = spm_pb2.ModelProto()
        mp.ParseFromString((out / "tokenizer.model").read_bytes())
        mp.normalizer_spec.add_dummy_prefix = False
        (out / "tokenizer.model").write_bytes(mp.SerializeToString())
    if fam in ("gemma2", "gemma3"):
        extra = [("<start_of_turn>", True), ("<end_of_turn>", True)]
        template, eos = GEMMA2_TEMPLATE if fam == "gemma2" else GEMMA_TEMPLATE, "<end_of_turn>"
    else:
        extra = [("<|endoftext|>", True), ("<|assistant|>", True), ("<|end|>", True), ("<|user|>", True),
                 ("<|system|>", True)]
        template, eos = PHI3_TEMPLATE, "<|endoftext|>"
    base = [("<unk>", True), ("<s>", True), ("</s>", True)]
    dec = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                    "special": s} for i, (t, s) in enumerate(base)}
    dec.update({str(8192 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": s} for i, (t, s) in enumerate(extra)})
    tc = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": eos,
          "unk_token": "<unk>", "pad_token": "<unk>" if fam in ("gemma2", "gemma3") else "<|endoftext|>",
          "chat_template": template, "legacy": False, "model_max_length": 32768,
          "sp_model_kwargs": {}, "tokenizer_class": "GemmaTokenizer" if fam in ("gemma2", "gemma3") else "LlamaTokenizer",
          "added_tokens_decoder": dec}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>", "pad_token": tc["pad_token"]}))
    ids = {t: 8192 + i for i, (t, _) in enumerate(extra)}
    return {"bos": 1, "eos": ids[eos], "pad": 0 if fam in ("gemma2", "gemma3") else ids["<|endoftext|>"], "n": 8192 + len(extra)}


# ---------------------------------------------------------------- weights
def _values(shape, init: str, rng: np.random.Generator, scale: float, dtype: str):
    n = int(np.prod(shape))
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = np.float32(scale / np.sqrt(fan_in)) if scale else np.float32(0.02)
    for lo in range(0, n, CHUNK):
        x = rng.standard_normal(min(CHUNK, n - lo), dtype=np.float32)
        if init == "norm":
            x = 1.0 + 0.1 * x
        elif init == "zero-norm":
            x = 0.1 * x
        elif init == "embed":
            x = x * np.float32(scale * 0.5 if scale else 0.02)
        else:
            x = x * std
        x = x.astype(np.float32)
        yield f32_to_bf16_bits(x).tobytes() if dtype == "BF16" else x.astype(np.float16).tobytes()


def make_arch(out: Path, fam: str, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              head_dim: Optional[int] = None, ff: int = 256, vocab: Optional[int] = None, tied: Optional[bool] = None,
              shards: int = 3, seed: int = 0, scale: float = 1.0, dtype: str = "BF16",
              config_extra: Optional[dict] = None, quiet: bool = True, bpe_merges: Optional[int] = None) -> Path:
    """A synthetic ``fam`` checkpoint in ``out``. ``scale``: weight std * sqrt(fan_in) (1: unit-gain layers,
    what logits tests want; 0: the fixed 0.02 of HF's initializer, for benchmarks). ``bpe_merges``: the
    byte-level BPE families' vocabulary truncated to that many merges (write_bpe_tokenizer), config
    ``vocab_size`` the token count rounded up to 64 unless ``vocab`` says otherwise."""
    if fam not in FAMILIES:
        raise ValueError(f"unknown family {fam!r}; one of {', '.join(FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = FAMILIES[fam][2]
    tok = write_bpe_tokenizer(out, fam, bpe_merges) if kind == "bpe" else write_spm_tokenizer(out, fam)
    bpe_v = 151936 if bpe_merges is None else -(-tok["n"] // 64) * 64
    V = vocab or (bpe_v if kind == "bpe" else tok["n"] + (8 if fam == "phi3" else 6))
    hd = head_dim or hidden // heads
    if tied is None:
        tied = fam in ("qwen3", "gemma2", "gemma3", "smollm3", "granite")
    tensors = hf_tensors(fam, hidden, layers, heads, kv_heads, hd, ff, V, tied)
    cfg = config_for(fam, hidden, layers, heads, kv_heads, hd, ff, V, tied, tok)
    cfg.update(config_extra or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "do_sample": False}))
    # shards: tensors split into `shards` groups of about equal bytes, a tensor never spans two
    nbytes = [int(np.prod(s)) * 2 for _, s, _ in tensors]
    total = sum(nbytes)
    groups: list[list[int]] = [[] for _ in range(max(1, shards))]
    acc = 0
    for i, nb in enumerate(nbytes):
        groups[min(len(groups) - 1, acc * len(groups) // max(total, 1))].append(i)
        acc += nb
    groups = [g for g in groups if g]
    weight_map = {}
    t0 = time.time()
    st_dtype = "BF16" if dtype == "BF16" else "F16"
    for k, g in enumerate(groups):
        fn = shard_name(k, len(groups))
        with open(out / fn, "wb") as f:
            f.write(st_header((tensors[i][0], st_dtype, tensors[i][1], nbytes[i]) for i in g))
            for i in g:
                name, shape, init = tensors[i]
                for blob in _values(shape, init, np.random.default_rng([seed, i]), scale, dtype):
                    f.write(blob)
                weight_map[name] = fn
        if not quiet:
            print(f"{fn}: {len(g)} tensors, {time.time() - t0:.1f} s", file=sys.stderr)
    if len(groups) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    n_params = sum(int(np.prod(s)) for _, s, _ in tensors)
    (out / "README.md").write_text(
        f"# synthetic-{fam}\n\nRandom {dtype} weights (seed {seed}) in {FAMILIES[fam][0]} shapes, made by "
        f"`python -m tools.make_synthetic --arch {fam}`; {n_params / 1e6:.1f} M parameters. For tests and benchmarks "
        "only.\n\nlicense: apache-2.0\n")
    return out


if __name__ == "__main__":      # the command line of these folders is make_synthetic's (--arch FAMILY)
    from tools.make_synthetic import main
    sys.exit(main())
