"""The NumPy reference (ggufq_ref/forward.py) agrees with transformers on every arch variant it serves.

Skips without torch/transformers: they are not ggufq dependencies, only this proof uses them.
"""
from __future__ import annotations

import numpy as np
import pytest

from ggufq_ref.forward import Reference, rope_inv_freq
from synth import make_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

VARIANTS = {
    "llama": dict(arch="LlamaForCausalLM"),
    "llama-tied-llama3-rope": dict(arch="LlamaForCausalLM", tied=True, rope=LLAMA3_ROPE),
    "llama-attention-bias": dict(arch="LlamaForCausalLM", bias=True, dtype="F16",
                                 extra_config={"attention_bias": True}),
    "mistral-sliding-window": dict(arch="MistralForCausalLM", extra_config={"sliding_window": 16}),
    "qwen2-bias": dict(arch="Qwen2ForCausalLM", bias=True, dtype="F32", tied=True),
}


def _hf_logits(d, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_matches_transformers(variant, tmp_path):
    kw = dict(VARIANTS[variant])
    extra = kw.pop("extra_config", {})
    d = make_model(tmp_path / variant, hidden=64, heads=4, kv_heads=2, ff=96, layers=2, vocab=8192,
                   extra_config=extra, **kw)
    if variant == "llama-attention-bias":
        _add_o_bias(d)
    ids = list(np.random.default_rng(1).integers(3, 8192, 48))
    hf = _hf_logits(d, ids)
    ref = Reference(d).logits(ids).astype(np.float64)
    rel = np.linalg.norm(ref - hf, axis=1) / np.linalg.norm(hf, axis=1)
    assert rel.max() < 1e-4, (variant, rel.max())


def _add_o_bias(d):
    """make_model writes q/k/v biases only; Llama's attention_bias also has o_proj.bias."""
    from ggufq.source import open_model
    from ggufq_ref.st_writer import write_safetensors
    with open_model(d) as m:
        t = {n: (m[n].read_all(), m[n].dtype) for n in m.tensors}
    rng = np.random.default_rng(7)
    for n in list(t):
        if n.endswith("o_proj.weight"):
            t[n[: -len("weight")] + "bias"] = (0.1 * rng.standard_normal(t[n][0].shape[0]), "F16")
    write_safetensors(d / "model.safetensors", t)


def test_llama3_inv_freq_matches_transformers():
    pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                      rope_scaling=dict(LLAMA3_ROPE, factor=32.0, original_max_position_embeddings=8192))
    want, scaling = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got, s = rope_inv_freq(cfg.to_dict(), 64)
    assert s == scaling
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("truncate", [False, True])
def test_gpt_oss_reference_matches_transformers(truncate, tmp_path):
    """gpt-oss (BF16 experts, as transformers loads them without the MXFP4 kernels): attention sinks,
    sliding window 8 on even layers over 40 tokens, yarn rope with and without truncated correction
    dims, router and expert biases, the clamped SwiGLU."""
    import json
    from tools.synthetic_gptoss import make_gpt_oss
    d = make_gpt_oss(tmp_path / "g", hidden=64, ff=64, layers=2, heads=4, kv_heads=2, experts=4, active=2,
                     shards=2, seed=3, tokenizer="spm", window=8, bf16=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"]["truncate"] = truncate
    (d / "config.json").write_text(json.dumps(cfg))
    ids = list(np.random.default_rng(2).integers(3, 8000, 40))
    hf = _hf_logits(d, ids)
    ref = Reference(d).logits(ids).astype(np.float64)
    rel = np.linalg.norm(ref - hf, axis=1) / np.linalg.norm(hf, axis=1)
    assert rel.max() < 1e-4, rel.max()


def test_yarn_inv_freq_matches_transformers():
    pytest.importorskip("torch")
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    seen = []
    for truncate in (False, True):
        rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 150000.0,
                "original_max_position_embeddings": 4096, "truncate": truncate}
        cfg = GptOssConfig(hidden_size=2880, num_attention_heads=64, head_dim=64, rope_scaling=rope,
                           rope_parameters=rope, rope_theta=150000.0)
        want, scaling = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        got, s = rope_inv_freq(cfg.to_dict(), 64)
        assert s == pytest.approx(scaling, rel=1e-12)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
        seen.append(got)
    assert not np.allclose(seen[0], seen[1], rtol=1e-3)     # truncate changes the ramp
