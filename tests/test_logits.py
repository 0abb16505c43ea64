"""The converter's F32 output computes what the Hugging Face model computes.

``ggufq convert --type F32`` -> llama-cpp-python (F32 KV cache, fresh process) logits at
every position, against the independent NumPy reference of the HF folder
(ggufq_ref/forward.py, itself checked against transformers in test_reference.py):
||llama - ref|| / ||ref|| < 1e-3 at every position. Real models (tinyllama, SmolLM2) on
their evaluation texts, and synthetic Mistral, Qwen2, llama3-rope and tied models.
Plus tokenizer parity: the GGUF's tokenizer in llama.cpp gives the HF tokenizer's ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from conftest import HELDOUT, TINY, WIKITEXT, run_cli  # noqa: E402
from ggufq_ref.llama_worker import llama_logits, llama_tokenize  # noqa: E402
from ggufq_ref.forward import Reference, hf_tokenize  # noqa: E402
from synth import make_model  # noqa: E402

TOL = 1e-3
MIXED = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tdouble tabs\nnew lines\n\n\nand   runs    of     spaces",
    "digits 0123456789 3.14159 1,000,000 2026-11-27 12:30:45",
    "unicode: café naïve Zürich Ελληνικά русский язык",
    "CJK: 日本語のテキスト 中文文本 한국어",
    "emoji: 🙂 👍🏽 🇫🇷 👨‍👩‍👧",
    "code: def f(x):\n    return x ** 2  # square\n\tif (a && b) { c[i] = 0x1F; }",
    "mixed: ABC abc 123 !?.,;:'\"()[]{}<>@#$%^&*_+=|\\/~`",
]


def _convert(model_dir: Path, out: Path) -> Path:
    r = run_cli("convert", model_dir, "-o", out, "--type", "F32", "-j", "2", "-q")
    assert r.returncode == 0, r.stderr
    return out


def _rel_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)


def _check(model_dir: Path, gguf_path: Path, ids: list[int]) -> np.ndarray:
    ref = Reference(model_dir).logits(ids)
    got = llama_logits(gguf_path, ids)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    rel = _rel_errors(got, ref)
    print(f"\n{model_dir.name}: max rel err {rel.max():.2e}, mean {rel.mean():.2e}")
    assert rel.max() < TOL, f"max rel err {rel.max():.3g} at position {int(rel.argmax())}"
    assert np.mean(got.argmax(1) == ref.argmax(1)) > 0.97
    return got


# ---------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory, tiny):
    return _convert(tiny, tmp_path_factory.mktemp("tiny") / "tiny-F32.gguf")


@pytest.fixture(scope="module")
def smollm2_f32(tmp_path_factory, smollm2):
    return _convert(smollm2, tmp_path_factory.mktemp("smol") / "smollm2-F32.gguf")


def _tiny_text(n: int) -> str:
    """The held-out text where the shared data is beside the checkout, else the fixture's README."""
    src = HELDOUT if HELDOUT.is_file() else (TINY / "README.md")
    return (src.read_text(encoding="utf-8") * 4)[:n]


def test_tinyllama_f32_logits_match_reference(tiny, tiny_f32):
    text = _tiny_text(4000)
    ids = hf_tokenize(tiny, text)[:300]
    assert len(ids) == 300
    _check(tiny, tiny_f32, ids)


def test_smollm2_f32_logits_match_reference(smollm2, smollm2_f32):
    if not WIKITEXT.is_file():
        pytest.skip(f"wikitext not found at {WIKITEXT}")
    text = WIKITEXT.read_text(encoding="utf-8")[5000:9000]
    ids = hf_tokenize(smollm2, text)[:256]
    assert len(ids) == 256
    _check(smollm2, smollm2_f32, ids)


def test_tinyllama_tokenizer_parity(tiny, tiny_f32):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    texts = MIXED + [_tiny_text(1500)]
    want = [sp.encode(t) for t in texts]
    got = llama_tokenize(tiny_f32, texts)
    for t, a, b in zip(texts, want, got):
        assert b == a, f"{t[:40]!r}"


def test_smollm2_tokenizer_parity(smollm2, smollm2_f32):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    texts = MIXED + ([WIKITEXT.read_text(encoding="utf-8")[:1500]] if WIKITEXT.is_file() else [])
    want = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    got = llama_tokenize(smollm2_f32, texts)
    for t, a, b in zip(texts, want, got):
        assert b == a, f"{t[:40]!r}"


# ---------------------------------------------------------------- synthetic architectures
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
SYNTH = {
    "mistral": dict(arch="MistralForCausalLM"),
    "qwen2-bias-tied": dict(arch="Qwen2ForCausalLM", bias=True, tied=True),
    "llama3-rope-tied": dict(arch="LlamaForCausalLM", rope=LLAMA3_ROPE, tied=True),
    "llama-f16-sharded-gqa4": dict(arch="LlamaForCausalLM", dtype="F16", heads=8, kv_heads=2, shards=3),
}


@pytest.mark.parametrize("variant", sorted(SYNTH))
def test_synthetic_f32_logits_match_reference(variant, tmp_path):
    kw = dict(heads=4, kv_heads=2, **SYNTH[variant]) if "heads" not in SYNTH[variant] else dict(SYNTH[variant])
    d = make_model(tmp_path / variant, hidden=128, layers=2, ff=192, vocab=8192, seed=3, **kw)
    out = _convert(d, tmp_path / f"{variant}.gguf")
    ids = [1] + list(np.random.default_rng(5).integers(3, 8192, 95))
    got = _check(d, out, ids)
    if variant.startswith("llama3"):
        # the scaling matters here: the unscaled rope would be far off (so rope_freqs is really used)
        cfg = json.loads((d / "config.json").read_text())
        del cfg["rope_scaling"]
        (d / "config.json").write_text(json.dumps(cfg))
        assert _rel_errors(got, Reference(d).logits(ids)).max() > 10 * TOL
