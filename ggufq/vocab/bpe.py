"""Byte-level BPE ``tokenizer.json`` -> ``tokenizer.ggml.*`` (``tokenizer.ggml.model = gpt2``).

What llama.cpp's converter writes for such a folder (``_set_vocab_gpt2``), reproduced
without transformers:

* tokens in id order, padded to the config's ``vocab_size`` with ``[PAD{i}]`` (UNUSED);
* token types: NORMAL, CONTROL for special added tokens (or ones that look special,
  ``<|...|>``), USER_DEFINED for the other added tokens;
* merges, special ids, add_bos/add_eos and the chat template through
  ``gguf.SpecialVocab(dir, load_merges=True)``;
* ``tokenizer.ggml.pre`` from the sha256 of the ids the tokenizer gives for llama.cpp's
  ``CHKTXT`` (see :mod:`ggufq.vocab.pre_hashes`), computed with the ``tokenizers`` library
  the way transformers would encode it (special tokens of the post-processor included).
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Optional

import gguf

from .. import GgufqError
from . import Vocab, looks_special, read_json
from .pre_hashes import CHKTXT, LLAMA_CPP_PRE_NAMES, PRE_BY_HASH


def chk_ids(tok) -> list[int]:
    """The ids transformers' tokenizer gives for CHKTXT (what llama.cpp hashes).

    transformers' fast tokenizers encode with tokenizer.json's own pipeline, special tokens of
    its post-processor included; checked against transformers 5.24 (GPT2Tokenizer,
    TokenizersBackend; also with add_bos_token/add_eos_token in tokenizer_config.json, which
    it does not apply to a byte-level tokenizer.json).
    """
    return tok.encode(CHKTXT, add_special_tokens=True).ids


def pre_tokenizer_name(tok) -> tuple[str, Optional[str]]:
    """(sha256 of the CHKTXT ids, the llama.cpp pre-tokenizer name or None)."""
    h = sha256(str(chk_ids(tok)).encode()).hexdigest()
    return h, PRE_BY_HASH.get(h)


# tokenizer.json pre-tokenizer pipelines -> the llama.cpp pre-tokenizer that splits text the same way
# (llama-vocab.cpp's regex_exprs for that name; where several names share one regex, the first here).
# A pipeline is (normalizer types, pre-tokenizer steps), a step being "split:<regex>", "bytelevel",
# "bytelevel+regex" (ByteLevel with GPT-2's own regex) or "digits" (Digits, individual_digits).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_BY_PIPELINE: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {
    ((), ("split:" + _LLAMA3_RE, "bytelevel")): "llama-bpe",
    (("NFC",), ("split:" + _QWEN2_RE, "bytelevel")): "qwen2",
    ((), ("bytelevel+regex",)): "gpt-2",
    ((), ("digits", "bytelevel+regex")): "smollm",
}


def _pipeline(tok_json: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    def flat(node, kind):
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [x for n in node.get(kind, []) for x in flat(n, kind)]
        return [node]
    norm = tuple(n.get("type", "?") for n in flat(tok_json.get("normalizer"), "normalizers"))
    steps = []
    for n in flat(tok_json.get("pre_tokenizer"), "pretokenizers"):
        t = n.get("type")
        if t == "Split":
            pat = n.get("pattern") or {}
            plain = n.get("behavior", "Isolated") == "Isolated" and not n.get("invert") and "Regex" in pat
            steps.append(("split:" if plain else "split-other:") + str(pat.get("Regex", pat.get("String"))))
        elif t == "ByteLevel":
            steps.append(("bytelevel+regex" if n.get("use_regex", True) else "bytelevel")
                         + ("+prefix" if n.get("add_prefix_space") else ""))
        elif t == "Digits":
            steps.append("digits" if n.get("individual_digits") else "digits-grouped")
        else:
            steps.append(str(t))
    return norm, tuple(steps)


def pre_from_pipeline(tok_json: dict) -> tuple[Optional[str], str]:
    """(llama.cpp pre-tokenizer name or None, what in tokenizer.json decided it) from its own
    normalizer and pre-tokenizer steps, for tokenizers whose chktxt hash llama.cpp does not list."""
    norm, steps = _pipeline(tok_json)
    name = PRE_BY_PIPELINE.get((norm, steps))
    shown = ", ".join(s if not s.startswith("split:") else "Split regex" for s in steps) or "no pre_tokenizer"
    where = f"normalizer {'+'.join(norm) or 'none'} and pre_tokenizer [{shown}]"
    return name, where


def _check_byte_level(tok_json: dict, path: Path) -> None:
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise GgufqError(f"{path}: tokenizer model {model.get('type')!r} is not supported "
                         "(only byte-level BPE tokenizer.json, or SentencePiece tokenizer.model)")
    if model.get("byte_fallback") or "Metaspace" in json.dumps(tok_json.get("pre_tokenizer")) \
            or "Metaspace" in json.dumps(tok_json.get("decoder")):
        raise GgufqError(f"{path}: a SentencePiece-style BPE (byte_fallback/Metaspace) is not a byte-level "
                         "BPE; convert it from its tokenizer.model")
    if not model.get("merges"):
        raise GgufqError(f"{path}: BPE model without merges")


def load(model_dir: Path, vocab_size: Optional[int], pre: Optional[str] = None) -> Vocab:
    """The folder's tokenizer.json as GGUF metadata; ``pre`` overrides the detected pre-tokenizer."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise GgufqError("reading tokenizer.json needs the tokenizers package (pip install tokenizers)") from None

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    tok_json = read_json(path)
    if tok_json is None:
        raise GgufqError(f"{model_dir}: no tokenizer.json")
    _check_byte_level(tok_json, path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise GgufqError(f"{path}: the tokenizers library cannot load it ({e})") from None

    vocab = tok.get_vocab(with_added_tokens=True)               # text -> id
    added = tok.get_added_tokens_decoder()                      # id -> AddedToken
    if not vocab:
        raise GgufqError(f"{path}: empty vocabulary")
    n_max = max(vocab.values()) + 1
    if vocab_size is None:
        vocab_size = n_max
    if n_max > vocab_size:
        raise GgufqError(f"{path}: token id {n_max - 1} does not fit config vocab_size {vocab_size}")

    pre, notes = _pre_tokenizer(tok, tok_json, path, pre)
    tokens, types = _tokens(tok, vocab, added, vocab_size)

    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GgufqError(f"{path}: no merges found")
    # newer gguf-py: a ByteLevel post-processor adds nothing, so add_bos/add_eos default to False
    # (tokenizer_config.json's explicit values still win); gguf 0.19 leaves them unset.
    post = tok_json.get("post_processor") or {}
    if any(p.get("type") == "ByteLevel" for p in post.get("processors", [post])):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)

    return Vocab(model="gpt2", tokens=[t.encode("utf-8") for t in tokens], token_types=[int(t) for t in types],
                 pre=pre, notes=notes,
                 special=special)


def _pre_tokenizer(tok, tok_json: dict, path: Path, pre: Optional[str]) -> tuple[str, list[str]]:
    """llama.cpp's pre-tokenizer name: ``--vocab-pre`` (checked), else the chktxt hash, else the
    tokenizer.json pipeline (with a note); one-line error when none fits."""
    if pre is not None and pre not in LLAMA_CPP_PRE_NAMES:
        raise GgufqError(f"--vocab-pre {pre!r}: llama.cpp knows no such pre-tokenizer (known: "
                         f"{', '.join(sorted(LLAMA_CPP_PRE_NAMES))})")
    notes = []
    if pre is None:
        h, pre = pre_tokenizer_name(tok)
        if pre is None:
            pre, why = pre_from_pipeline(tok_json)
            if pre is None:
                raise GgufqError(f"{path}: unknown BPE pre-tokenizer (chktxt hash {h}, {why}); llama.cpp does "
                                 "not know it -- pass --vocab-pre NAME (e.g. llama-bpe, qwen2, gpt-2) if you "
                                 "know which one it matches")
            notes.append(f"tokenizer: chktxt hash unknown to llama.cpp; pre-tokenizer {pre!r} chosen from "
                         f"tokenizer.json's {why} (override with --vocab-pre)")
    return pre, notes


def _tokens(tok, vocab: dict, added: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and types for ids 0..vocab_size-1, as llama.cpp's converter writes them (holes as
    UNUSED ``[PADi]``; added tokens pre-normalized, CONTROL or USER_DEFINED)."""
    by_id: dict[int, str] = {}
    for text, i in vocab.items():
        by_id.setdefault(i, text)
    for i, a in added.items():                                  # an added token's id shows its content
        by_id[i] = a.content
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        a = added.get(i)
        if a is None:
            types.append(gguf.TokenType.NORMAL)
        else:
            if not a.normalized:  # llama.cpp wants added tokens pre-normalized: encode + decode
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if a.special or looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")              # pre-normalize user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        tokens.append(text)
    return tokens, types
