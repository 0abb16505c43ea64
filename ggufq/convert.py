"""The one-pass pipeline: HF folder -> (arch, vocab, plan) -> streamed GGUF.

``cli`` only parses options and calls :func:`convert`; everything here can be
called from Python as well.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gguf
from gguf import GGMLQuantizationType as T

from . import GgufqError, arch as archs, plan as plans, quant, vocab as vocabs
from .arch.protocol import Arch
from .imatrix import load as load_imatrix
from .source import Model, open_model
from .write import Job, check_target, write_gguf


UNQUANTIZED = (T.F32, T.F16, T.BF16)
CALIB_TOKENS = 32768         # 64 sequences of 512 (ggufq.calib)


@dataclass
class Prepared:
    """Everything known before the first weight is read."""
    model: Model
    arch: Arch
    tensors: list            # list[OutTensor]
    info: plans.ModelInfo

    @property
    def specs(self) -> list[plans.TensorSpec]:
        return [t.spec for t in self.tensors]

    @property
    def n_params(self) -> int:
        return sum(t.n_rows * t.row_len for t in self.tensors)


def prepare(model_dir: os.PathLike | str) -> Prepared:
    model = open_model(model_dir)
    a = archs.for_config(model.config)
    tensors = a.tensors(model)
    return Prepared(model, a, tensors, a.model_info())


def tensor_specs(model_dir: os.PathLike | str) -> tuple[list[plans.TensorSpec], plans.ModelInfo]:
    """Names and shapes of the GGUF tensors of a model folder, without reading weights."""
    p = prepare(model_dir)
    return p.specs, p.info


def make_plan(p: Prepared, ftype: str, **kw) -> plans.Plan:
    return plans.make_plan(p.specs, p.info, ftype, **kw)


def output_type_label(plan: plans.Plan) -> str:
    return plan.ftype


def metadata_for(p: Prepared, name: Optional[str] = None) -> gguf.Metadata:
    """general.* naming from the model card / folder, as llama.cpp's converter derives it."""
    try:
        md = gguf.Metadata.load(None, p.model.path, name, p.n_params)
    except GgufqError:
        raise
    except Exception as e:      # the model card's YAML front matter, written by strangers
        raise GgufqError(f"{p.model.path.name}/README.md: malformed model card front matter "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "fix or remove its YAML header") from None
    if md.name is None:
        md.name = p.model.path.name
    if md.size_label is None and p.n_params > 0:
        from .arch.moe import parameter_counts   # experts: "8x1.2M", as GGUFWriter counts them
        md.size_label = gguf.size_label(*parameter_counts(p.tensors))
    return md


def default_output_name(p: Prepared, plan: plans.Plan, name: Optional[str] = None) -> str:
    md = metadata_for(p, name)
    stem = gguf.naming_convention(md.name, md.basename, md.finetune, md.version, md.size_label,
                                  output_type_label(plan))
    # the name comes from the model card (strangers): no control characters, no leading dot, bounded
    stem = "".join(c if c.isprintable() and c not in "/\\" else "-" for c in stem).lstrip(".")[:200] or "model"
    return stem + ".gguf"


def resolve_output(p: Prepared, plan: plans.Plan, out: Optional[os.PathLike | str], name: Optional[str] = None) -> Path:
    if out is None:
        return Path.cwd() / default_output_name(p, plan, name)
    out = Path(out)
    if out.is_dir():
        return out / default_output_name(p, plan, name)
    if out.suffix != ".gguf":
        raise GgufqError(f"{out}: the output name must end in .gguf (or be a directory)")
    return out


@dataclass
class Result:
    paths: list[Path]
    plan: plans.Plan
    seconds: float
    nbytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return self.plan.bits_per_weight


def convert(model_dir: os.PathLike | str, out: Optional[os.PathLike | str], ftype: str = "F16", *,
            jobs: int = 1, force: bool = False, progress: bool = True, name: Optional[str] = None,
            split_max_tensors: int = 0, split_max_size: int = 0,
            imatrix: Optional[os.PathLike | str] = None, vocab_pre: Optional[str] = None,
            method: str = "kquant", calib_tokens: int = CALIB_TOKENS, calib_cache: Optional[int] = None,
            gpu_layers: Optional[int] = 0, save_imatrix: Optional[os.PathLike | str] = None,
            plan_kw: Optional[dict] = None, allow_nonfinite: bool = False, before_commit=None,
            protect: tuple = (), log=None) -> Result:
    """``before_commit``/``protect``: see :func:`ggufq.write.write_gguf` (the inputs -- every
    file of the model folder, the imatrix and ``protect`` -- are never overwritten).
    ``save_imatrix`` is part of the output: written beside the temporary GGUF and placed with it.
    ``log(line)``: gets self-calibration's summary as soon as it is done (before the encoding)."""
    t0 = time.monotonic()
    from .quant import methods
    meth = methods.get(method)
    encoder = meth.encoder or quant.encode
    p = prepare(model_dir)
    plan = make_plan(p, ftype, **{"has_imatrix": imatrix is not None, **(plan_kw or {})})
    plan.check_encoders()
    # a mixture that needs an importance matrix and got none: the model calibrates itself through
    # llama.cpp and the diagonal of its input moments is the imatrix (planned as with one)
    self_imatrix = imatrix is None and not meth.moments and bool(plan.needs_imatrix())
    if self_imatrix:
        from . import calib
        plan.check_imatrix(calib_tokens > 0 and calib.available())
        plan = make_plan(p, ftype, **{**(plan_kw or {}), "has_imatrix": True})
        plan.check_encoders()
    if imatrix is None and (self_imatrix or meth.moments):
        from . import calib
        blind = [e.name for e in plan.needs_imatrix() if e.name not in calib.wanted(p.tensors)]
        if blind:     # stacked experts: llama.cpp's expert matmuls (MUL_MAT_ID) are not collected yet
            raise GgufqError(f"--type {plan.ftype} needs an importance matrix for {blind[0]} ({len(blind)} tensors), "
                             "whose inputs ggufq's self-calibration does not collect yet: pass --imatrix FILE "
                             "(from llama-imatrix)")
    plan.check_imatrix(imatrix is not None or meth.moments or self_imatrix)
    path = resolve_output(p, plan, out, name)
    inputs = [*p.model.input_files(), *(Path(x) for x in (imatrix, *protect) if x is not None)]
    check_target(path, force, inputs)
    im = load_imatrix(imatrix) if imatrix is not None else None
    if im is not None and not meth.moments:
        plan.check_imatrix(True, covered=im.entries)
    vocab = vocabs.load(p.model.path, p.model.config, pre=vocab_pre)
    md = metadata_for(p, name)
    by_name = {e.name: e for e in plan.entries}

    def add_metadata(w: gguf.GGUFWriter) -> None:
        write_header(p, md, vocab, plan, w, im)

    free: dict = {}
    if meth.importance:
        from .importance import importance_for
        with p.model:
            free = importance_for(p)
    notes: list[str] = list(vocab.notes)
    hessians = None
    calibrates = (meth.moments or self_imatrix) and calib_tokens > 0
    if save_imatrix is not None and not calibrates:
        raise GgufqError("--save-imatrix needs a self-calibrated --method "
                         f"({', '.join(m.name for m in methods.METHODS.values() if m.moments)}) and --calib-tokens > 0")
    if calibrates and (plan_has_quantized(plan) or save_imatrix is not None):
        from . import calib
        if not calib.available():
            raise GgufqError(calib.missing_message())
        hessians = calib.self_calibrate(
            p, vocab, functools.partial(write_header, p, md, vocab), path, calib_tokens, jobs=jobs,
            gpu_layers=gpu_layers, kv_bytes=calib.KV_BYTES if calib_cache is None else calib_cache,
            progress=progress)
        if log is not None:
            log(hessians.summary())
        if self_imatrix:
            n, t = hessians.tokens.shape
            notes.append(f"--type {plan.ftype} needs an importance matrix: made one from the model's own "
                         f"{n}x{t}-token sample (self-calibration through llama.cpp; --save-imatrix FILE keeps it)")
    job_list = []
    for t in p.tensors:
        qtype = by_name[t.name].qtype
        weights = None
        if qtype not in UNQUANTIZED:
            n_exp = t.shape[0] if len(t.shape) == 3 else 1    # stacked experts: one vector per expert
            real = im.for_tensor(t.name, t.row_len, n_exp) if im is not None else None
            # a real imatrix wins; the data-free importance stands in without one
            weights = real if real is not None else free.get(t.name)
            if self_imatrix:
                weights = functools.partial(hessians.importance, t.name)
            elif hessians is not None and hessians.covers(t.name):
                weights = hessians.lazy(t.name, real)
        job_list.append(Job(t, qtype, weights))
    commit = before_commit
    if save_imatrix is not None:
        final_im = Path(save_imatrix)
        check_target(final_im, force, inputs)

        def commit(tmp_paths, finals):
            from .calib import save_imatrix as _save
            tmp_im = Path(tmp_paths[0]).parent / final_im.name
            n = _save(hessians, tmp_im,
                      f"ggufq self-calibration: {hessians.tokens.shape[0]}x{hessians.tokens.shape[1]} tokens, seed 0")
            notes.append(f"wrote {final_im}: imatrix of {n} tensors from the self-generated sample")
            return [(tmp_im, final_im), *(before_commit(tmp_paths, finals) if before_commit else [])]
        commit.targets = lambda path: [final_im, *getattr(before_commit, "targets", lambda q: [])(path)]
    try:
        with p.model:
            paths = write_gguf(path, p.arch.name, add_metadata, job_list, encoder=encoder, n_jobs=jobs, force=force,
                               split_max_tensors=split_max_tensors, split_max_size=split_max_size,
                               progress=progress, label=f"{plan.ftype}", allow_nonfinite=allow_nonfinite,
                               before_commit=commit, protect=inputs, notes=notes)
        if hessians is not None:
            notes.append(hessians.summary() if log is None else f"peak RSS after encoding: {hessians.peak_rss_line()}")
    finally:
        if hessians is not None:
            hessians.close()
    return Result(paths, plan, time.monotonic() - t0, sum(q.stat().st_size for q in paths), notes)


def write_header(p: Prepared, md: gguf.Metadata, vocab, plan: plans.Plan, w: gguf.GGUFWriter, im=None) -> None:
    """Every key before the tensors: model metadata, hparams, file type, imatrix keys, vocabulary."""
    w.add_type(gguf.GGUFType.MODEL)
    md.set_gguf_meta_model(w)
    p.arch.write_hparams(w)
    w.add_file_type(int(plan.file_type))
    p.arch.write_arch_extras(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if im is not None:
        for key, val in im.metadata():
            (w.add_string if isinstance(val, str) else w.add_int32)(key, val)
    vocab.write(w)


def plan_has_quantized(plan: plans.Plan) -> bool:
    return any(e.qtype not in UNQUANTIZED for e in plan.entries)
