"""SentencePiece ``tokenizer.model`` -> ``tokenizer.ggml.model = llama``.

Same tokens, scores and types as llama.cpp's converter
(``_create_vocab_sentencepiece``): pieces in id order, byte/control/unknown/unused
types from the model, ``added_tokens.json`` and ``tokenizer_config.json``'s
``added_tokens_decoder`` applied on top, padded with ``[PADn]`` to the config's
vocab size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import gguf

from .. import GgufqError
from . import Vocab, looks_special, read_json

T = gguf.TokenType


def load(model_dir: Path, vocab_size: Optional[int]) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise GgufqError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0] if str(e) else 'unreadable'})") from None

    n = int(vocab_size or sp.vocab_size())
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(T.UNUSED)] * n
    for i in range(min(n, sp.vocab_size())):
        t = T.NORMAL
        if sp.IsUnknown(i):
            t = T.UNKNOWN
        elif sp.IsControl(i):
            t = T.CONTROL
        elif sp.IsUnused(i):
            t = T.UNUSED
        elif sp.IsByte(i):
            t = T.BYTE
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = float(sp.GetScore(i))
        types[i] = int(t)

    added = read_json(model_dir / "added_tokens.json") or {}
    for text, i in added.items():
        if 0 <= int(i) < n:
            tokens[int(i)] = text.encode("utf-8")
            scores[int(i)] = -1000.0
            types[int(i)] = int(T.USER_DEFINED)

    tcfg = read_json(model_dir / "tokenizer_config.json") or {}
    for sid, data in (tcfg.get("added_tokens_decoder") or {}).items():
        i = int(sid)
        if not 0 <= i < n:
            continue
        text = data["content"]
        if data.get("special") or looks_special(text):
            types[i] = int(T.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[i] = int(T.USER_DEFINED)
        scores[i] = -1000.0
        tokens[i] = text.encode("utf-8")

    special = gguf.SpecialVocab(model_dir, n_vocab=len(tokens))
    return Vocab(model="llama", pre="default", tokens=tokens, scores=scores, token_types=types,
                 special=special)
