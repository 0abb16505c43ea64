"""The one registry of ``--method``: name, encoder, what it needs, CLI help, old names.

``convert`` asks :func:`get` for a method; the CLI's choices and help, the tools and the tests
read :data:`METHODS`. A method's ``encoder`` is ``(qtype, rows, imatrix) -> uint8 blocks``
(module level, picklable); ``None`` is ggufq's k-quant path (:func:`ggufq.quant.encode`).
``importance``: the writer passes the model's data-free importance (:mod:`ggufq.importance`)
as the imatrix where none is given. ``moments``: the model calibrates itself through
llama.cpp (:mod:`ggufq.calib`) and matrices get a :class:`~ggufq.quant.gptq.Hessian`
(``--calib-tokens 0`` leaves the data-free importance).

Names say what runs; the session-1/2 names stay accepted as aliases (``hqq`` never ran the HQQ
solver on K-quants: it is the self-calibrated error-feedback method).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .. import GgufqError
from . import hqq


@dataclass(frozen=True)
class Method:
    name: str
    encoder: Optional[Callable]
    help: str
    importance: bool = False      # data-free importance as the weights (without --imatrix)
    moments: bool = False         # self-calibration through llama.cpp (error-feedback rounding)
    aliases: tuple[str, ...] = ()
    cli: bool = True              # offered by `ggufq convert --method` (False: studies, for tools/)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("kquant", None, "llama.cpp's own block search: the bytes of llama-quantize (fast, the default)."),
    Method("calibrated", hqq.encode_hqq,
           "the model writes 64x512 tokens of its own text through llama.cpp (llama-cpp-python, CPU or "
           "--gpu-layers); each matrix is rounded with error feedback against the moments of its inputs on that "
           "text, block scales from a refined k-quant search. No user data; same types, same size.",
           importance=True, moments=True, aliases=("hqq",)),
    Method("calibrated-max", hqq.encode_hqq_max,
           "as calibrated, block scales from the better of two starts (k-quant, HQQ) per block, and the "
           "Q4_K/Q5_K/Q6_K scales, mins and codes refit under the full moment as calibrated does at 2-3 bits; "
           "slower.",
           importance=True, moments=True, aliases=("hqq-max",)),
    Method("refine", hqq.encode_hqq_fast,
           "data-free: the k-quant blocks refined (codes, scales, mins) against importance derived from the "
           "weights alone; no calibration, a few times a k-quant pass.",
           importance=True, aliases=("hqq-fast",)),
    Method("hqq-plain", hqq.encode_hqq_plain,
           "the original HQQ proximal solver (calibration-free, unweighted), written into the same blocks."),
    Method("refine-kquant", hqq.encode_refined, "study: the k-quant bytes refined without importance.",
           cli=False),
    Method("hqq-scaled", hqq.encode_hqq_scaled, "study: HQQ with beta scaled to each group's error.", cli=False),
)}

_ALIASES = {a: m.name for m in METHODS.values() for a in m.aliases}


def get(name: str) -> Method:
    """The method called ``name`` (or by an old name); GgufqError when there is none."""
    m = METHODS.get(_ALIASES.get(name, name))
    if m is None:
        raise GgufqError(f"unknown --method {name!r}; choose one of {', '.join(cli_names())}")
    return m


def cli_names() -> list[str]:
    """What ``--method`` accepts: the offered methods, then their old names."""
    offered = [m for m in METHODS.values() if m.cli]
    return [m.name for m in offered] + [a for m in offered for a in m.aliases]


def cli_help() -> str:
    lines = [f"{m.name}{' (' + ', '.join(m.aliases) + ')' if m.aliases else ''}: {m.help}"
             for m in METHODS.values() if m.cli]
    return "How block scales and codes are chosen. " + " ".join(lines)
