"""Tokenizer files -> ``tokenizer.ggml.*`` metadata.

``load(model_dir, config)`` picks the tokenizer kind present in the folder and
returns a :class:`Vocab`; ``Vocab.write(writer)`` adds its keys to a
``gguf.GGUFWriter``. One module per tokenizer kind:

* ``spm``  -- SentencePiece ``tokenizer.model`` (``tokenizer.ggml.model = llama``)
* ``bpe``  -- byte-level BPE ``tokenizer.json`` (``tokenizer.ggml.model = gpt2``)

Special token ids, add_bos/add_eos and the chat template come from
``tokenizer_config.json`` / ``tokenizer.json`` / ``config.json`` through
``gguf.SpecialVocab``, as llama.cpp's converter does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gguf

from .. import GgufqError


@dataclass
class Vocab:
    model: str                                  # tokenizer.ggml.model: "llama" | "gpt2"
    tokens: list[bytes]                         # tokenizer.ggml.tokens, id order
    token_types: list[int]                      # tokenizer.ggml.token_type (gguf.TokenType)
    scores: Optional[list[float]] = None        # tokenizer.ggml.scores
    pre: Optional[str] = None                   # tokenizer.ggml.pre
    add_space_prefix: Optional[bool] = None     # tokenizer.ggml.add_space_prefix
    special: Optional[gguf.SpecialVocab] = None  # special ids, add_bos/eos, merges, chat template
    extra: dict = field(default_factory=dict)   # any other tokenizer.ggml.* key -> value
    notes: list = field(default_factory=list)   # what was decided on the user's behalf (printed by convert)

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.token_types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        for k, v in self.extra.items():
            w.add_key_value(k, v[0], v[1])
        if self.special is not None:
            self.special.add_to_gguf(w, quiet=True)


def load(model_dir: Path, config: dict, pre: Optional[str] = None) -> Vocab:
    """The folder's tokenizer as GGUF metadata; tokenizer.json (BPE) or tokenizer.model (SentencePiece)."""
    model_dir = Path(model_dir)
    arch = _arch(config)
    cfg = arch.cfg if arch is not None else None
    vocab_size = cfg.get("vocab_size") if cfg is not None else config.get("vocab_size")
    kind = arch.record.tokenizer if arch is not None else None
    if kind is None:
        kind = "spm" if (model_dir / "tokenizer.model").is_file() else \
            "bpe" if (model_dir / "tokenizer.json").is_file() else None
    if kind == "spm":
        from . import spm
        vocab = spm.load(model_dir, vocab_size)
    elif kind == "bpe":
        from . import bpe
        vocab = bpe.load(model_dir, vocab_size, pre=pre)
    elif kind is None:
        raise GgufqError(f"{model_dir}: no tokenizer.model or tokenizer.json")
    else:
        import importlib
        vocab = importlib.import_module(f"{__name__}.{kind}").load(model_dir, vocab_size)
    if arch is not None and arch.record.vocab is not None:
        vocab = arch.record.vocab(vocab, model_dir, arch)
    return vocab


def _arch(config: dict):
    """The arch object of a config, or None (a vocabulary can be read without a known arch)."""
    from .. import arch
    try:
        return arch.for_config(config)
    except GgufqError:
        return None


def looks_special(text: str) -> bool:
    """Added tokens that llama.cpp's converter marks CONTROL even when not flagged special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def read_json(path: Path) -> Optional[dict]:
    """An optional JSON file of the folder (None when absent), read as :func:`ggufq.source.read_json` reads."""
    from ..source import read_json as _read
    return _read(path, required=False)
