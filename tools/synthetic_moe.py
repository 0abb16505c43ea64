"""Synthetic mixture-of-experts checkpoints (Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE), BF16 or FP8.

    python -m tools.synthetic_moe OUT_DIR --arch qwen3moe                 # 8 experts, 2 active
    python -m tools.synthetic_moe OUT_DIR --arch mixtral --experts 64 --hidden 512
    python -m tools.synthetic_moe OUT_DIR --arch qwen3moe --fp8 e4m3      # FP8, [128,128] blocks

A sibling of tools/synthetic_archs.py (its tokenizer writers and BF16 rounding are reused):
config.json shaped like the published ones (Qwen3-30B-A3B, Mixtral-8x7B, Qwen1.5-MoE-A2.7B,
OLMoE-1B-7B, transformers 4 style keys), per-expert tensors under their HF names, several
safetensors shards with an index, weights streamed tensor by tensor and seeded (same seed -> same
bytes). ``--fp8``: every attention / expert / shared-expert matrix stored as FP8 codes with a
``weight_scale_inv`` per ``weight_block_size`` block (amax / FP8 max, F32), as DeepSeek-V3 and
Qwen3-FP8 checkpoints are; embeddings, norms, routers and lm_head stay BF16 as there.
``make_moe(..., mutate=...)`` lets tests break a checkpoint (drop an expert, reshape one, drop a scale).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np


from tools.synthetic_archs import QWEN3_TEMPLATE, write_bpe_tokenizer
from ggufq_ref.st_writer import shard_name, st_header
from tools.common import ROOT, TINY, f32_to_bf16_bits

HERE = ROOT / "tools"

# family -> (HF class, model_type, tokenizer kind)
FAMILIES = {
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe", "bpe"),
    "mixtral": ("MixtralForCausalLM", "mixtral", "spm"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe", "bpe"),
    "olmoe": ("OlmoeForCausalLM", "olmoe", "bpe"),
}
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")


def write_llama_spm_tokenizer(out: Path) -> dict:
    """The tiny model's tokenizer.model with Llama's <unk>/<s>/</s> (Mixtral's tokenizer kind)."""
    shutil.copy(TINY / "tokenizer.model", out / "tokenizer.model")
    tc = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
          "unk_token": "<unk>", "pad_token": None, "legacy": False, "model_max_length": 32768,
          "tokenizer_class": "LlamaTokenizer", "chat_template": MISTRAL_TEMPLATE, "sp_model_kwargs": {}}
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>"}))
    return {"bos": 1, "eos": 2, "n": 8192}


def hf_tensors(fam: str, E: int, L: int, H: int, KV: int, hd: int, Fx: int, X: int, V: int, tied: bool,
               Fs: int = 0):
    """(name, shape, init, fp8-able) in HF's order (alphabetical within a layer)."""
    q, kv = H * hd, KV * hd
    out = [("model.embed_tokens.weight", (V, E), "embed", False)]
    for i in range(L):
        p = f"model.layers.{i}."
        t = [(p + "input_layernorm.weight", (E,), "norm", False),
             (p + "post_attention_layernorm.weight", (E,), "norm", False),
             (p + "self_attn.k_proj.weight", (kv, E), "normal", True),
             (p + "self_attn.o_proj.weight", (E, q), "normal", True),
             (p + "self_attn.q_proj.weight", (q, E), "normal", True),
             (p + "self_attn.v_proj.weight", (kv, E), "normal", True)]
        if fam == "qwen2moe":
            t += [(p + f"self_attn.{w}_proj.bias", (n,), "bias", False) for w, n in (("q", q), ("k", kv), ("v", kv))]
        if fam == "qwen3moe":
            t += [(p + "self_attn.k_norm.weight", (hd,), "norm", False), (p + "self_attn.q_norm.weight", (hd,), "norm", False)]
        if fam == "olmoe":
            t += [(p + "self_attn.k_norm.weight", (kv,), "norm", False), (p + "self_attn.q_norm.weight", (q,), "norm", False)]
        if fam == "mixtral":
            m = p + "block_sparse_moe."
            t.append((m + "gate.weight", (X, E), "router", False))
            for x in range(X):
                t += [(m + f"experts.{x}.w1.weight", (Fx, E), "normal", True),
                      (m + f"experts.{x}.w2.weight", (E, Fx), "normal", True),
                      (m + f"experts.{x}.w3.weight", (Fx, E), "normal", True)]
        else:
            m = p + "mlp."
            t.append((m + "gate.weight", (X, E), "router", False))
            for x in range(X):
                t += [(m + f"experts.{x}.down_proj.weight", (E, Fx), "normal", True),
                      (m + f"experts.{x}.gate_proj.weight", (Fx, E), "normal", True),
                      (m + f"experts.{x}.up_proj.weight", (Fx, E), "normal", True)]
            if fam == "qwen2moe":
                t += [(m + "shared_expert.down_proj.weight", (E, Fs), "normal", True),
                      (m + "shared_expert.gate_proj.weight", (Fs, E), "normal", True),
                      (m + "shared_expert.up_proj.weight", (Fs, E), "normal", True),
                      (m + "shared_expert_gate.weight", (1, E), "router", False)]
        out += sorted(t)
    out.append(("model.norm.weight", (E,), "norm", False))
    if not tied:
        out.append(("lm_head.weight", (V, E), "normal", False))
    return out


def config_for(fam: str, E, L, H, KV, hd, Fx, X, K, V, tied, tok, Fs=0, dense_ff=None) -> dict:
    cls, mtype, _ = FAMILIES[fam]
    c = {"architectures": [cls], "model_type": mtype, "hidden_size": E, "num_hidden_layers": L,
         "num_attention_heads": H, "num_key_value_heads": KV, "vocab_size": V, "tie_word_embeddings": tied,
         "torch_dtype": "bfloat16", "transformers_version": "4.53.0", "use_cache": True,
         "initializer_range": 0.02, "attention_dropout": 0.0, "hidden_act": "silu",
         "bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "num_experts_per_tok": K,
         "output_router_logits": False, "router_aux_loss_coef": 0.001}
    if fam == "qwen3moe":     # Qwen3-30B-A3B
        c.update(attention_bias=False, head_dim=hd, intermediate_size=dense_ff or 3 * Fx,
                 moe_intermediate_size=Fx, num_experts=X, norm_topk_prob=True, decoder_sparse_step=1,
                 mlp_only_layers=[], max_position_embeddings=40960, max_window_layers=L, rms_norm_eps=1e-6,
                 rope_scaling=None, rope_theta=1000000.0, sliding_window=None, use_sliding_window=False)
    elif fam == "mixtral":    # Mixtral-8x7B-v0.1
        c.update(intermediate_size=Fx, num_local_experts=X, max_position_embeddings=32768, rms_norm_eps=1e-5,
                 rope_theta=1000000.0, sliding_window=None)
    elif fam == "qwen2moe":   # Qwen1.5-MoE-A2.7B
        c.update(intermediate_size=dense_ff or 4 * Fx, moe_intermediate_size=Fx, shared_expert_intermediate_size=Fs,
                 num_experts=X, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                 max_position_embeddings=8192, max_window_layers=L, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 sliding_window=None, use_sliding_window=False, qkv_bias=True)
    elif fam == "olmoe":      # OLMoE-1B-7B-0924
        c.update(attention_bias=False, clip_qkv=None, intermediate_size=Fx, num_experts=X, norm_topk_prob=False,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000.0,
                 pad_token_id=tok.get("pad"))
    return c


def _values(shape, init: str, rng: np.random.Generator, scale: float) -> np.ndarray:
    """One tensor's float32 values (tensors of these tiny models are small; a 64-expert 1B model's
    largest is the embedding, written in one piece)."""
    n = int(np.prod(shape))
    x = rng.standard_normal(n, dtype=np.float32)
    fan_in = shape[-1] if len(shape) > 1 else 1
    if init == "norm":
        x = 1.0 + 0.1 * x
    elif init == "bias":
        x = 0.1 * x
    elif init == "embed":
        x = x * np.float32(scale * 0.5 if scale else 0.02)
    elif init == "router":
        x = x * np.float32(2.0 / np.sqrt(fan_in))      # distinct expert choices per token
    else:
        x = x * (np.float32(scale / np.sqrt(fan_in)) if scale else np.float32(0.02))
    return x.astype(np.float32).reshape(shape)


def fp8_blocks(w: np.ndarray, dtype: str, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, scale_inv float32 [ceil(r/b0), ceil(c/b1)]): per block amax / FP8 max."""
    from ggufq.source_fp8 import fp8_encode
    r, c = w.shape
    b0, b1 = block
    nb0, nb1 = -(-r // b0), -(-c // b1)
    pad = np.zeros((nb0 * b0, nb1 * b1), np.float32)
    pad[:r, :c] = np.abs(w)
    amax = pad.reshape(nb0, b0, nb1, b1).max(axis=(1, 3))
    s = np.where(amax > 0, amax / np.float32(FP8_MAX[dtype]), np.float32(1)).astype(np.float32)
    full = np.repeat(np.repeat(s, b0, 0), b1, 1)[:r, :c]
    return fp8_encode(w / full, dtype), s


def make_moe(out: Path, fam: str, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: Optional[int] = None,
             head_dim: Optional[int] = None, ff: int = 128, experts: int = 8, active: int = 2, shared_ff: int = 256,
             vocab: Optional[int] = None, tied: Optional[bool] = None, shards: int = 3, seed: int = 0,
             scale: float = 1.0, fp8: Optional[str] = None, block: Optional[tuple[int, int]] = (128, 128),
             config_extra: Optional[dict] = None,
             mutate: Optional[Callable[[list], list]] = None) -> Path:
    """A synthetic ``fam`` MoE checkpoint in ``out``. ``fp8``: None, "e4m3" or "e5m2".
    ``mutate(list of (name, shape, init, fp8-able))`` may drop or reshape tensors (bad-input tests)."""
    if fam not in FAMILIES:
        raise ValueError(f"unknown family {fam!r}; one of {', '.join(FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = FAMILIES[fam][2]
    tok = write_bpe_tokenizer(out, "qwen3" if fam == "qwen3moe" else "olmo2") if kind == "bpe" \
        else write_llama_spm_tokenizer(out)
    if fam == "qwen3moe":
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc["chat_template"] = QWEN3_TEMPLATE
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=1, ensure_ascii=False))
    V = vocab or (151936 if kind == "bpe" else tok["n"])
    if kv_heads is None:   # OLMoE is multi-head (llama.cpp's olmoe graph wants k_norm over n_embd); others GQA
        kv_heads = heads if fam == "olmoe" else max(1, heads // 2)
    hd = head_dim or hidden // heads
    if tied is None:
        tied = False
    tensors = hf_tensors(fam, hidden, layers, heads, kv_heads, hd, ff, experts, V, tied, shared_ff)
    if mutate is not None:
        tensors = mutate(tensors)
    cfg = config_for(fam, hidden, layers, heads, kv_heads, hd, ff, experts, active, V, tied, tok, Fs=shared_ff)
    f8 = {"e4m3": "F8_E4M3", "e5m2": "F8_E5M2", None: None}[fp8]
    if f8:
        cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "fmt": fp8, "weight_block_size": list(block) if block else None}
    cfg.update(config_extra or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok["bos"], "eos_token_id": tok["eos"], "do_sample": False}))

    def nbytes(shape, is_f8):
        return int(np.prod(shape)) * (1 if is_f8 else 2)
    entries = []   # (name, shape, init, stored dtype, bytes, index of the values' seed)
    for i, (name, shape, init, f8able) in enumerate(tensors):
        is_f8 = bool(f8 and f8able)
        entries.append((name, shape, init, f8 if is_f8 else "BF16", nbytes(shape, is_f8), i))
        if is_f8:
            sshape = (-(-shape[0] // block[0]), -(-shape[1] // block[1])) if block else (1,)
            entries.append((name + "_scale_inv", sshape, "scale", "F32", int(np.prod(sshape)) * 4, i))
    total = sum(e[4] for e in entries)
    groups: list[list[int]] = [[] for _ in range(max(1, shards))]
    acc = 0
    for k, e in enumerate(entries):
        g = min(len(groups) - 1, acc * len(groups) // max(total, 1))
        if e[2] == "scale":
            g = groups.index(next(gr for gr in groups if k - 1 in gr))   # a scale sits with its weight
        groups[g].append(k)
        acc += e[4]
    groups = [g for g in groups if g]
    weight_map = {}
    scales: dict[int, np.ndarray] = {}
    for gi, g in enumerate(groups):
        fn = shard_name(gi, len(groups))
        with open(out / fn, "wb") as f:
            f.write(st_header((entries[k][0], entries[k][3], entries[k][1], entries[k][4]) for k in g))
            for k in g:
                name, shape, init, dt, nb, src = entries[k]
                if init == "scale":
                    f.write(scales.pop(src).astype("<f4").tobytes())
                else:
                    x = _values(shape, init, np.random.default_rng([seed, src]), scale)
                    if dt in FP8_MAX:
                        if block:
                            codes, s = fp8_blocks(x, dt, block)
                        else:
                            s = np.array([np.abs(x).max() / FP8_MAX[dt]], np.float32)
                            from ggufq.source_fp8 import fp8_encode
                            codes = fp8_encode(x / s[0], dt)
                        scales[src] = s
                        f.write(codes.tobytes())
                    else:
                        f.write(f32_to_bf16_bits(x).tobytes())
                weight_map[name] = fn
    if len(groups) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    n_params = sum(int(np.prod(s)) for _, s, _, _ in tensors)
    (out / "README.md").write_text(
        f"# synthetic-{fam}\n\nRandom {'FP8 ' + fp8 if fp8 else 'BF16'} weights (seed {seed}) in "
        f"{FAMILIES[fam][0]} shapes ({experts} experts, {active} active), made by `tools/synthetic_moe.py`; "
        f"{n_params / 1e6:.1f} M parameters. For tests and benchmarks only.\n\nlicense: apache-2.0\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--arch", choices=list(FAMILIES), default="qwen3moe")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: heads for OLMoE, heads / 2 otherwise")
    ap.add_argument("--ff", type=int, default=128, help="one expert's FFN width")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--active", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="weight std * sqrt(fan_in); 0: HF's fixed 0.02")
    ap.add_argument("--fp8", choices=["e4m3", "e5m2"], default=None)
    a = ap.parse_args(argv)
    make_moe(a.out_dir, a.arch, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, ff=a.ff,
             experts=a.experts, active=a.active, vocab=a.vocab, shards=a.shards, seed=a.seed, scale=a.scale,
             fp8=a.fp8)
    print(a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
