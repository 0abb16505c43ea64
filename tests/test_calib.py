"""calib: the NumPy forward on GGUF tensors, self-generated text, and the input moments."""
from __future__ import annotations

import numpy as np
import pytest

from ggufq import calib, vocab as vocabs
from ggufq.convert import prepare
from reference import Reference
from synth import make_model
from test_logits import SYNTH

TOL = 2e-5


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def tiny_p(tiny):
    return prepare(tiny)


def test_forward_matches_reference_on_tinyllama(tiny, tiny_p):
    ids = [1] + list(np.random.default_rng(1).integers(3, 8192, 63))
    with tiny_p.model:
        got = calib.Moments(calib.Forward(tiny_p), np.array([ids])).logits()[0]
    assert _rel(got, Reference(tiny).logits(ids)) < TOL


@pytest.mark.parametrize("variant", sorted(SYNTH))
def test_forward_matches_reference_on_synthetic_archs(variant, tmp_path):
    """Interleaved (llama, mistral) and NeoX (qwen2) rope on the GGUF layout, biases, tied
    embeddings, llama3 rope factors, GQA 4:1 -- streamed weights (no cache) as in the moments pass."""
    kw = dict(heads=4, kv_heads=2, **SYNTH[variant]) if "heads" not in SYNTH[variant] else dict(SYNTH[variant])
    d = make_model(tmp_path / variant, hidden=128, layers=2, ff=192, vocab=8192, seed=3, **kw)
    ids = [1] + list(np.random.default_rng(5).integers(3, 8192, 95))
    p = prepare(d)
    with p.model:
        got = calib.Moments(calib.Forward(p, cache_bytes=0), np.array([ids])).logits()[0]
    assert _rel(got, Reference(d).logits(ids)) < TOL


def test_generation_with_kv_cache_agrees_with_the_full_pass(tiny_p):
    """Near-zero temperature: every sampled token is the argmax of the teacher-forced logits,
    so the cached step-by-step forward computes what the full pass does."""
    with tiny_p.model:
        f = calib.Forward(tiny_p)
        toks = calib.generate(f, 1, n_seq=3, n_tok=40, temperature=1e-6)
        logits = calib.Moments(f, toks).logits()
    assert (toks[:, 0] == 1).all()
    assert (logits[:, :-1].argmax(-1) == toks[:, 1:]).all()


def test_generation_is_seeded_and_samples(tiny_p):
    with tiny_p.model:
        f = calib.Forward(tiny_p)
        a = calib.generate(f, 1, n_seq=4, n_tok=24, seed=7)
        b = calib.generate(f, 1, n_seq=4, n_tok=24, seed=7)
        c = calib.generate(f, 1, n_seq=4, n_tok=24, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) == 4          # temperature 1: the sequences differ


def test_self_generated_text_reads_like_the_training_text(tiny, tiny_p):
    """tinyllama was trained on dictionary entries: its own samples have the entry markup."""
    import sentencepiece as spm
    with tiny_p.model:
        toks = calib.generate(calib.Forward(tiny_p), 1, n_seq=2, n_tok=200)
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    text = " ".join(sp.decode([int(t) for t in r[1:]]) for r in toks)
    assert "Webster" in text or "\\" in text, text[:300]


def test_start_token(tiny, tiny_p, smollm2):
    assert calib.start_token(vocabs.load(tiny, tiny_p.model.config)) == 1              # SPM: BOS
    ps = prepare(smollm2)
    v = vocabs.load(smollm2, ps.model.config)                                          # BPE, no BOS added
    assert v.tokens[calib.start_token(v)] in (b"<|endoftext|>", "<|endoftext|>")


class _Collect(Reference):
    """The reference forward, recording every linear layer's inputs (HF -> GGUF names)."""
    HF2G = {"self_attn.q_proj": "attn_q", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down"}

    def __init__(self, d):
        super().__init__(d)
        self.seen: dict[str, list] = {}
        self._final = False

    def w(self, name):
        self._final = name == "model.norm.weight"
        return super().w(name)

    def _rms(self, x, weight):
        y = super()._rms(x, weight)
        if self._final:
            self.seen.setdefault("output.weight", []).append(y)
        return y

    def _linear(self, x, prefix):
        _, _, layer, key = prefix.split(".", 3)
        if key in self.HF2G:
            self.seen.setdefault(f"blk.{layer}.{self.HF2G[key]}.weight", []).append(x)
        return super()._linear(x, prefix)


def test_moments_equal_the_reference_inputs(tiny, tiny_p):
    toks = np.random.default_rng(2).integers(3, 8192, (2, 48))
    toks[:, 0] = 1
    ref = _Collect(tiny)
    for r in toks:
        ref.logits(r)
    with tiny_p.model:
        mo = calib.Moments(calib.Forward(tiny_p), toks)
        # q/k/v share one moment, gate/up another
        assert mo.get("blk.0.attn_k.weight", 8) is mo.get("blk.0.attn_q.weight", 8)
        assert mo.get("blk.0.ffn_up.weight", 8) is mo.get("blk.0.ffn_gate.weight", 8)
        for name, xs in ref.seen.items():
            x = np.concatenate(xs).astype(np.float64)
            got = mo.get(name, 8)
            want = (x * x).mean(0) if name.endswith("ffn_down.weight") else x.T @ x / len(x)
            assert got.shape == want.shape, name
            assert _rel(got, want) < 1e-4, name
        with pytest.raises(Exception, match="out of order"):
            mo.get("blk.0.attn_q.weight", 8)
