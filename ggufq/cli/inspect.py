"""``ggufq inspect``: metadata, tensor table and bits per weight of any GGUF file."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

from .. import GgufqError
from ..progress import fmt_bytes


def _value(field) -> object:
    import gguf
    t = field.types[0] if field.types else None
    if t == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


def read_summary(path: str) -> dict:
    """Everything ``inspect`` shows. The header is walked with bounds first
    (:func:`ggufq.plan.gguf_header.check`), so gguf-py's reader never sees a count it could not hold."""
    import gguf

    from ..plan.gguf_header import check
    try:
        check(path)
    except ValueError as e:
        raise GgufqError(f"{path}: not a readable GGUF file ({e})") from None
    try:
        r = gguf.GGUFReader(path)
    except (ValueError, IndexError, EOFError, KeyError, TypeError, OverflowError) as e:
        raise GgufqError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = _value(f)
    tensors = []
    by_type = defaultdict(lambda: [0, 0])
    for t in r.tensors:
        shape = [int(x) for x in t.shape.tolist()]  # ggml order (ne0 = row length first), as llama.cpp prints
        n = int(np.prod(shape))
        tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": shape, "bytes": int(t.n_bytes)})
        by_type[t.tensor_type.name][0] += n
        by_type[t.tensor_type.name][1] += int(t.n_bytes)
    n_all = sum(v[0] for v in by_type.values())
    b_all = sum(v[1] for v in by_type.values())
    return {
        "file": str(path), "file_bytes": Path(path).stat().st_size, "metadata": meta, "tensors": tensors,
        "types": {k: {"elements": v[0], "bytes": v[1], "bits_per_weight": v[1] * 8 / v[0]} for k, v in by_type.items()},
        "elements": n_all, "tensor_bytes": b_all, "bits_per_weight": b_all * 8 / max(1, n_all),
    }


def _short(v: object, width: int = 70) -> str:
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:5])
        s = f"[{head}{', ...' if len(v) > 5 else ''}] ({len(v)} items)"
    else:
        s = repr(v)
    s = s.replace("\n", "\\n")
    return s if len(s) <= width else s[: width - 3] + "..."


@click.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def command(file, as_json):
    """Show a GGUF file's metadata, tensors and bits per weight."""
    s = read_summary(file)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    click.echo(f"{s['file']}: {fmt_bytes(s['file_bytes'])}, {len(s['tensors'])} tensors, "
               f"{s['elements']:,} weights, {s['bits_per_weight']:.4f} bits/weight")
    click.echo("\nmetadata:")
    for k, v in s["metadata"].items():
        click.echo(f"  {k:<42} {_short(v)}")
    click.echo("\ntensors:")
    w = max(len(t["name"]) for t in s["tensors"]) if s["tensors"] else 10
    click.echo(f"  {'name':<{w}}  {'type':<6} {'shape':<20} {'bytes':>12}")
    for t in s["tensors"]:
        click.echo(f"  {t['name']:<{w}}  {t['type']:<6} {str(t['shape']):<20} {t['bytes']:>12,}")
    click.echo("\nby type:")
    for k, v in sorted(s["types"].items(), key=lambda kv: -kv[1]["bytes"]):
        click.echo(f"  {k:<6} {v['elements']:>14,} weights {fmt_bytes(v['bytes']):>11}  {v['bits_per_weight']:.4f} bits/weight")
