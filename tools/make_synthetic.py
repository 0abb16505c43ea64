"""Synthetic Llama models with random BF16 weights, for memory and speed benchmarks.

    python -m tools.make_synthetic OUT_DIR --size 1B        # Llama-3.2-1B shapes, 2.5 GB
    python -m tools.make_synthetic OUT_DIR --size 0.25B --layers 1 --vocab 9000   # tiny variant for tests

Shapes: 1B is Llama-3.2-1B (hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, vocab
128256, tied embeddings, rope_theta 500000 with llama3 rope scaling factor 32); 0.5B and 0.25B
keep the vocabulary, head size 64, GQA, tying and rope and shrink width and depth; 135M has
SmolLM2-135M's widths and depth (hidden 576, 30 layers, 9 heads / 3 KV heads, FFN 1536; pass
--vocab 49152 for its vocabulary), for timing runs where the real model cannot be carried.

Weights are seeded (same seed -> same bytes) and written streaming, tensor by tensor in row
chunks, into safetensors shards with a ``model.safetensors.index.json``, so generating a
model needs a few tens of MiB whatever its size.

Tokenizer: the tiny real model's SentencePiece ``tokenizer.model`` (8192 pieces) with
``vocab_size`` 128256 in config.json; converters pad the vocabulary with ``[PADn]`` tokens
(llama.cpp's ``_create_vocab_sentencepiece`` does, and so does ggufq), so both llama.cpp's
``convert_hf_to_gguf.py`` and ``ggufq convert`` take the folder as is.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from ggufq_ref.st_writer import shard_name, st_header
from tools.common import ROOT, f32_to_bf16_bits

TOKENIZER_FROM = ROOT / "fixtures" / "tinyllama-spm-10m"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

SIZES = {
    "1B": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ff=8192),     # Llama-3.2-1B
    "0.5B": dict(hidden=1536, layers=12, heads=24, kv_heads=8, ff=4096),
    "0.25B": dict(hidden=1024, layers=8, heads=16, kv_heads=4, ff=4096),
    "135M": dict(hidden=576, layers=30, heads=9, kv_heads=3, ff=1536),    # SmolLM2-135M (use --vocab 49152)
}
VOCAB = 128256
LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
CHUNK = 4 << 20   # elements generated at a time


def tensor_list(s: dict, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, init) in the order HF writes them; init is 'normal' or 'norm'."""
    E, F, hd = s["hidden"], s["ff"], 64
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    out = [("model.embed_tokens.weight", (vocab, E), "normal")]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (E,), "norm"),
                (p + "mlp.down_proj.weight", (E, F), "normal"),
                (p + "mlp.gate_proj.weight", (F, E), "normal"),
                (p + "mlp.up_proj.weight", (F, E), "normal"),
                (p + "post_attention_layernorm.weight", (E,), "norm"),
                (p + "self_attn.k_proj.weight", (kv, E), "normal"),
                (p + "self_attn.o_proj.weight", (E, q), "normal"),
                (p + "self_attn.q_proj.weight", (q, E), "normal"),
                (p + "self_attn.v_proj.weight", (kv, E), "normal")]
    out.append(("model.norm.weight", (E,), "norm"))
    return out


def _chunks(shape, init: str, rng: np.random.Generator):
    n = int(np.prod(shape))
    std = 0.02
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        x = rng.standard_normal(m, dtype=np.float32)
        x = 1.0 + 0.05 * x if init == "norm" else x * np.float32(std)
        yield f32_to_bf16_bits(x.astype(np.float32)).tobytes()


def write_model(out: Path, size: str, seed: int = 0, layers=None, vocab: int = VOCAB,
                shard_bytes: int = 1 << 30, quiet: bool = False) -> Path:
    s = dict(SIZES[size])
    if layers is not None:
        s["layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    tensors = tensor_list(s, vocab)
    # shards: fill each up to shard_bytes (a tensor never spans shards)
    shards: list[list[tuple]] = [[]]
    acc = 0
    for t in tensors:
        nb = int(np.prod(t[1])) * 2
        if shards[-1] and acc + nb > shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(t)
        acc += nb
    n_sh = len(shards)
    weight_map, total = {}, 0
    t0 = time.time()
    idx = 0
    for k, group in enumerate(shards):
        fn = shard_name(k, n_sh)
        with open(out / fn, "wb") as f:
            f.write(st_header((name, "BF16", shape, int(np.prod(shape)) * 2) for name, shape, _ in group))
            for name, shape, init in group:
                rng = np.random.default_rng([seed, idx])
                idx += 1
                for blob in _chunks(shape, init, rng):
                    f.write(blob)
                weight_map[name] = fn
                total += int(np.prod(shape)) * 2
                if not quiet:
                    print(f"\r{fn}: {name:<48} {total / 2**30:6.2f} GiB {time.time() - t0:6.1f} s",
                          end="", file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr)
    if n_sh > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": s["hidden"], "initializer_range": 0.02, "intermediate_size": s["ff"],
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": s["heads"], "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv_heads"], "pretraining_tp": 1, "rms_norm_eps": 1e-5,
        "rope_scaling": dict(LLAMA32_ROPE), "rope_theta": 500000.0, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": vocab,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_FROM / f, out / f)
    n_params = sum(int(np.prod(t[1])) for t in tensors)
    (out / "README.md").write_text(
        f"# synthetic-llama-{size}\n\nRandom BF16 weights (seed {seed}) in Llama shapes, made by "
        f"`python -m tools.make_synthetic --size {size}`; {n_params / 1e9:.3f} B parameters. For benchmarks only.\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="1B")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (small test models)")
    ap.add_argument("--vocab", type=int, default=VOCAB, help=f"config vocab_size (default {VOCAB}; >= 8192)")
    ap.add_argument("--shard-size", type=float, default=1.0, help="GiB per shard (default 1)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--arch", default=None, help="an architecture family of tools/synthetic_archs.py "
                    "(qwen3, gemma2, gemma3, phi3, smollm3, olmo2, granite) instead of the Llama shapes")
    ap.add_argument("--hidden", type=int, default=128, help="with --arch and no --size: hidden size")
    ap.add_argument("--shards", type=int, default=3, help="with --arch: number of safetensors shards")
    a = ap.parse_args(argv)
    if a.arch is not None:
        from tools.synthetic_archs import SIZES as ARCH_SIZES, make_arch
        shape = dict(ARCH_SIZES.get(a.size, {}).get(a.arch) or {}) if "--size" in (argv or sys.argv) else {}
        if not shape:
            shape = dict(hidden=a.hidden, layers=a.layers or 2, heads=4, kv_heads=2, ff=2 * a.hidden)
        elif a.layers is not None:
            shape["layers"] = a.layers
        make_arch(a.out_dir, a.arch, shards=a.shards, seed=a.seed, scale=0.0 if "--size" in (argv or sys.argv) else 1.0,
                  quiet=a.quiet, **shape)
        return 0
    if a.vocab < 8192:
        ap.error("--vocab must cover the 8192-piece tokenizer")
    write_model(a.out_dir, a.size, a.seed, a.layers, a.vocab, int(a.shard_size * 2**30), a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
