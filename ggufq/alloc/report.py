"""What ``ggufq plan --target-size`` prints after the per-tensor table: the allocation's totals,
its predicted KLD, and how it differs from the nearest llama-quantize mixture."""
from __future__ import annotations

from ..plan import rules as R
from . import probe as P
from ..progress import fmt_bytes


def _role(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def _by_role(entries) -> dict[str, dict[str, int]]:
    out: dict = {}
    for e in entries:
        if R.unquantized_reason(e.name, e.shape) is not None:
            continue
        d = out.setdefault(_role(e.name), {})
        d[e.qtype.name] = d.get(e.qtype.name, 0) + 1
    return out


def _counts(d: dict) -> str:
    return " ".join(f"{k}x{v}" for k, v in sorted(d.items()))


def format_allocation(a) -> str:
    from . import nearest_preset
    lines = [f"target {fmt_bytes(a.target)} ({a.target} bytes; feasible {a.lo} .. {a.hi}): "
             f"file {a.file_bytes} bytes at most ({a.file_bytes / a.target:.2%} of the target), "
             f"{a.plan.bits_per_weight:.4f} bits/weight",
             f"predicted KLD {a.predicted_kld:.5f} (sum of scale[tensor] x tr(E H E^T); Lagrangian lower bound "
             f"{a.solution.bound:.5f}, gap {a.solution.gap:.2%})",
             "types: " + ", ".join(f"{k} x{v}" for k, v in sorted(a.plan.type_counts().items())),
             "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in a.seconds.items())]
    if a.probe is not None:
        pt = a.probe.probe_type.name
        layers = sorted(((g, k) for g, k in a.probe.kld.items() if not g.startswith("role:")), key=lambda kv: -kv[1])
        roles = sorted(((g[5:], k) for g, k in a.probe.kld.items() if g.startswith("role:")), key=lambda kv: -kv[1])
        what = "tensors alone" if a.probe.sets == "tensor" else "layer sets"
        lines.append(f"probe ({len(a.probe.kld)} sets, {a.probe.n_tokens} self-generated tokens each, "
                     f"{a.probe.seconds:.1f} s), most sensitive {what} at {pt}: "
                     + ", ".join(f"{g} {k:.4f}" for g, k in layers[:5]))
        if roles:
            lines.append(f"  roles at {pt} (all layers at once): " + ", ".join(f"{g} {k:.4f}" for g, k in roles))
        elif a.probe.sets == "tensor":      # each role's tensors' KLDs summed over the layers
            by: dict = {}
            for g, k in layers:
                if P.role_of(g) is not None:
                    by[P.role_of(g)] = by.get(P.role_of(g), 0.0) + k
            lines.append(f"  roles at {pt} (sum over layers of one tensor at a time): "
                         + ", ".join(f"{r} {k:.4f}" for r, k in sorted(by.items(), key=lambda kv: -kv[1])))
    chk = a.sample_check()
    if chk:
        q = sorted(v for _, v in chk)
        lines.append(f"row-sample estimate / whole tensor at {a.probe.probe_type.name} ({len(q)} sampled tensors): median "
                     f"{q[len(q) // 2]:.3f}, range {q[0]:.3f} .. {q[-1]:.3f}")
    if a.presets:
        name = nearest_preset(a.presets, a.plan.total_bytes)
        pp = a.presets[name]
        pred = a.predict({e.name: e.qtype for e in pp.entries})
        lines.append(f"nearest llama-quantize mixture: {name}, {pp.total_bytes + a.header} bytes "
                     f"({pp.bits_per_weight:.4f} bits/weight), predicted KLD "
                     + (f"{pred:.5f}" if pred is not None else "n/a (a type outside the candidates)"))
        ours, theirs = _by_role(a.plan.entries), _by_role(pp.entries)
        for role in sorted(set(ours) | set(theirs)):
            o, t = ours.get(role, {}), theirs.get(role, {})
            if o != t:
                lines.append(f"  {role:<14} target-size {_counts(o):<34} {name} {_counts(t)}")
    return "\n".join(lines)
