"""``--target-size`` / ``--bpw``: every quantizable tensor's type chosen for a file-size budget.

:func:`allocate` (called by :func:`ggufq.convert.convert` after self-calibration, and by
``ggufq plan --target-size``):

1. the budget (:mod:`.size`) is checked against the feasible range: the GGUF header (metadata,
   vocabulary, tensor infos, measured by writing it) plus the fixed tensors (not quantizable, or
   fixed by a ``--map``/``--preset`` rule) plus each free tensor at its cheapest candidate, up to
   the F32 file;
2. every free tensor gets a predicted loss per candidate type (:mod:`.loss`): ``tr(E H E^T)``
   from encoding a row sample with the file's encoder, times a measured KLD scale (:mod:`.probe`):
   the KLD of the tensor alone at the probe type over its output error there;
3. :func:`.solve.solve` picks one type per tensor: least predicted KLD within the budget.

The resulting plan has one entry per tensor with the reason ``target-size``; the recipe goes into
the file as ``quantize.ggufq.*`` keys (llama-quantize's own provenance keys are ``quantize.imatrix.*``;
llama.cpp ignores keys it does not know).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from .. import GgufqError
from ..plan import PRESETS, Plan, make_plan, rules as R
from . import loss as L, size as S
from . import probe as P
from . import solve as SV

RECIPE_RESERVE = 2048          # header bytes kept for the quantize.ggufq.* keys
# llama-quantize mixtures the plan compares against (the nearest in size)
PRESET_NAMES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                "Q6_K", "Q8_0")
KEY_RECIPE = "quantize.ggufq.recipe"
KEY_TARGET = "quantize.ggufq.target_size"


@dataclass
class Row:
    name: str
    group: str
    types: list               # candidate types
    costs: np.ndarray         # padded bytes per candidate
    error: np.ndarray         # tr(E H E^T) per candidate (row sample, scaled to all rows)
    sample: Optional[L.Sample] = None    # the sampled rows at the probe type (layer tensors; dropped after the probe)


@dataclass
class Allocation:
    plan: Plan
    target: int               # file bytes asked for
    header: int               # header bytes (incl. RECIPE_RESERVE)
    fixed: int                # bytes of the tensors the allocator does not choose
    rows: list                # list[Row], the free tensors
    scales: dict              # tensor -> KLD per unit of error (layer group's scale x role's weight)
    solution: SV.Solution
    method: str
    probe: Optional[P.ProbeResult] = None
    lo: int = 0
    hi: int = 0
    seconds: dict = field(default_factory=dict)
    presets: dict = field(default_factory=dict)     # llama-quantize mixture name -> Plan
    encoder_errors: bool = False                     # E from the method's encoder (calibrated), not the k-quant search

    @property
    def file_bytes(self) -> int:
        """Upper bound of the file size (the recipe keys take less than their reserve)."""
        return self.header + self.fixed + self.solution.cost

    @property
    def predicted_kld(self) -> float:
        return self.solution.loss

    def predict(self, types: dict) -> Optional[float]:
        """Predicted KLD of another assignment (name -> type) of the free tensors; None when it
        uses a type outside a tensor's candidates."""
        tot = 0.0
        for r in self.rows:
            t = types.get(r.name)
            if t not in r.types:
                return None
            tot += self.scales.get(r.name, 1.0) * float(r.error[r.types.index(t)])
        return tot

    def sample_check(self) -> list[tuple[str, float]]:
        """For tensors whose estimate came from a row sample: sampled estimate / whole-tensor error at
        the probe's type (the probe encodes whole tensors); empty without a probe."""
        if self.probe is None:
            return []
        full = dict(self.probe.rows)
        shapes = {e.name: e.shape for e in self.plan.entries}
        out = []
        for r in self.rows:
            t = R.fallback(self.probe.probe_type, shapes[r.name][-1])[0]
            n_rows = int(np.prod(shapes[r.name][:-1]))
            if n_rows > L.SAMPLE_ROWS and t in r.types and full.get(r.name) and r.name in self.probe.whole:
                out.append((r.name, float(r.error[r.types.index(t)]) / full[r.name]))
        return out

    def recipe(self) -> dict:
        return {"tool": "ggufq", "target_bytes": self.target, "method": self.method,
                "candidates": [t.name for t in L.CANDIDATES],
                "loss": "sum over tensors of scale[tensor] * tr(E H E^T) (self-calibration moments; E from "
                        + ("the method's encoder" if self.encoder_errors else "the k-quant search") + ")",
                "probe": None if self.probe is None else
                f"{self.probe.probe_type.name}, {len(self.probe.kld)} sets ({self.probe.sets}), "
                f"{self.probe.n_tokens} self-generated tokens each",
                "predicted_kld": round(self.predicted_kld, 6), "dual_gap": round(self.solution.gap, 6),
                "types": self.plan.type_counts()}

    def metadata(self) -> dict:
        s = json.dumps(self.recipe(), separators=(",", ":"))
        if len(s) > RECIPE_RESERVE - 200:
            s = s[:RECIPE_RESERVE - 200]
        return {KEY_RECIPE: s, KEY_TARGET: int(self.target)}

    def notes(self) -> list[str]:
        tc = ", ".join(f"{k} x{v}" for k, v in sorted(self.plan.type_counts().items()))
        return [f"--target-size {self.target} bytes: {tc}; predicted KLD {self.predicted_kld:.5f} "
                f"(Lagrangian bound gap {self.solution.gap:.2%}); allocation {sum(self.seconds.values()):.1f} s "
                f"({', '.join(f'{k} {v:.1f} s' for k, v in self.seconds.items())})"]


# ---- the pieces --------------------------------------------------------------------------
def header_bytes(p, plan: Plan, add_header: Callable) -> int:
    """Bytes before the first tensor's data: metadata, vocabulary and tensor infos, as written."""
    import gguf
    with tempfile.TemporaryDirectory(prefix="ggufq-header-") as d:
        path = Path(d) / "h.gguf"
        w = gguf.GGUFWriter(path, p.arch.name)
        add_header(plan, w)
        for t in p.tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float16), 2 * int(np.prod(t.shape)), raw_dtype=T.F16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return path.stat().st_size + RECIPE_RESERVE


def fixed_names(plan: Plan, plan_kw: Optional[dict]) -> set:
    """Tensors the allocator leaves as planned: never quantized, or chosen by a map/preset rule."""
    kw = plan_kw or {}
    rules = list(kw.get("rules") or ())
    if kw.get("preset"):
        rules += list(PRESETS[kw["preset"].lower()].rules)
    return {e.name for e in plan.entries
            if R.unquantized_reason(e.name, e.shape) is not None or any(r.matches(e.name) for r in rules)}


def feasible_range(p, plan: Plan, fixed: set, header: int) -> tuple[int, int, int]:
    """(smallest file, F32 file, fixed bytes)."""
    fixed_b = sum(L.padded_bytes(e.qtype, e.n_elements) for e in plan.entries if e.name in fixed)
    lo = header + fixed_b + sum(
        min(L.padded_bytes(t, e.n_elements) for t in L.candidates(e.shape)) for e in plan.entries if e.name not in fixed)
    hi = header - RECIPE_RESERVE + sum(L.padded_bytes(T.F32, e.n_elements) for e in plan.entries)
    return lo, hi, fixed_b


def target_plan(plan: Plan, types: dict, presets: dict) -> Plan:
    """``plan`` with the allocator's types; general.file_type says the nearest llama-quantize mixture."""
    from ..convert import with_types
    new = with_types(plan, types, why="target-size")
    ft = nearest_preset(presets, new.total_bytes) if presets else "F16"
    return dataclasses.replace(new, ftype=f"{new.bits_per_weight:.2f}BPW", file_type=R.FTYPES[ft][0], preset=None)


def preset_plans(specs, info) -> dict[str, Plan]:
    """The llama-quantize mixtures of :data:`PRESET_NAMES` this ggufq writes without an imatrix."""
    out = {}
    for name in PRESET_NAMES:
        try:
            pl = make_plan(specs, info, name)
            pl.check_encoders()
        except GgufqError:
            continue
        if not pl.needs_imatrix():
            out[name] = pl
    return out


def nearest_preset(presets: dict, nbytes: int) -> str:
    return min(presets, key=lambda k: abs(presets[k].total_bytes - nbytes))


def build_table(p, free: list, weights_of: Callable, moment_of: Callable, log=None,
                probe_type: Optional[T] = None, encoder: Optional[Callable] = None) -> list[Row]:
    """One :class:`Row` per free tensor; with ``probe_type``, layer tensors keep their sampled rows at
    that type (the probe perturbs those rows: no second encoding). ``encoder``/``weights_of``: what
    the file's writer encodes each tensor with (None: the k-quant search; a calibrated method's
    encoder with a Hessian: the error-feedback rounding's own error on the sampled rows)."""
    from .. import blas
    rows = []
    # small products: one BLAS thread is faster than waiting for a second (set once: each change reads /proc)
    with p.model, blas.threads(1):
        for t in p.tensors:
            if t.name not in free:
                continue
            types = L.candidates(t.shape)
            costs = np.array([L.padded_bytes(q, int(np.prod(t.shape))) for q in types], np.int64)
            keep = R.fallback(probe_type, t.row_len)[0] if probe_type is not None and P.role_of(t.name) else None
            keep = keep if keep in types else None
            err = L.tensor_losses(t, types, weights_of(t.name), moment_of(t.name), keep=keep, encoder=encoder)
            err, sample = err if keep is not None else (err, None)
            rows.append(Row(t.name, L.group_of(t.name), types, costs, err, sample))
    return rows


@dataclass
class Budget:
    target: int
    header: int
    fixed: set
    fixed_bytes: int
    lo: int
    hi: int


def check_budget(p, opts, plan: Plan, md, vocab, im=None) -> Budget:
    """The budget of ``opts`` within the model's feasible range (GgufqError naming it); reads no weight."""
    import functools

    from ..convert import write_header
    add_header = functools.partial(write_header, p, md, vocab)
    header = header_bytes(p, plan, lambda pl, w: add_header(pl, w, im))
    fixed = fixed_names(plan, opts.plan_kw)
    lo, hi, fixed_b = feasible_range(p, plan, fixed, header)
    target = S.budget(opts.target_size, opts.target_bpw, lo, hi, plan.n_elements, header)
    return Budget(target, header, fixed, fixed_b, lo, hi)


# ---- the allocation ------------------------------------------------------------------------
def allocate(p, opts, meth, plan: Plan, *, im=None, hessians=None, free=None, vocab=None, md=None,
             workdir: Optional[Path] = None, log: Optional[Callable] = None, probe_groups: bool = True,
             budget: Optional["Budget"] = None) -> Allocation:
    """Types for ``opts.target_size`` or ``opts.target_bpw``; ``alloc_kw={"probe": False}`` skips the
    sensitivity probe (every group's scale 1: the bare output error).

    Long because the error table, the probe and the solver share the stages' state (calibration, plan, budget) and one cleanup."""
    import functools

    from ..convert import write_header
    kw = dict(opts.alloc_kw or {})
    probe_groups = kw.get("probe", probe_groups)
    times = {}
    t0 = time.monotonic()
    add_header = functools.partial(write_header, p, md, vocab)
    b = budget or check_budget(p, opts, plan, md, vocab, im)
    target, header, fixed, lo, hi, fixed_b = b.target, b.header, b.fixed, b.lo, b.hi, b.fixed_bytes

    def moment_of(name):
        if hessians is not None:
            m = hessians.moment(name)
            if m is not None:
                return np.asarray(m, np.float64)
        if im is not None:
            t = next(t for t in p.tensors if t.name == name)
            v = im.for_tensor(name, t.row_len, 1)
            if v is not None and np.ndim(v) == 1:
                return np.asarray(v, np.float64)
        return None

    def weights_of(name):
        """The importance the file's encoder gets for its block search (as convert's jobs)."""
        t = next(t for t in p.tensors if t.name == name)
        real = im.for_tensor(name, t.row_len, t.shape[0] if len(t.shape) == 3 else 1) if im is not None else None
        if real is not None:
            return real
        if meth.moments and hessians is not None and hessians.covers(name):
            return hessians.importance(name)
        return (free or {}).get(name)

    # the table's encoder is the file's: a calibrated method's error-feedback rounding leaves a different
    # error per type than the k-quant search (alloc_kw {"table": "kquant"}: the search's error instead)
    encoder = meth.encoder if meth.moments and hessians is not None and kw.get("table") != "kquant" else None

    def enc_weights(name):
        """What the writer's jobs give the method's encoder (convert.make_jobs): a Hessian where the
        self-calibration has the tensor's full input moment."""
        if encoder is None or not hessians.covers(name):
            return weights_of(name)
        t = next(t for t in p.tensors if t.name == name)
        real = im.for_tensor(name, t.row_len, t.shape[0] if len(t.shape) == 3 else 1) if im is not None else None
        return hessians.weights(name, real, opts.damp)

    free_names = {e.name for e in plan.entries if e.name not in fixed}
    probe_type = T[kw.get("probe_type", P.PROBE_TYPE.name)]
    probing = probe_groups and hessians is not None
    rows = build_table(p, free_names, enc_weights, moment_of, log,
                       probe_type if probing and kw.get("reuse", True) else None, encoder)
    times["table"] = time.monotonic() - t0
    pr = None
    scales = {r.name: 1.0 for r in rows}
    if probing:
        t1 = time.monotonic()
        # the sets: every free tensor alone, or every layer and every role in all layers at once, fitted as
        # s[layer] x c[role]; by default (alloc_kw {"sets": "auto"}) per tensor while that decodes no more
        # tokens than the self-calibration did
        seqs = kw.get("seqs", P.PROBE_SEQS)
        tok = hessians.tokens
        per_set = seqs * (min(kw["ctx"], tok.shape[1]) if kw.get("ctx") else tok.shape[1])
        per_tensor = P.choose_sets(kw.get("sets", P.PROBE_SETS), len(free_names), per_set, tok.size) == "tensor"
        groups: dict = {}
        roles: dict = {}
        for t in p.tensors:
            if t.name in free_names:
                g = t.name if per_tensor else P.probe_group(t.name, kw.get("by_layer", True))
                groups.setdefault(g, []).append(t)
                if P.role_of(t.name) is not None and not per_tensor and kw.get("roles", True):
                    roles.setdefault(P.role_of(t.name), []).append(t)
        pr = P.probe(p, groups, enc_weights, moment_of, hessians.tokens, add_header, Path(workdir or tempfile.gettempdir()),
                     jobs=opts.jobs, log=None, roles=roles or None,
                     probe_type=probe_type, samples={r.name: r.sample for r in rows if r.sample is not None},
                     seqs=seqs, encoder=encoder, ctx=kw.get("ctx"))
        scales.update(pr.scales)
        times["probe"] = time.monotonic() - t1
    for r in rows:
        r.sample = None
    t2 = time.monotonic()
    budget_data = target - header - fixed_b
    costs = [r.costs for r in rows]
    losses = [scales[r.name] * r.error for r in rows]
    try:
        sol = SV.solve(costs, losses, budget_data)
    except ValueError:      # cannot happen after S.budget's range check
        raise GgufqError(f"--target-size {target} bytes: below the smallest file ({lo} bytes)") from None
    types = {r.name: r.types[j] for r, j in zip(rows, sol.choice)}
    times["solve"] = time.monotonic() - t2
    presets = preset_plans(p.specs, p.info)
    new = target_plan(plan, types, presets)
    return Allocation(new, target, header, fixed_b, rows, scales, sol, meth.name, pr, lo, hi, times, presets,
                      encoder is not None)


def resolve(a: Allocation, target: int) -> Allocation:
    """The same measured table and scales solved for another file-size ``target`` (tools: one
    calibration and probe, several sizes)."""
    if not a.lo <= target <= a.hi:
        raise GgufqError(f"target {target} bytes outside the feasible {a.lo} .. {a.hi}")
    sol = SV.solve([r.costs for r in a.rows], [a.scales[r.name] * r.error for r in a.rows], target - a.header - a.fixed)
    types = {r.name: r.types[j] for r, j in zip(a.rows, sol.choice)}
    base = dataclasses.replace(a.plan, entries=[e for e in a.plan.entries])
    return dataclasses.replace(a, plan=target_plan(base, types, a.presets), target=target, solution=sol)
