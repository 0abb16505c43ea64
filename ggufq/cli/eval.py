"""``ggufq eval``: perplexity (and KL divergence from a reference) through llama-cpp-python."""
from __future__ import annotations

import json
import os
import sys

import click

from .. import GgufqError


@click.command("eval")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--ref", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Unquantized GGUF of the same model: adds KL divergence, same-top-token % and ΔPPL.")
@click.option("--text", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Evaluation text file (default: $GGUFQ_EVAL_TEXT).")
@click.option("-c", "--ctx", type=click.IntRange(min=8), default=512, show_default=True,
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", type=int, default=0, help="Chunks to evaluate (default: all the text holds).")
@click.option("-ngl", "--gpu-layers", type=int, default=None,
              help="Layers to offload to the GPU; -1 all, 0 CPU only (default: all when "
                   "llama-cpp-python was built with GPU support).")
@click.option("-t", "--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write every figure to this JSON file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(model, ref, text, ctx, chunks, gpu_layers, threads, json_out, quiet):
    """Perplexity of MODEL.gguf as llama-perplexity computes it; with --ref, KL divergence of
    MODEL's next-token distribution from the reference's, as llama-perplexity --kl-divergence."""
    from ..eval import evaluate
    from ..eval.report import format_result

    text = text or os.environ.get("GGUFQ_EVAL_TEXT")
    if not text:
        raise GgufqError("no evaluation text: give --text FILE (or set GGUFQ_EVAL_TEXT)")
    res = evaluate(model, ref=ref, text=text, ctx=ctx, chunks=chunks, gpu_layers=gpu_layers,
                   threads=threads, progress=not quiet and sys.stderr.isatty())
    click.echo(format_result(res))
    if json_out:
        from ..procs import deferred
        tmp = json_out + ".tmp"
        with deferred():           # a signal here is raised after the file is whole (or removed)
            try:
                with open(tmp, "w") as f:
                    json.dump(res.to_dict(), f, indent=1)
                os.replace(tmp, json_out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
