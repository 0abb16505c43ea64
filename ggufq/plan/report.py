"""What ``ggufq plan`` prints: a table (one line per tensor, then totals) or a JSON document."""
from __future__ import annotations

from ..progress import fmt_bytes
from . import Plan


def human_bytes(n: float) -> str:
    return fmt_bytes(n, 2)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _bpw(nbytes: int, n: int) -> float:
    return nbytes * 8 / max(1, n)


def type_summary(plan: Plan) -> list[dict]:
    """Per type: tensors, elements, bytes, bits per weight; largest share first."""
    acc: dict[str, dict] = {}
    for e in plan.entries:
        a = acc.setdefault(e.qtype.name, {"type": e.qtype.name, "tensors": 0, "elements": 0, "bytes": 0})
        a["tensors"] += 1
        a["elements"] += e.n_elements
        a["bytes"] += e.nbytes
    for a in acc.values():
        a["bits_per_weight"] = round(_bpw(a["bytes"], a["elements"]), 4)
    return sorted(acc.values(), key=lambda a: -a["bytes"])


def format_table(plan: Plan) -> str:
    head = f"--type {plan.ftype}" + (f" --preset {plan.preset}" if plan.preset else "")
    rows = [(e.name, _shape(e.shape), e.qtype.name, human_bytes(e.nbytes), e.reason) for e in plan.entries]
    titles = ("tensor", "shape", "type", "size", "reason")
    w = [max([len(titles[i])] + [len(r[i]) for r in rows]) for i in range(4)]
    fmt = f"{{:<{w[0]}}}  {{:>{w[1]}}}  {{:<{w[2]}}}  {{:>{w[3]}}}  {{}}"
    out = [f"plan: {head}, general.file_type {plan.file_type.name} ({int(plan.file_type)})",
           fmt.format(*titles)]
    out += [fmt.format(*r) for r in rows]
    out.append("")
    out.append(f"total: {len(plan.entries)} tensors, {plan.n_elements:,} weights, "
               f"{human_bytes(plan.total_bytes)} ({plan.total_bytes:,} bytes), "
               f"{plan.bits_per_weight:.4f} bits per weight")
    for s in type_summary(plan):
        out.append(f"  {s['type']:<5} {s['tensors']:>5} tensors  {human_bytes(s['bytes']):>11}  "
                   f"{100 * s['bytes'] / max(1, plan.total_bytes):5.1f}% of bytes")
    exps = [e for e in plan.entries if "_exps." in e.name]
    if exps:   # mixture of experts: what the routed experts weigh against the always-active rest
        nb = sum(e.nbytes for e in exps)
        out.append(f"  routed experts: {len(exps)} tensors {human_bytes(nb)} ({100 * nb / max(1, plan.total_bytes):.1f}%"
                   f" of bytes); always active: {human_bytes(plan.total_bytes - nb)}")
    fb = [e for e in plan.entries if e.fallback]
    out.append(f"fallbacks taken: {len(fb)}" + (" (row length not a multiple of the block size)" if fb else ""))
    for w_ in plan.warnings:
        out.append(f"warning: {w_}")
    return "\n".join(out)


def to_json(plan: Plan) -> dict:
    """The plan as plain JSON types (``json.dumps`` ready)."""
    return {
        "ftype": plan.ftype,
        "preset": plan.preset,
        "file_type": int(plan.file_type),
        "file_type_name": plan.file_type.name,
        "tensors": [{"name": e.name, "shape": list(e.shape), "type": e.qtype.name, "bytes": e.nbytes,
                     "elements": e.n_elements, "reason": e.reason, "fallback": e.fallback}
                    for e in plan.entries],
        "totals": {
            "tensors": len(plan.entries),
            "elements": plan.n_elements,
            "bytes": plan.total_bytes,
            "bits_per_weight": round(plan.bits_per_weight, 4),
            "types": {s["type"]: s["tensors"] for s in type_summary(plan)},
            "fallbacks": plan.n_fallback,
        },
        "warnings": list(plan.warnings),
    }
