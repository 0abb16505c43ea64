"""Layer map: tensor name + shape -> ggml type, before any weight is read.

``make_plan(tensors, info, ftype, rules=None, preset=None)`` returns a
:class:`Plan` whose entries say, for every tensor, the type chosen and the rule
that chose it (what ``ggufq plan`` prints).

Precedence for a tensor llama-quantize would quantize:

1. the first matching rule of a user map (``rules``, see :mod:`.maps`),
2. the first matching rule of a built-in ``preset`` (e.g. ``attn8-mlp4``),
3. the ``--type`` mixture, exactly as llama-quantize picks it
   (``llama_tensor_get_type``; tables in :mod:`.rules`),

then llama.cpp's row-length fallback (Q4_K -> Q5_0, ...). The mixture of step 3
is computed for every tensor first, so a map never shifts llama.cpp's layer
counters (``use_more_bits``) for the tensors it leaves alone.

Tensors llama-quantize never quantizes (1-D, norms, MoE routers, ...) keep the
type convert_hf_to_gguf.py writes for them: F32 where it forces F32, else the
F16 intermediate (BF16 / F32 for --type BF16 / F32). That is what a
convert-to-F16-then-llama-quantize pipeline writes, tensor for tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container, Optional, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from .. import GgufqError
from . import rules as R
from .maps import PRESETS, MapRule, Preset, format_layers, layer_of, load_map, parse_map  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class TensorSpec:
    name: str                 # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]    # numpy order: (..., rows, n_per_row); last dim is the row length
    native: Optional[T] = None  # the block type the checkpoint already stores it in (MXFP4 experts)


@dataclass(frozen=True)
class ModelInfo:
    arch: str                 # GGUF arch name, e.g. "llama"
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    qtype: T
    reason: str
    fallback: bool = False    # the row length forced a type other than the one the rule chose

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // bs * ts


@dataclass
class Plan:
    ftype: str                       # the --type asked for, e.g. "Q4_K_M"
    file_type: LlamaFileType         # general.file_type
    entries: list[PlanEntry] = field(default_factory=list)
    preset: Optional[str] = None     # built-in preset applied over --type, e.g. "attn8-mlp4"
    warnings: list[str] = field(default_factory=list)   # e.g. map rules that matched nothing

    def __getitem__(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def n_elements(self) -> int:
        return sum(e.n_elements for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        """Bits over all tensors, norms included (how llama.cpp's quantize README counts)."""
        return self.total_bytes * 8 / max(1, self.n_elements)

    @property
    def n_fallback(self) -> int:
        return sum(e.fallback for e in self.entries)

    def check_encoders(self) -> None:
        """GgufqError unless ggufq.quant has an encoder for every planned type (call before writing)."""
        from .. import quant

        missing: dict[str, int] = {}
        for e in self.entries:
            if not quant.can_encode(e.qtype, e.shape[-1]):
                missing[e.qtype.name] = missing.get(e.qtype.name, 0) + 1
        if missing:
            have = ", ".join(t.name for t in sorted(quant.encoders(), key=int))
            need = ", ".join(f"{k} ({n} tensors)" for k, n in missing.items())
            raise GgufqError(f"--type {self.ftype} needs {need}, which this ggufq cannot encode yet (it has {have})")

    def needs_imatrix(self) -> list[PlanEntry]:
        """The tensors llama-quantize refuses to write without an importance matrix
        (``tensor_requires_imatrix``: IQ1/IQ2/IQ3_XXS types, Q2_K in a Q2_K_S file; never token_embd/output)."""
        need = R.NEEDS_IMATRIX + R.NEEDS_IMATRIX_IN.get(self.ftype, ())
        return [e for e in self.entries if e.qtype in need and e.name not in R.IMATRIX_EXEMPT]

    def check_imatrix(self, has_importance: bool, covered: Optional[Container[str]] = None) -> None:
        """GgufqError when the plan needs an importance matrix and none will be given, or when the
        given one (tensor names ``covered``) lacks a tensor that needs it (call before writing)."""
        need = self.needs_imatrix()
        if need and has_importance and covered is not None:
            lack = [e for e in need if e.name not in covered]
            if lack:
                raise GgufqError(f"the imatrix has no entry for {lack[0].name} ({len(lack)} tensors lack one), "
                                 f"which --type {self.ftype} quantizes as {lack[0].qtype.name}: wrong imatrix for this model?")
        if need and not has_importance:
            types = ", ".join(sorted({e.qtype.name for e in need}))
            raise GgufqError(f"--type {self.ftype} needs an importance matrix for {len(need)} tensors ({types}; "
                             f"e.g. {need[0].name}), as llama-quantize does: pass --imatrix FILE "
                             f"(from llama-imatrix), or let ggufq make one from the model's own text "
                             f"(needs llama-cpp-python: pip install 'ggufq[eval]'; and --calib-tokens > 0)")

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.qtype.name] = out.get(e.qtype.name, 0) + 1
        return out


# the --types convert_hf_to_gguf.py writes itself: a tensor the checkpoint stores quantized (MXFP4) is
# copied, not requantized (GptOssModel.repack_mxfp4)
CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")

# llama-quantize --type name -> (general.file_type, default matrix type), for the CLI and tools
FTYPES = R.FTYPES


def keeps_f32(spec: TensorSpec) -> Optional[str]:
    """Tensors llama.cpp's converter always writes as F32; returns the reason, or None."""
    if R.convert_keeps_f32(spec.name, spec.shape):
        return "1-D tensor kept F32" if len(spec.shape) <= 1 else "kept F32"
    return None


def _unquantized(spec: TensorSpec, why: str, default: T) -> PlanEntry:
    if default == T.F32 or R.convert_keeps_f32(spec.name, spec.shape):
        t = T.F32
    elif default == T.BF16:
        t = T.BF16
    else:
        t = T.F16          # the converter's F16 intermediate, which llama-quantize copies
    how = "" if t == T.F32 else " as converted"
    return PlanEntry(spec.name, spec.shape, t, f"{why}: not quantized, {t.name}{how}")


def _llama_types(tensors: Sequence[TensorSpec], info: ModelInfo, key: str, default: T,
                 allowed: list[bool], has_imatrix: bool) -> dict[int, tuple[T, str]]:
    """llama_tensor_get_type_impl for every quantizable tensor: index -> (type, reason), before fallback."""
    names = [s.name for s in tensors]
    tied = "output.weight" not in names
    cats = [R.category(n) for n in names]
    n_wv = sum(c in R.ATTN_V_LIKE for c in cats)
    n_gqa = info.n_head // info.n_head_kv if info.n_head_kv else 0
    is_70b = R.TYPE_70B.get(info.arch, lambda *a: False)(info.n_layer, info.n_head, info.n_head_kv, info.n_expert)
    counters = {"wv": 0, R.FFN_DOWN: 0, R.FFN_GATE: 0, R.FFN_UP: 0}

    # llama-quantize visits tensors sorted by layer number (none: -1), then by name
    def visit_key(i: int):
        layer = layer_of(names[i])
        return (-1 if layer is None else layer, names[i].encode())

    out: dict[int, tuple[T, str]] = {}
    for i in sorted(range(len(tensors)), key=visit_key):
        if not allowed[i]:
            continue
        spec, cat = tensors[i], cats[i]
        if cat == R.TOKEN_EMBD and tied:
            cat, tie_note = R.OUTPUT, "token_embd tied to output: "
        else:
            tie_note = ""
        i_layer = i_count = 0
        if cat in (R.FFN_DOWN, R.FFN_GATE, R.FFN_UP):
            i_layer = i_count = counters[cat]
            if max(1, info.n_expert) > 1:
                i_layer = layer_of(spec.name)
                if i_layer is None or not 0 <= i_layer < info.n_layer:
                    raise GgufqError(f"cannot tell the layer (0..{info.n_layer - 1}) of {spec.name}")
        c = R.Ctx(arch=info.arch, ftype=key, default=default, nx=spec.shape[-1], i_layer=i_layer, i_count=i_count,
                  n_layer=info.n_layer, i_wv=counters["wv"], n_wv=n_wv, n_gqa=n_gqa,
                  n_expert=info.n_expert, is_70b=is_70b, has_imatrix=has_imatrix,
                  n_mat=spec.shape[-3] if len(spec.shape) >= 3 else 1)
        qtype, why = default, f"default {default.name}"
        for rule in R.PRESET_RULES.get(cat, ()):
            if rule.applies(c):
                qtype, why = rule.then, tie_note + rule.why.format(**c._asdict(), bs=R.block_size(default))
                why += f" -> {qtype.name}"
                break
        for bump in R.BUMPS.get(cat, ()):
            if bump.when(c, qtype):
                qtype, why = bump.then, f"{why}; {bump.why} -> {bump.then.name}"
        if cat in R.ATTN_V_LIKE:
            counters["wv"] += 1
        elif cat in counters:
            counters[cat] += 1
        out[i] = (qtype, f"{key}: {why}")
    return out


def _resolve(ftype: Optional[str], preset: Optional[str]) -> tuple[str, Optional[Preset]]:
    p = None
    if preset is not None:
        p = PRESETS.get(preset.lower())
        if p is None:
            raise GgufqError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if ftype is None:
        if p is None:
            raise GgufqError("no --type given")
        ftype = p.base
    if ftype.lower() in PRESETS:           # --type attn8-mlp4 means --preset attn8-mlp4 on its base type
        if p is not None and p.name != ftype.lower():
            raise GgufqError(f"--type {ftype} is a preset and --preset {preset} is another; give one")
        p = PRESETS[ftype.lower()]
        ftype = p.base
    key = ftype.upper()
    if key not in R.FTYPES:
        raise GgufqError(f"unknown --type {ftype!r}; choose one of {', '.join(R.FTYPES)} "
                         f"(or a preset: {', '.join(PRESETS)})")
    return key, p


def make_plan(tensors: Sequence[TensorSpec], info: ModelInfo, ftype: Optional[str] = None,
              rules: Optional[Sequence[MapRule]] = None, preset: Optional[str] = None,
              has_imatrix: bool = False) -> Plan:
    """Plan every tensor.

    ``ftype``: a llama-quantize --type (``FTYPES``: Q4_K_M, Q8_0, F16, ...) or a preset name;
    ``preset``: a built-in map (``PRESETS``) applied over ``ftype`` (which then defaults to the
    preset's base, Q4_K_M for attn8-mlp4); ``rules``: a user map (:func:`load_map`), first match
    wins over preset and --type; ``has_imatrix``: as llama-quantize with --imatrix (changes
    Q4_0/Q5_0's and IQ4_*'s first ffn_down layers, IQ3_XXS's attn_v and ffn_down; whether a
    mixture *needs* one is :meth:`Plan.needs_imatrix`). general.file_type is the --type's.
    """
    key, p = _resolve(ftype, preset)
    file_type, default = R.FTYPES[key]
    plan = Plan(ftype=key, file_type=file_type, preset=p.name if p else None)
    user = list(rules or ())
    for r in user:
        if r.layers is not None and max(r.layers) >= info.n_layer:
            raise GgufqError(f"{r.source}: layers {format_layers(r.layers)} outside the model's 0-{info.n_layer - 1}")

    why_not = [R.unquantized_reason(s.name, s.shape) for s in tensors]
    allowed = [w is None for w in why_not]
    llama = _llama_types(tensors, info, key, default, allowed, has_imatrix) if default not in R.FLOAT_TYPES else {}
    used: set[int] = set()
    requant = 0
    for i, spec in enumerate(tensors):
        if not allowed[i]:
            plan.entries.append(_unquantized(spec, why_not[i], default))
            continue
        hit = next((r for r in user if r.matches(spec.name)), None) or \
            next((r for r in (p.rules if p else ()) if r.matches(spec.name)), None)
        if hit is not None:
            used.add(id(hit))
            qtype, why = hit.qtype, f"{hit.describe()} -> {hit.qtype.name}"
        elif spec.native is not None and key in CONVERTER_TYPES:
            qtype, why = spec.native, f"{spec.native.name} in the checkpoint: copied as convert_hf_to_gguf.py does"
        elif i in llama:
            qtype, why = llama[i]
        else:
            qtype, why = default, f"--type {key}"
        final, note = R.fallback(qtype, spec.shape[-1])
        if note:
            why = f"{why}; {note}"
        if spec.native is not None and final != spec.native:
            why = f"{why} (dequantized from {spec.native.name}, as llama-quantize --allow-requantize)"
            requant += 1
        plan.entries.append(PlanEntry(spec.name, spec.shape, final, why, fallback=note is not None))
    kept = sum(1 for e, s in zip(plan.entries, tensors) if s.native is not None and e.qtype == s.native)
    if kept and key in ("F32", "F16", "BF16"):
        # convert_hf_to_gguf.py's prepare_metadata: an MXFP4 checkpoint written as F32/F16/BF16 is MXFP4_MOE
        plan.file_type = LlamaFileType.MOSTLY_MXFP4_MOE
    if requant:
        plan.warnings.append(f"{requant} tensors stored as MXFP4 in the checkpoint are dequantized and "
                             f"quantized again as --type {key} chooses (--type MXFP4_MOE or F16/BF16/Q8_0 "
                             "keep them byte for byte)")
    for r in user:
        if id(r) not in used:
            plan.warnings.append(f"{r.describe()} matched no quantizable tensor")
    return plan



def specs_from_gguf(path) -> tuple[list[TensorSpec], ModelInfo]:
    """Tensor names and shapes (numpy order, file order) of a GGUF file and the hyperparameters
    the plan needs: what llama-quantize would see reading it."""
    from .gguf_header import read_header

    try:
        kv, tensors = read_header(path)
    except (ValueError, OSError) as e:
        raise GgufqError(f"cannot read GGUF {path}: {e}") from None
    arch = kv.get("general.architecture")
    if arch is None:
        raise GgufqError(f"{path}: no general.architecture")
    n_head = int(kv.get(f"{arch}.attention.head_count", 0))
    specs = [TensorSpec(name, shape) for name, shape, _ in tensors]
    info = ModelInfo(arch=arch, n_layer=int(kv.get(f"{arch}.block_count", 0)),
                     n_embd=int(kv.get(f"{arch}.embedding_length", 0)), n_head=n_head,
                     n_head_kv=int(kv.get(f"{arch}.attention.head_count_kv", n_head)),
                     n_expert=int(kv.get(f"{arch}.expert_count", 0)))
    return specs, info
