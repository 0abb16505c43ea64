"""``ggufq plan MODEL --type X [--preset P] [--map FILE] [--json]``: the type of every
tensor and why, with size and bits per weight, before reading any weight."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .. import GgufqError
from ..plan import FTYPES, PRESETS, load_map, make_plan, specs_from_gguf
from ..plan.report import format_table, to_json


def tensor_list(model: Path):
    """(specs, info) of an HF model folder (through ggufq's converter) or of a GGUF file."""
    if model.is_file() and model.suffix == ".gguf":
        _check_gguf_hparams(model)
        return specs_from_gguf(model)
    if not model.is_dir():
        raise GgufqError(f"{model}: not a model folder or a .gguf file")
    try:
        from ..convert import tensor_specs
    except ImportError:
        raise GgufqError("this ggufq has no converter (ggufq.convert.tensor_specs); pass a .gguf file") from None
    return tensor_specs(model)


def _check_gguf_hparams(model: Path) -> None:
    """The header keys the plan reads have the types and sizes a real model has."""
    from ..plan.gguf_header import read_header
    try:
        kv, tensors = read_header(model)
    except (ValueError, OSError) as e:
        raise GgufqError(f"cannot read GGUF {model}: {e}") from None
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GgufqError(f"{model}: no general.architecture")
    for key in ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
                "expert_count"):
        v = kv.get(f"{arch}.{key}")
        if v is not None and (isinstance(v, (bool, float, str)) or not 0 <= v <= 1 << 24):
            raise GgufqError(f"{model}: {arch}.{key} = {v!r} is not a plausible count")
    n_layer = kv.get(f"{arch}.block_count") or 0
    if n_layer > len(tensors):
        raise GgufqError(f"{model}: {arch}.block_count = {n_layer} but the file has {len(tensors)} tensors")


@click.command("plan")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--type", "-t", "ftype", metavar="TYPE",
              help=f"llama-quantize mixture: {', '.join(FTYPES)} (default: the preset's base type)")
@click.option("--preset", "-p", type=click.Choice(sorted(PRESETS), case_sensitive=False),
              help="built-in map over --type: " + "; ".join(f"{p.name}: {p.doc}" for p in PRESETS.values()))
@click.option("--map", "-m", "map_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML layer map, [[rule]] pattern/layers/type; first match wins over --preset and --type")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="plan as llama-quantize does when given an importance matrix (as convert --imatrix)")
@click.option("--target-size", default=None, metavar="SIZE",
              help="choose every tensor's type for this file size (4.2G, 4200M, 3.9GiB, bytes): self-calibrates, "
                   "measures each tensor's error and each layer group's sensitivity, prints the allocation "
                   "and the nearest llama-quantize mixture (as convert --target-size would write it)")
@click.option("--bpw", "target_bpw", type=float, default=None, metavar="BITS", help="as --target-size, bits per weight")
@click.option("--method", default="kquant", show_default=True, help="convert's --method the file would use")
@click.option("--calib-tokens", type=click.IntRange(min=0), default=32768, show_default=True,
              help="self-calibration tokens (with --target-size)")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="threads (with --target-size)")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def command(model: Path, ftype, preset, map_file, imatrix, target_size, target_bpw, method, calib_tokens, jobs,
            as_json) -> None:
    """Show the ggml type of every tensor of MODEL (HF folder or .gguf), the rule that chose it, and the totals."""
    if target_size is not None or target_bpw is not None:
        return _target(model, ftype, preset, map_file, imatrix, target_size, target_bpw, method, calib_tokens, jobs,
                       as_json)
    if ftype is None and preset is None:
        raise GgufqError("give --type (e.g. Q4_K_M) or --preset")
    rules = load_map(map_file) if map_file else None
    specs, info = tensor_list(model)
    plan = make_plan(specs, info, ftype, rules=rules, preset=preset, has_imatrix=imatrix is not None)
    if as_json:
        click.echo(json.dumps(to_json(plan), indent=1))
    else:
        click.echo(format_table(plan))


def _target(model, ftype, preset, map_file, imatrix, target_size, target_bpw, method, calib_tokens, jobs, as_json):
    import sys
    import tempfile

    from ..alloc.report import format_allocation
    from ..convert import Options, allocation
    from .convert import _default_jobs
    if ftype is not None:
        raise click.UsageError("give --type or --target-size/--bpw, not both (a --map or --preset fixes tensors)")
    if not model.is_dir():
        raise GgufqError(f"{model}: --target-size needs the HF model folder (it measures the weights)")
    opts = Options(ftype="F16", method=method, jobs=jobs or _default_jobs(), imatrix=imatrix, calib_tokens=calib_tokens,
                   plan_kw={"preset": preset, "rules": load_map(map_file) if map_file else None},
                   target_size=target_size, target_bpw=target_bpw, progress=sys.stderr.isatty(),
                   log=lambda line: click.echo(line, err=True))
    with tempfile.TemporaryDirectory(prefix="ggufq-plan-") as d:
        a = allocation(model, opts, d)
    if as_json:
        click.echo(json.dumps({**to_json(a.plan), "recipe": a.recipe()}, indent=1))
    else:
        click.echo(format_table(a.plan))
        click.echo(format_allocation(a))
