"""Layer maps: ordered ``name glob [+ layers] -> type`` rules, from TOML files or built in.

A map file (read with the standard library's ``tomllib``)::

    # first rule that matches a tensor wins; unmatched tensors follow --type
    [[rule]]
    pattern = "blk.*.ffn_down.weight"   # fnmatch glob on the GGUF tensor name
    layers  = "0-3"                     # optional: "0-3", "0-3,8,10-12", 5, or a list [0, 3] (layers 0 and 3)
    type    = "Q6_K"                    # F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K..Q6_K IQ4_NL IQ4_XS TQ1_0 TQ2_0 MXFP4 IQ1_S..IQ3_S

    [[rule]]
    pattern = "output.weight"
    type    = "Q8_0"

Rules touch only tensors llama-quantize would quantize (never norms, 1-D
tensors, routers); a type whose block does not divide the row length falls
back as llama.cpp does (Q4_K -> Q5_0, ...), and the plan's reason says so.

Built-in presets are maps too (:data:`PRESETS`), layered under a user map and
over the --type mixture.
"""
from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gguf import GGMLQuantizationType as T

from .. import GgufqError
from .rules import MAP_TYPES

_LAYER_RE = re.compile(r"blk\.(\d+)\.")
_RULE_KEYS = {"pattern", "layers", "type"}
MAX_LAYER = 1 << 16          # far above any model's layer count; layer sets are built from ranges


def layer_of(name: str) -> Optional[int]:
    """The N of a ``blk.N.`` name (llama.cpp's ``sscanf(name, "blk.%d.")``), else None."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class MapRule:
    pattern: str
    qtype: T
    layers: Optional[frozenset[int]] = None
    source: str = "map"              # where the rule comes from, for reasons: "map.toml rule 2"

    def matches(self, name: str) -> bool:
        if not fnmatch.fnmatchcase(name, self.pattern):
            return False
        if self.layers is None:
            return True
        layer = layer_of(name)
        return layer is not None and layer in self.layers

    def describe(self) -> str:
        where = f" layers {format_layers(self.layers)}" if self.layers is not None else ""
        return f"{self.source} ({self.pattern}{where})"


def format_layers(layers: frozenset[int]) -> str:
    out, run = [], []
    for i in sorted(layers):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _parse_layers(value, where: str) -> frozenset[int]:
    bad = GgufqError(f"{where}: bad layers {value!r}; write \"0-3\", \"0-3,8\", 5 or a list like [0, 3]")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise bad
    layers: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise bad
        if isinstance(item, int):
            if item < 0 or item >= MAX_LAYER:
                raise bad
            layers.add(item)
            continue
        if not isinstance(item, str) or not item.strip():
            raise bad
        for part in item.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise bad
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise bad
            if hi >= MAX_LAYER:
                raise GgufqError(f"{where}: layer {hi} in {value!r} is beyond any model (layers are below {MAX_LAYER})")
            layers.update(range(lo, hi + 1))
    return frozenset(layers)


def _check_glob(pattern, where: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise GgufqError(f"{where}: 'pattern' must be a non-empty glob string like \"blk.*.ffn_down.weight\"")
    if any(ch.isspace() for ch in pattern):
        raise GgufqError(f"{where}: bad glob {pattern!r}: GGUF tensor names have no spaces")
    # fnmatch treats an unclosed '[' as a literal; in a tensor name that is always a typo
    depth_open = None
    for i, ch in enumerate(pattern):
        if ch == "[" and depth_open is None:
            depth_open = i
        elif ch == "]" and depth_open is not None and i > depth_open + 1:
            depth_open = None
    if depth_open is not None:
        raise GgufqError(f"{where}: bad glob {pattern!r}: '[' at {depth_open} is never closed")
    return pattern


def parse_type(value, where: str) -> T:
    if not isinstance(value, str) or value.upper() not in MAP_TYPES:
        raise GgufqError(f"{where}: unknown type {value!r}; choose one of {', '.join(MAP_TYPES)}")
    return MAP_TYPES[value.upper()]


def parse_map(text: str, name: str = "map") -> list[MapRule]:
    """Rules from the text of a TOML map file; ``name`` names the file in messages and reasons."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GgufqError(f"{name}: TOML syntax error: {e}") from None
    except RecursionError:
        raise GgufqError(f"{name}: TOML nested too deeply") from None
    extra = set(doc) - {"rule"}
    if extra:
        raise GgufqError(f"{name}: unknown key {sorted(extra)[0]!r}; a map holds [[rule]] tables only")
    raw = doc.get("rule", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise GgufqError(f"{name}: 'rule' must be an array of tables, written [[rule]]")
    if not raw:
        raise GgufqError(f"{name}: no [[rule]] tables")
    rules = []
    for i, r in enumerate(raw, 1):
        where = f"{name}: rule {i}"
        unknown = set(r) - _RULE_KEYS
        if unknown:
            raise GgufqError(f"{where}: unknown key {sorted(unknown)[0]!r}; a rule has pattern, layers, type")
        for key in ("pattern", "type"):
            if key not in r:
                raise GgufqError(f"{where}: missing {key!r}")
        rules.append(MapRule(
            pattern=_check_glob(r["pattern"], where),
            qtype=parse_type(r["type"], where),
            layers=_parse_layers(r["layers"], where) if "layers" in r else None,
            source=f"{name} rule {i}",
        ))
    return rules


def load_map(path) -> list[MapRule]:
    """Rules of the TOML map file at ``path`` (GgufqError, one line, when it is unreadable or wrong)."""
    p = Path(path)
    try:
        from ..source import open_regular
        with open(open_regular(p, f"map file {p}"), "rb") as f:
            data = f.read(1 << 24)
    except OSError as e:
        raise GgufqError(f"cannot read map file {p}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise GgufqError(f"{p.name}: not UTF-8 text") from None
    return parse_map(text, p.name)


# ---------------------------------------------------------------------------
# built-in presets: name -> (the --type they complete, their rules)
@dataclass(frozen=True)
class Preset:
    name: str
    base: str                # --type used when none is given; tensors no rule names follow it
    rules: tuple[MapRule, ...]
    doc: str


def _preset(name: str, base: str, doc: str, *rows: tuple[str, T]) -> Preset:
    return Preset(name, base, tuple(MapRule(p, t, source=name) for p, t in rows), doc)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _preset("attn8-mlp4", "Q4_K_M",
            "attention Q8_0, MLP Q4_K; token_embd/output and the rest as --type (default Q4_K_M)",
            ("blk.*.attn_q.weight",      T.Q8_0),
            ("blk.*.attn_k.weight",      T.Q8_0),
            ("blk.*.attn_v.weight",      T.Q8_0),
            ("blk.*.attn_qkv.weight",    T.Q8_0),
            ("blk.*.attn_output.weight", T.Q8_0),
            ("blk.*.ffn_gate*.weight",   T.Q4_K),
            ("blk.*.ffn_up*.weight",     T.Q4_K),
            ("blk.*.ffn_down*.weight",   T.Q4_K),
            ),
    # mixture of experts: every token runs attention, the shared expert and output, but only k of the
    # routed experts, which hold most of the bytes: 8 bits where it is always paid for
    _preset("moe-keep-active", "Q4_K_M",
            "MoE: always-active tensors (attention, shared expert, dense FFNs, output) Q8_0; routed experts "
            "(ffn_*_exps), token_embd and the rest as --type (default Q4_K_M); the router stays F32",
            ("blk.*.attn_q.weight",      T.Q8_0),
            ("blk.*.attn_k.weight",      T.Q8_0),
            ("blk.*.attn_v.weight",      T.Q8_0),
            ("blk.*.attn_qkv.weight",    T.Q8_0),
            ("blk.*.attn_output.weight", T.Q8_0),
            ("blk.*.ffn_*_shexp.weight", T.Q8_0),
            ("blk.*.ffn_gate.weight",    T.Q8_0),
            ("blk.*.ffn_up.weight",      T.Q8_0),
            ("blk.*.ffn_down.weight",    T.Q8_0),
            ("output.weight",            T.Q8_0),
            ),
)}
