"""The architectures of ggufq.arch end to end on synthetic checkpoints (tools/synthetic_archs.py):

* ``ggufq convert --type F32`` -> llama-cpp-python logits at every position vs the NumPy reference
  forward of the HF weights (ggufq_ref/forward.py): max relative error per position < TOL;
* tokenizer parity: the GGUF's tokenizer in llama.cpp gives the HF tokenizer's ids on a mixed sample;
* bad input: a missing config key, a q_norm of the wrong shape, a fused qkv that does not split ->
  one ``ggufq: error:`` line, exit 1, nothing written.

Parity with llama.cpp's own converter (keys, tensor bytes) is ``tools/arch_parity.py`` (needs torch).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

from tools.synthetic_archs import FAMILIES, QWEN2_VOCAB, make_arch

TOL = 1e-4
# ggml computes GELU through a table indexed by the fp16-rounded input (GGML_GELU_FP16), ~1e-3 per
# activation; the HF reference uses tanh GELU in float32. Emulating the table halves the gap (1.3e-4 ->
# 6e-5 on gemma3), so the rest is float32 noise of the deeper pre/post-norm block.
TOL_GELU = 3e-4
FAMS = sorted(FAMILIES)


def _need_vocab(fam):
    if FAMILIES[fam][2] == "bpe" and not QWEN2_VOCAB.is_file():
        pytest.skip(f"{QWEN2_VOCAB} not found (llama.cpp's source tree)")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    made = {}

    def get(fam):
        if fam not in made:
            _need_vocab(fam)
            made[fam] = make_arch(tmp_path_factory.mktemp(fam) / fam, fam, hidden=128, layers=4, heads=4,
                                  kv_heads=2, ff=256, shards=3, seed=7)
        return made[fam]
    return get


@pytest.mark.parametrize("fam", FAMS)
def test_f32_logits_match_reference(fam, synth, tmp_path):
    pytest.importorskip("llama_cpp")
    from ggufq_ref.llama_worker import llama_logits
    from ggufq_ref.forward import Reference
    d = synth(fam)
    out = tmp_path / f"{fam}.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "F32", "-q")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((d / "config.json").read_text())
    ids = [cfg["bos_token_id"]] + list(np.random.default_rng(5).integers(3, 8000, 63))
    ref = Reference(d).logits(ids).astype(np.float64)
    got = llama_logits(out, ids).astype(np.float64)
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"\n{fam}: max rel err {rel.max():.2e}")
    from ggufq.arch import record_for
    tol = TOL_GELU if record_for(cfg).forward.act == "gelu_tanh" else TOL
    assert rel.max() < tol, f"{fam}: max rel err {rel.max():.3g} at position {int(rel.argmax())}"


MIXED = ["Hello world! The quick brown fox.", "  leading spaces, trailing   ", "tabs\tand\nnew lines\n\n",
         "digits 0123456789 3.14159 1,000,000", "unicode: café naïve Zürich Ελληνικά", "CJK: 日本語 中文 한국어",
         "emoji: 🙂 👍🏽", "code: def f(x):\n    return x ** 2  # sq"]


@pytest.mark.parametrize("fam", ["qwen3", "gemma2", "gemma3", "phi3"])
def test_tokenizer_parity(fam, synth, tmp_path):
    pytest.importorskip("llama_cpp")
    from ggufq_ref.llama_worker import llama_tokenize
    d = synth(fam)
    out = tmp_path / f"{fam}.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "Q8_0", "-q")
    assert r.returncode == 0, r.stderr
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        want = [tok.encode(t, add_special_tokens=False).ids for t in MIXED]
    else:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        want = [sp.encode(t) for t in MIXED]
    got = llama_tokenize(out, MIXED[:len(want)])
    for t, a, b in zip(MIXED, want, got):
        assert b == a, f"{fam}: {t[:40]!r}"


def test_truncated_bpe_vocabulary_tokenizes_as_tokenizers(tmp_path):
    """tools/synthetic_archs.py's bpe_merges (the CPU-trainable checkpoints of docs/ARCHS.md): the byte tokens
    + the first 300 merges, added tokens after them; ggufq names the pre-tokenizer from the pipeline and
    llama.cpp gives the ids of the HF tokenizer."""
    pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer
    from ggufq_ref.llama_worker import llama_tokenize
    d = _tiny(tmp_path, "qwen3")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["vocab_size"] == 640 and cfg["eos_token_id"] == 256 + 300 + 2      # <|im_end|>
    out = tmp_path / "t.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "Q8_0")
    assert r.returncode == 0, r.stderr
    assert "pre-tokenizer 'qwen2' chosen" in r.stderr
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    want = [tok.encode(t, add_special_tokens=False).ids for t in MIXED]
    assert llama_tokenize(out, MIXED) == want


def _bad(d, tmp_path, *, msg):
    out = tmp_path / "bad.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "F16", "-q")
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("ggufq: error:"), r.stderr
    assert msg in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))


def _tiny(tmp_path, fam, **kw):
    """A 1-layer checkpoint in one shard (a BPE family's vocabulary truncated to 300 merges: fast)."""
    _need_vocab(fam)
    return make_arch(tmp_path / "m", fam, hidden=64, layers=1, heads=2, kv_heads=1, ff=128, shards=1,
                     bpe_merges=300 if FAMILIES[fam][2] == "bpe" else None, **kw)


# the shared shape keys (read by every record, here through Qwen3's, Gemma 3's and OLMo 2's) and Phi-3's own
# key writer, which reads rope_theta without a default
MISSING = [("qwen3", "num_attention_heads"), ("gemma3", "hidden_size"), ("olmo2", "intermediate_size"),
           ("phi3", "rope_theta")]


@pytest.mark.parametrize("fam,key", MISSING)
def test_missing_config_key_is_one_line(fam, key, tmp_path):
    d = _tiny(tmp_path, fam)
    cfg = json.loads((d / "config.json").read_text())
    del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))
    _bad(d, tmp_path, msg=f"lacks {key} needed for {FAMILIES[fam][0]}")


def test_q_norm_of_wrong_shape_is_one_line(tmp_path):
    _need_vocab("qwen3")
    d = make_arch(tmp_path / "m", "qwen3", hidden=64, layers=1, heads=2, kv_heads=1, ff=128, shards=1)
    cfg = json.loads((d / "config.json").read_text())
    cfg["head_dim"] = 16          # q_norm is [32]: the weights say head_dim 32
    (d / "config.json").write_text(json.dumps(cfg))
    _bad(d, tmp_path, msg="has shape")


def _replace_tensor(d, name, shape):
    """Rewrite the one-shard checkpoint ``d`` with tensor ``name`` replaced by ones of ``shape``."""
    import struct
    from ggufq_ref.st_writer import st_header
    raw = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    head.pop("__metadata__", None)
    body = raw[8 + n:]
    blobs = []
    for k, v in sorted(head.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = v["data_offsets"]
        blob = body[a:b] if k != name else b"\x80\x3f" * int(np.prod(shape))    # bf16 1.0
        blobs.append((k, v["dtype"], v["shape"] if k != name else list(shape), blob))
    (d / "model.safetensors").write_bytes(st_header((k, t, sh, len(bl)) for k, t, sh, bl in blobs)
                                          + b"".join(bl for *_, bl in blobs))


@pytest.mark.parametrize("fam,width", [("gemma3", 32), ("olmo2", 64)])
def test_q_norm_tensor_of_wrong_shape_is_one_line(fam, width, tmp_path):
    """Gemma 3's q_norm is per head ([head_dim] = 32), OLMo 2's spans all heads ([heads x head_dim] = 64):
    each record checks its own shape before anything is written."""
    d = _tiny(tmp_path, fam)
    name = "model.layers.0.self_attn.q_norm.weight"
    _replace_tensor(d, name, (width // 2,))
    _bad(d, tmp_path, msg=f"tensor {name} has shape [{width // 2}], config.json implies [{width}]")


def test_phi3_qkv_that_does_not_split_is_one_line(tmp_path):
    d = make_arch(tmp_path / "m", "phi3", hidden=64, layers=1, heads=2, kv_heads=2, ff=128, shards=1)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 1  # qkv has rows for 2 kv heads
    (d / "config.json").write_text(json.dumps(cfg))
    _bad(d, tmp_path, msg="qkv_proj")


def _edit_tokenizer(d, fn):
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    fn(tj)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")


def test_unknown_hash_pre_tokenizer_from_regex(tmp_path):
    """A tokenizer.json whose chktxt hash llama.cpp does not list (merges changed) is identified from
    its own normalizer + pre-tokenizer regex, and convert says what it chose; an unknown regex stays a
    one-line error with the --vocab-pre hint."""
    import gguf
    _need_vocab("qwen3")
    d = make_arch(tmp_path / "m", "qwen3", hidden=64, layers=1, heads=2, kv_heads=1, ff=128, shards=1)
    _edit_tokenizer(d, lambda tj: tj["model"].__setitem__("merges", tj["model"]["merges"][:-50000]))
    out = tmp_path / "m.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "Q8_0")
    assert r.returncode == 0, r.stderr
    assert "pre-tokenizer 'qwen2' chosen from tokenizer.json's normalizer NFC" in r.stderr
    f = gguf.GGUFReader(out).fields["tokenizer.ggml.pre"]
    assert bytes(f.parts[-1]).decode() == "qwen2"

    def odd(tj):
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    _edit_tokenizer(d, odd)
    out.unlink()
    _bad(d, tmp_path, msg="--vocab-pre")


@pytest.mark.parametrize("fam", FAMS)
def test_plan_types_equal_llama_cpp(fam, tmp_path):
    """Every tensor's Q4_K_M / Q3_K_M / Q2_K / Q5_K_M type equals llama.cpp's own choice
    (llama_quant_compute_types through ctypes) on rows that k-quants fit (hidden 256, 8 layers)."""
    pytest.importorskip("llama_cpp")
    from ggufq.convert import tensor_specs
    from ggufq.plan import make_plan
    from ggufq_ref import llama_ref
    if not llama_ref.available():
        pytest.skip("llama.cpp's libllama not found")
    _need_vocab(fam)
    d = make_arch(tmp_path / fam, fam, hidden=256, layers=8, heads=4, kv_heads=1, ff=768, vocab=2048, shards=2)
    specs, info = tensor_specs(d)
    for ft in ("Q4_K_M", "Q3_K_M", "Q2_K", "Q5_K_M"):
        plan = make_plan(specs, info, ft)
        ref = llama_ref.compute_types(specs, info, ft, n_ff=768)
        quantized = [e for e in plan.entries if ref.get(e.name) is not None]
        assert len(quantized) >= 8 * 4
        bad = [(e.name, e.qtype.name, ref[e.name].name) for e in quantized if ref[e.name] != e.qtype]
        assert not bad, (ft, bad[:4])
        assert len({e.qtype for e in quantized}) >= 2, ft   # a real mixture, not one type everywhere


def test_llama3_rope_freqs_bit_exact_with_llama_cpp_code():
    """ggufq's rope_freqs equals, bit for bit, LlamaModel.generate_extra_tensors' torch computation
    (copied here from conversion/llama.py) over head sizes that use torch's scalar pow, its SIMD pow
    (SLEEF) and both, and several llama3 rope settings."""
    torch = pytest.importorskip("torch")
    import math
    from ggufq.arch.llama import llama3_rope_factors

    def llama_cpp(rp, dim):
        base = rp.get("rope_theta", 10000.0)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
        old = rp.get("original_max_position_embeddings", 8192)
        lw, hw = old / lo, old / hi
        out = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < hw:
                out.append(1)
            elif wavelen > lw:
                out.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return torch.tensor(out, dtype=torch.float32).numpy()

    n = 0
    for theta in (10000.0, 500000.0, 50000.0, 123456.0):
        for dim in (16, 24, 64, 80, 128):
            for factor, octx, lo, hi in ((8.0, 8192, 1.0, 4.0), (32.0, 8192, 1.0, 4.0), (8.0, 100, 0.5, 8.0)):
                rp = dict(rope_theta=theta, factor=factor, low_freq_factor=lo, high_freq_factor=hi,
                          original_max_position_embeddings=octx)
                want, got = llama_cpp(rp, dim), llama3_rope_factors(rp, dim)
                assert np.array_equal(want.view(np.uint32), got.view(np.uint32)), (rp, dim, want, got)
                n += int(np.count_nonzero((want != 1) & (want != factor)))
    assert n > 20   # the smoothing band, where the order of operations matters, is exercised


# family -> (Ollama template family, control tokens its TEMPLATE writes)
CHAT = {"qwen3": ("qwen3", ("<|im_start|>", "<|im_end|>")),
        "gemma2": ("gemma", ("<start_of_turn>", "<end_of_turn>")),
        "gemma3": ("gemma", ("<start_of_turn>", "<end_of_turn>")),
        "phi3": ("phi3", ("<|user|>", "<|assistant|>", "<|end|>"))}


@pytest.mark.parametrize("fam", sorted(CHAT))
def test_ollama_modelfile_prompt_runs_in_llama_cpp(fam, synth, tmp_path):
    """``convert --ollama`` of the arch's synthetic checkpoint: the Modelfile carries the family's TEMPLATE
    (recognised from the folder's chat template), the prompt it renders is the Jinja template's, each
    control token of it is one special token of the GGUF's vocabulary, and llama-cpp-python loads the file
    and generates from that prompt (Ollama itself is not installed here)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from ggufq import ollama
    from tests import gotmpl
    from tests.modelfile_parser import parse
    d = synth(fam)
    out = tmp_path / f"{fam}-Q8_0.gguf"
    r = run_cli("convert", d, "-o", out, "--type", "Q8_0", "--ollama")
    assert r.returncode == 0, r.stderr
    family, controls = CHAT[fam]
    mf = tmp_path / f"{fam}-Q8_0.Modelfile"
    cmds: dict = {}
    for k, v in parse(mf.read_text()):
        cmds.setdefault(k, []).append(v)
    assert f"chat template: {family}" in r.stderr and "Ollama:" not in r.stderr, r.stderr
    info = ollama.read_gguf([out])
    msgs = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "How are you?"}]
    data = {"System": "", "IsThinkSet": False, "Think": False,
            "Messages": [{"Role": m["role"], "Content": m["content"], "Thinking": ""} for m in msgs]}
    prompt = gotmpl.render(cmds["template"][0], data)
    assert prompt == ollama.prompt_after_bos(info.chat_template, msgs, info.bos, info.eos, info.add_bos)
    llm = llama_cpp.Llama(str(out), n_ctx=256, n_threads=2, seed=0, verbose=False)
    try:
        for c in controls:
            ids = llm.tokenize(c.encode(), add_bos=False, special=True)
            assert len(ids) == 1 and info.tokens[ids[0]] == c, (c, ids)
        toks = llm.tokenize(prompt.encode(), add_bos=info.add_bos, special=True)
        assert sum(info.tokens[t] in controls for t in toks) >= 4
        comp = llm.create_completion(prompt, max_tokens=6, temperature=0.0, stop=cmds["stop"])
        assert comp["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        llm.close()
