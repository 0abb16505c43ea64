"""``ggufq convert``: HF folder -> quantized GGUF in one pass."""
from __future__ import annotations

import os
import sys

import click

from ..procs import usable_cpus as _default_jobs
from ..progress import fmt_bytes, fmt_secs
from ..quant import methods as _methods


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5G', '4096' -> bytes (K/M/G/T powers of 1000, as llama-gguf-split)."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}.get(t[-1:], 1)
    import math
    try:
        n = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 500M or 2G") from None
    if not math.isfinite(n) or n * mult >= 2 ** 63:
        raise click.BadParameter(f"{text!r} is not a size like 500M or 2G")
    if n * mult < 1:
        raise click.BadParameter(f"{text!r}: must be at least one byte")
    return int(n * mult)


@click.command("convert")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="Output .gguf file or directory (default: GGUF naming convention, in the current directory).")
@click.option("-t", "--type", "ftype", default=None,
              help="Target type or llama-quantize mixture: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
                   "Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K (default F16, or the preset's base type).")
@click.option("-p", "--preset", default=None, metavar="NAME",
              help="Built-in layer map over --type, e.g. attn8-mlp4 (attention Q8_0, MLP Q4_K).")
@click.option("-m", "--map", "map_file", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="TOML layer map: [[rule]] pattern/layers/type, first match wins over --preset and --type.")
@click.option("--target-size", default=None, metavar="SIZE",
              help="File size budget (4.2G, 4200M, 3.9GiB or bytes): each tensor's type is chosen from the "
                   "model's measured sensitivity for the least predicted KLD within it (instead of --type).")
@click.option("--bpw", "target_bpw", type=float, default=None, metavar="BITS",
              help="As --target-size, in bits per weight of the tensor data (e.g. 4.5).")
@click.option("--method", default="kquant", show_default=True, type=click.Choice(_methods.cli_names()),
              help=_methods.cli_help())
@click.option("--calib-tokens", type=click.IntRange(min=0), default=32768, show_default=True,
              help="Tokens the model generates for its own calibration with --method calibrated "
                   "(sequences of 512); 0 = data-free importance only.")
@click.option("--calib-cache", default="2G", show_default=True, metavar="SIZE",
              help="KV cache for self-calibration: as many sequences as fit are decoded together, "
                   "the rest in further rounds.")
@click.option("--gpu-layers", "-ngl", type=int, default=-1, show_default=True, metavar="N",
              help="Layers self-calibration offloads to the GPU when llama-cpp-python has GPU support "
                   "(-1 = all; ignored by a CPU build).")
@click.option("--save-imatrix", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Also write the self-calibration's diagonal moments as a llama.cpp GGUF imatrix "
                   "(for llama-quantize --imatrix and other llama.cpp tools).")
@click.option("--rpc", default=None, metavar="HOST:PORT,...",
              help="Self-calibration's forward pass on llama.cpp rpc-servers (ggml-rpc-server on other machines) "
                   "for a model larger than this machine's memory; needs llama.cpp libraries built with RPC "
                   "(tools/build_rpc.sh, LLAMA_CPP_LIB_PATH).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Encoder processes (default: all cores).")
@click.option("--executor", default="local", show_default=True, metavar="local|ray|ray://HOST:PORT",
              help="Where the encoding runs: local processes (--jobs), or tasks on a Ray cluster "
                   "(pip install 'ggufq[ray]'; ray = the cluster this machine is in, ray://HOST:PORT = its GCS "
                   "address); every node reads the model folder at the same path.")
@click.option("--resume", is_flag=True,
              help="Keep the partial file of an interrupted run (in .NAME.partial beside the output) and, "
                   "when one is there, continue after its last tensor whose bytes verify (sha256).")
@click.option("--imatrix", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="llama.cpp importance matrix (GGUF imatrix or legacy .dat) for the weighted quantizers.")
@click.option("--split-max-size", default=None, metavar="SIZE",
              help="Split into shards of at most SIZE of tensor data (e.g. 2G), as llama-gguf-split.")
@click.option("--split-max-tensors", type=click.IntRange(min=1), default=None, metavar="N",
              help="Split into shards of at most N tensors.")
@click.option("--vocab-pre", default=None, metavar="NAME",
              help="Override llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for an unrecognised BPE tokenizer.")
@click.option("--ollama", is_flag=True,
              help="Also write an Ollama Modelfile (chat TEMPLATE, stop tokens, SYSTEM, LICENSE) next to the GGUF.")
@click.option("--validate", is_flag=True,
              help="After converting, measure PPL and KL divergence against a temporary F16 reference "
                   "(llama-cpp-python) on --text, print the table, and remove the reference.")
@click.option("--text", "val_text", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Evaluation text for --validate (default: $GGUFQ_EVAL_TEXT).")
@click.option("--chunks", "val_chunks", type=int, default=40, show_default=True,
              help="Chunks of --ctx tokens --validate evaluates (0: the whole text).")
@click.option("--ctx", "val_ctx", type=click.IntRange(min=8), default=512, show_default=True,
              help="Context length for --validate.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Write tensors that hold NaN/Inf (or values beyond F16's range for an F16 target) "
                   "instead of refusing them.")
@click.option("--name", default=None, help="Model name for general.name and the default file name.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def command(model_dir, out, ftype, preset, map_file, target_size, target_bpw, method, calib_tokens, calib_cache, gpu_layers, save_imatrix, rpc, jobs, executor, resume, imatrix, split_max_size, split_max_tensors, vocab_pre, ollama, validate, val_text, val_chunks, val_ctx,
            allow_nonfinite, name, force, quiet):
    """Convert a Hugging Face model folder (config.json, safetensors, tokenizer) to GGUF.

    Reads the weights lazily, quantizes in NumPy and streams the file; nothing
    is written unless the whole conversion succeeds.

    Long because a click command: one line per option and its handling."""
    from ..convert import convert
    from ..plan import load_map

    if (target_size is not None or target_bpw is not None) and ftype is not None:
        raise click.UsageError("give --type or --target-size/--bpw, not both (a --map or --preset fixes tensors)")
    if ftype is None and preset is None:
        ftype = "F16"
    if validate and val_text is None:
        val_text = os.environ.get("GGUFQ_EVAL_TEXT")
        if not val_text:
            raise click.UsageError("--validate needs --text FILE (or $GGUFQ_EVAL_TEXT), "
                                   "the text to measure perplexity and KLD on")
    plan_kw = {"preset": preset, "rules": load_map(map_file) if map_file else None}

    progress = not quiet and sys.stderr.isatty()
    n_jobs = jobs or _default_jobs()
    sizes = dict(calib_cache=parse_size(calib_cache), split_max_size=parse_size(split_max_size) if split_max_size else 0)
    extra_notes: list[str] = []
    val_lines: list[str] = []

    def before_commit(tmp_paths, finals):
        """The rest of the output, made from the complete files before anything is placed."""
        from pathlib import Path

        from ..write import check_target
        moves = []
        if ollama:
            from ..ollama import modelfile_path_for, write_modelfile
            final_mf = modelfile_path_for(finals[0])
            check_target(final_mf, force, protect)
            tmp_mf = Path(tmp_paths[0]).parent / final_mf.name
            notes = write_modelfile(tmp_paths if len(tmp_paths) > 1 else tmp_paths[0], model_dir, tmp_mf)
            extra_notes.extend(f"wrote {final_mf}" if n.startswith("wrote ") else n for n in notes)
            moves.append((tmp_mf, final_mf))
        if validate:
            val_lines.append(_validate(model_dir, tmp_paths[0], val_text, val_chunks, val_ctx, n_jobs, progress))
        return moves

    if ollama:
        from ..ollama import modelfile_path_for
        before_commit.targets = lambda path: [modelfile_path_for(path)]
    protect = tuple(p for p in (map_file, val_text) if p)
    res = convert(model_dir, out, ftype, jobs=n_jobs, force=force,
                  progress=progress, name=name, imatrix=imatrix, vocab_pre=vocab_pre, plan_kw=plan_kw, method=method,
                  calib_tokens=calib_tokens, calib_cache=sizes["calib_cache"], gpu_layers=gpu_layers,
                  save_imatrix=save_imatrix, log=None if quiet else (lambda line: click.echo(line, err=True)),
                  split_max_size=sizes["split_max_size"], split_max_tensors=split_max_tensors or 0,
                  allow_nonfinite=allow_nonfinite, protect=protect, target_size=target_size, target_bpw=target_bpw,
                  before_commit=before_commit if (ollama or validate) else None, executor=executor,
                  resume=resume, rpc=tuple(x.strip() for x in rpc.split(",") if x.strip()) if rpc else ())
    notes = list(res.notes) + extra_notes
    if not quiet:
        for line in notes:
            click.echo(line, err=True)
        where = ", ".join(str(p) for p in res.paths)
        click.echo(f"wrote {where}: {fmt_bytes(res.nbytes)}, {res.plan.bits_per_weight:.4f} bits/weight, "
                   f"{res.plan.ftype}, {len(res.plan.entries)} tensors in {fmt_secs(res.seconds)}", err=True)
    elif any(n.startswith("warning:") for n in notes):
        for line in notes:
            if line.startswith("warning:"):
                click.echo(line, err=True)
    for text in val_lines:
        click.echo(text)


def _validate(model_dir, out, text, chunks, ctx, jobs, progress) -> str:
    """PPL/KLD of the new file (still in its temporary folder) against a temporary F16
    reference written beside it, in the same temporary folder; returns the table."""
    from ..convert import convert
    from ..eval import evaluate
    from ..eval.report import format_result

    ref = convert(model_dir, out.parent / "reference-F16.gguf", "F16", jobs=jobs, progress=progress).paths[0]
    r = evaluate(out, ref=ref, text=text, ctx=ctx, chunks=chunks, progress=progress, label="validate")
    return format_result(r)
