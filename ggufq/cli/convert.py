"""``ggufq convert``: HF folder -> quantized GGUF in one pass."""
from __future__ import annotations

import os
import sys

import click

from ..progress import fmt_bytes, fmt_secs


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5G', '4096' -> bytes (K/M/G/T powers of 1000, as llama-gguf-split)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 500M or 2G") from None
    if n <= 0:
        raise click.BadParameter("must be positive")
    return int(n * mult)


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@click.command("convert")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="Output .gguf file or directory (default: GGUF naming convention, in the current directory).")
@click.option("-t", "--type", "ftype", default="F16", show_default=True,
              help="Target type or preset: F32, F16, BF16, Q8_0.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Encoder processes (default: all cores).")
@click.option("--imatrix", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="llama.cpp importance matrix (GGUF imatrix or legacy .dat) for the weighted quantizers.")
@click.option("--split-max-size", default=None, metavar="SIZE",
              help="Split into shards of at most SIZE of tensor data (e.g. 2G), as llama-gguf-split.")
@click.option("--split-max-tensors", type=click.IntRange(min=1), default=None, metavar="N",
              help="Split into shards of at most N tensors.")
@click.option("--vocab-pre", default=None, metavar="NAME",
              help="Override llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for an unrecognised BPE tokenizer.")
@click.option("--name", default=None, help="Model name for general.name and the default file name.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def command(model_dir, out, ftype, jobs, imatrix, split_max_size, split_max_tensors, vocab_pre, name, force, quiet):
    """Convert a Hugging Face model folder (config.json, safetensors, tokenizer) to GGUF.

    Reads the weights lazily, quantizes in NumPy and streams the file; nothing
    is written unless the whole conversion succeeds.
    """
    from ..convert import convert

    progress = not quiet and sys.stderr.isatty()
    res = convert(model_dir, out, ftype, jobs=jobs or _default_jobs(), force=force,
                  progress=progress, name=name, imatrix=imatrix, vocab_pre=vocab_pre,
                  split_max_size=parse_size(split_max_size) if split_max_size else 0,
                  split_max_tensors=split_max_tensors or 0)
    if not quiet:
        where = ", ".join(str(p) for p in res.paths)
        click.echo(f"wrote {where}: {fmt_bytes(res.nbytes)}, {res.plan.bits_per_weight:.4f} bits/weight, "
                   f"{res.plan.ftype}, {len(res.plan.entries)} tensors in {fmt_secs(res.seconds)}", err=True)
