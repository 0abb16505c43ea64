"""The one-pass pipeline: HF folder -> (arch, vocab, plan) -> streamed GGUF.

``cli`` only parses options and calls :func:`convert`; everything here can be
called from Python as well.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import gguf
from gguf import GGMLQuantizationType as T

from . import GgufqError, arch as archs, plan as plans, quant, vocab as vocabs
from .arch.protocol import Arch
from .imatrix import load as load_imatrix
from .quant.gptq import sweep_order
from .quant.scale_refit import SCHEMES as IQ_REFIT
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
                                  plan.ftype)
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


@dataclass
class Options:
    """What a conversion is asked to do: the one record the CLI, :func:`convert` and the tools share.

    ``types``: explicit ggml types per GGUF tensor name (the seam for tools and the size allocator):
    they replace the ``ftype`` mixture's choice for the quantizable tensors named (llama.cpp's
    row-length fallback still applies), ``ftype`` then only names ``general.file_type``.
    ``target_size`` (bytes, or a string such as ``4.2G``) or ``target_bpw``: :mod:`ggufq.alloc` chooses every quantizable tensor's
    type from measured sensitivity (``ftype``'s and ``plan_kw``'s rules name the fixed points).
    ``quantize_keys``: extra ``quantize.*`` metadata (key -> str or int). ``calibration``: a
    :class:`ggufq.calib.SelfCalibration` made earlier for this model (tools: one calibration for
    several files); used instead of calibrating, and left open. ``encoder`` (``(qtype, rows, weights)
    -> blocks``) and ``importance`` (name -> importance vector, instead of the data-free one) replace
    the method's, ``damp`` GPTQ's damping (default ``gptq.DAMP``): studies in tools/ that vary one piece
    of the pipeline.
    ``before_commit``/``protect``: see :func:`ggufq.write.write_gguf` (the inputs -- every file of
    the model folder, the imatrix and ``protect`` -- are never overwritten). ``save_imatrix`` is part
    of the output: written beside the temporary GGUF and placed with it. ``log(line)``: gets
    self-calibration's summary as soon as it is done (before the encoding). ``executor``: ``None``/
    ``"local"`` (``jobs`` processes here) or ``"ray"``/``"ray://HOST:PORT"`` (:mod:`ggufq.cluster`;
    ``jobs`` still sizes the local work: self-calibration's temporary file). ``resume``: keep the partial
    file of an interrupted run in ``.NAME.partial`` beside the output and continue one found there
    (:mod:`ggufq.resume`). ``rpc``: ``HOST:PORT`` of llama.cpp rpc-servers for the self-calibration's
    forward (its offloaded layers, ``gpu_layers``, go there; :func:`ggufq.calib.check_rpc`)."""
    ftype: str = "F16"
    method: str = "kquant"
    jobs: int = 1
    force: bool = False
    progress: bool = True
    name: Optional[str] = None
    split_max_tensors: int = 0
    split_max_size: int = 0
    imatrix: Optional[os.PathLike | str] = None
    vocab_pre: Optional[str] = None
    calib_tokens: int = CALIB_TOKENS
    calib_cache: Optional[int] = None
    gpu_layers: Optional[int] = 0
    save_imatrix: Optional[os.PathLike | str] = None
    plan_kw: Optional[dict] = None
    allow_nonfinite: bool = False
    before_commit: Optional[Callable] = None
    protect: tuple = ()
    log: Optional[Callable[[str], None]] = None
    types: Optional[Mapping[str, T]] = None
    target_size: Optional[int | str] = None
    target_bpw: Optional[float] = None
    alloc_kw: Optional[dict] = None
    quantize_keys: Optional[dict] = None
    calibration: Optional[object] = None
    encoder: Optional[Callable] = None
    importance: Optional[dict] = None
    damp: Optional[float] = None
    executor: Optional[str] = None
    resume: bool = False
    rpc: tuple = ()

    @property
    def targets(self) -> bool:
        """A size budget is given: the allocator chooses the types."""
        return self.target_size is not None or self.target_bpw is not None


def convert(model_dir: os.PathLike | str, out: Optional[os.PathLike | str], ftype: str = "F16", *,
            options: Optional[Options] = None, **kw) -> Result:
    """Convert ``model_dir`` to ``out``: the stages below in order. Keywords are :class:`Options`'
    fields (or pass ``options``)."""
    opts = options if options is not None else Options(ftype=ftype, **kw)
    t0 = time.monotonic()
    from .quant import methods
    meth = methods.get(opts.method)
    p = prepare(model_dir)
    planned = plan_stage(p, opts, meth)
    plan = planned.plan
    path = resolve_output(p, plan, out, opts.name)
    inputs = [*p.model.input_files(), *(Path(x) for x in (opts.imatrix, *opts.protect) if x is not None)]
    check_target(path, opts.force, inputs)
    im = load_imatrix(opts.imatrix) if opts.imatrix is not None else None
    if im is not None and not meth.moments and not opts.targets:
        plan.check_imatrix(True, covered=im.entries)
    vocab = vocabs.load(p.model.path, p.model.config, pre=opts.vocab_pre)
    md = metadata_for(p, opts.name)
    notes: list[str] = list(vocab.notes)
    budget = None
    if opts.targets:            # a budget outside the feasible range is refused before any weight is read
        from . import alloc
        budget = alloc.check_budget(p, opts, plan, md, vocab, im)
    # the cluster is joined and every node probed before any byte is written (calibration included)
    cluster = connect_executor(p, opts)
    hessians = None
    try:
        free = opts.importance if opts.importance is not None else data_free_importance(p, meth)
        hessians = calibrate_stage(p, opts, meth, planned, vocab, md, path, notes, free)
        qkeys = dict(opts.quantize_keys or {})
        if opts.targets:
            from . import alloc
            a = alloc.allocate(p, opts, meth, plan, im=im, hessians=hessians, free=free, vocab=vocab, md=md,
                               workdir=path.parent, log=opts.log, budget=budget)
            plan = a.plan
            qkeys.update(a.metadata())
            notes.extend(a.notes())
        # moments measured for the allocator alone do not reach a method that does not use them
        enc_moments = hessians if (meth.moments or planned.self_imatrix) else None
        job_list = make_jobs(p, plan, im, free, enc_moments, planned.self_imatrix, opts.damp,
                             getattr(meth.encoder, "refit_types", frozenset()))
        paths = write_stage(p, opts, meth, plan, path, job_list, inputs, notes, hessians,
                            lambda w: write_header(p, md, vocab, plan, w, im, qkeys), cluster)
    finally:
        if hessians is not None and hessians is not opts.calibration:
            hessians.close()
        if cluster is not None:
            cluster.close()
    if cluster is not None:
        notes.append(f"encoded on the {cluster.describe()}")
    return Result(paths, plan, time.monotonic() - t0, sum(q.stat().st_size for q in paths), notes)


@dataclass
class Planned:
    plan: plans.Plan
    self_imatrix: bool        # the mixture needs an imatrix and the model's own moments make it


def plan_stage(p: Prepared, opts: Options, meth) -> Planned:
    """The plan of every tensor, checked against the encoders and the importance sources."""
    # a self-calibrated method has the moments' diagonal as its imatrix: planned as llama-quantize plans with one
    # (the same types and size as llama-quantize --imatrix, and the comparison the quality tables make)
    kw = {"has_imatrix": opts.imatrix is not None or bool(meth.moments and opts.calib_tokens > 0),
          **(opts.plan_kw or {})}
    plan = make_plan(p, opts.ftype, **kw)
    if opts.types is not None:
        plan = with_types(plan, opts.types)
    plan.check_encoders()
    if opts.targets:      # the allocator picks types that need no imatrix; the name says the budget
        label = f"{opts.target_bpw}BPW" if opts.target_size is None else str(opts.target_size).replace(" ", "")
        return Planned(dataclasses.replace(plan, ftype=label), False)
    # a mixture that needs an importance matrix and got none: the model calibrates itself through
    # llama.cpp and the diagonal of its input moments is the imatrix (planned as with one)
    self_imatrix = opts.imatrix is None and not meth.moments and bool(plan.needs_imatrix())
    if self_imatrix:
        from . import calib
        plan.check_imatrix(opts.calib_tokens > 0 and calib.available())
        plan = make_plan(p, opts.ftype, **{**kw, "has_imatrix": True})
        if opts.types is not None:
            plan = with_types(plan, opts.types)
        plan.check_encoders()
    if opts.imatrix is None and (self_imatrix or meth.moments):
        from . import calib
        blind = [e.name for e in plan.needs_imatrix() if e.name not in calib.wanted(p.tensors)]
        if blind:     # a matrix no MUL_MAT / MUL_MAT_ID of llama.cpp's graph reads (calib.wanted)
            raise GgufqError(f"--type {plan.ftype} needs an importance matrix for {blind[0]} ({len(blind)} tensors), "
                             "whose inputs ggufq's self-calibration does not collect: pass --imatrix FILE "
                             "(from llama-imatrix)")
    plan.check_imatrix(opts.imatrix is not None or meth.moments or self_imatrix)
    return Planned(plan, self_imatrix)


def allocation(model_dir: os.PathLike | str, opts: Options, workdir: os.PathLike | str):
    """What ``convert`` would choose for ``opts.target_size``/``target_bpw``, without writing the
    file: an :class:`ggufq.alloc.Allocation` (``ggufq plan --target-size``; calibrates in ``workdir``)."""
    from . import alloc
    from .quant import methods
    meth = methods.get(opts.method)
    p = prepare(model_dir)
    planned = plan_stage(p, opts, meth)
    im = load_imatrix(opts.imatrix) if opts.imatrix is not None else None
    vocab = vocabs.load(p.model.path, p.model.config, pre=opts.vocab_pre)
    md = metadata_for(p, opts.name)
    budget = alloc.check_budget(p, opts, planned.plan, md, vocab, im)
    free = data_free_importance(p, meth)
    hessians = calibrate_stage(p, opts, meth, planned, vocab, md, Path(workdir) / "plan.gguf", [], free)
    try:
        return alloc.allocate(p, opts, meth, planned.plan, im=im, hessians=hessians, free=free, vocab=vocab, md=md,
                              workdir=Path(workdir), log=opts.log, budget=budget)
    finally:
        if hessians is not None and hessians is not opts.calibration:
            hessians.close()


def with_types(plan: plans.Plan, types: Mapping[str, T], why: str = "explicit type") -> plans.Plan:
    """``plan`` with the named quantizable tensors set to ``types`` (then llama.cpp's row-length
    fallback); tensors llama-quantize never quantizes keep their type. GgufqError for a name the
    model does not have."""
    from .plan import rules as R
    names = {e.name for e in plan.entries}
    unknown = [n for n in types if n not in names]
    if unknown:
        raise GgufqError(f"no tensor {unknown[0]} in this model ({len(unknown)} unknown names)")
    entries = []
    for e in plan.entries:
        t = types.get(e.name)
        if t is None or R.unquantized_reason(e.name, e.shape) is not None:
            entries.append(e)
            continue
        final, note = R.fallback(T(t), e.shape[-1])
        entries.append(plans.PlanEntry(e.name, e.shape, final, f"{why} -> {T(t).name}" + (f"; {note}" if note else ""),
                                       fallback=note is not None))
    return dataclasses.replace(plan, entries=entries)


def data_free_importance(p: Prepared, meth) -> dict:
    """The model's data-free importance per tensor, for the methods that use it (else empty)."""
    if not meth.importance:
        return {}
    from .importance import importance_for
    with p.model:
        return importance_for(p)


def calibrate_stage(p: Prepared, opts: Options, meth, planned: Planned, vocab, md, path: Path, notes: list,
                    free: Optional[dict] = None):
    """Self-calibration through llama.cpp when the method or the mixture or the allocator needs
    moments (a :class:`ggufq.calib.SelfCalibration`, the caller closes it), else None. Experts the
    sample routed few tokens to get the data-free importance (``free``, made here for the stacked
    expert tensors when the method did not need it)."""
    from .quant import methods
    plan = planned.plan
    if opts.calibration is not None:
        _expert_fallback(p, opts.calibration, free)
        return opts.calibration
    wants_moments = meth.moments or planned.self_imatrix or (opts.targets and opts.imatrix is None)
    calibrates = wants_moments and opts.calib_tokens > 0
    if opts.save_imatrix is not None and not calibrates:
        raise GgufqError("--save-imatrix needs a self-calibrated --method "
                         f"({', '.join(m.name for m in methods.METHODS.values() if m.moments)}) and --calib-tokens > 0")
    if not (calibrates and (plan_has_quantized(plan) or opts.targets or opts.save_imatrix is not None)):
        if opts.rpc:
            raise GgufqError("--rpc is for self-calibration's forward pass, which this conversion does not run "
                             "(a self-calibrated --method, an i-quant mixture without --imatrix, or --target-size)")
        return None
    from . import calib
    if not calib.available():
        raise GgufqError(calib.missing_message())
    hessians = calib.self_calibrate(
        p, vocab, functools.partial(write_header, p, md, vocab), path, opts.calib_tokens, jobs=opts.jobs,
        gpu_layers=opts.gpu_layers, kv_bytes=calib.KV_BYTES if opts.calib_cache is None else opts.calib_cache,
        progress=opts.progress, rpc=tuple(opts.rpc),
        full=calib.full_down(p.tensors, {e.name: e.qtype.name for e in plan.entries}) if meth.moments else frozenset())
    _expert_fallback(p, hessians, free)
    if opts.log is not None:
        opts.log(hessians.summary())
    if planned.self_imatrix:
        n, t = hessians.tokens.shape
        notes.append(f"--type {plan.ftype} needs an importance matrix: made one from the model's own "
                     f"{n}x{t}-token sample (self-calibration through llama.cpp; --save-imatrix FILE keeps it)")
    return hessians


def _expert_fallback(p: Prepared, hessians, free: Optional[dict]) -> None:
    """Hand the stacked expert tensors' data-free importance to the calibration (made here when the
    method did not need it: reads the norms and the gate/up experts once)."""
    if not any(len(t.shape) == 3 and "_exps." in t.name for t in p.tensors):
        return
    if not any("_exps." in k for k in (free or {})):
        from .importance import importance_for
        with p.model:
            free = importance_for(p)
    hessians.use_data_free(free)


def make_jobs(p: Prepared, plan: plans.Plan, im, free: dict, hessians, self_imatrix: bool,
              damp: Optional[float] = None, kq_refit: frozenset = frozenset()) -> list[Job]:
    """One writer job per tensor: its planned type and the importance it is encoded with (``kq_refit``: the
    k-quant/legacy types the method's encoder refits, whose Hessians keep the damped moment too)."""
    by_name = {e.name: e for e in plan.entries}
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
                weights = hessians.lazy(t.name, real, damp, *sweep_order(qtype),
                                        keep_h=qtype in IQ_REFIT or qtype in kq_refit)
        job_list.append(Job(t, qtype, weights))
    return job_list


def connect_executor(p: Prepared, opts: Options):
    """The cluster executor of ``opts.executor`` (joined, every node probed), or None for local processes."""
    from . import cluster
    if cluster.parse(opts.executor) is None:
        return None
    return cluster.connect(opts.executor, p.model.path)


def write_stage(p: Prepared, opts: Options, meth, plan: plans.Plan, path: Path, job_list: list, inputs: list,
                notes: list, hessians, add_metadata, executor=None) -> list[Path]:
    """Stream the GGUF (and the --save-imatrix file) into place."""
    commit = opts.before_commit
    before_commit = opts.before_commit
    if opts.save_imatrix is not None:
        final_im = Path(opts.save_imatrix)
        check_target(final_im, opts.force, inputs)

        def commit(tmp_paths, finals):
            from .calib import save_imatrix as _save
            tmp_im = Path(tmp_paths[0]).parent / final_im.name
            n = _save(hessians, tmp_im,
                      f"ggufq self-calibration: {hessians.tokens.shape[0]}x{hessians.tokens.shape[1]} tokens, seed 0")
            notes.append(f"wrote {final_im}: imatrix of {n} tensors from the self-generated sample")
            return [(tmp_im, final_im), *(before_commit(tmp_paths, finals) if before_commit else [])]
        commit.targets = lambda path: [final_im, *getattr(before_commit, "targets", lambda q: [])(path)]
    with p.model:
        paths = write_gguf(path, p.arch.name, add_metadata, job_list, encoder=opts.encoder or meth.encoder or quant.encode,
                           n_jobs=opts.jobs, force=opts.force, split_max_tensors=opts.split_max_tensors,
                           split_max_size=opts.split_max_size, progress=opts.progress,
                           label=f"{plan.ftype}" + (f" on {executor.cpus} Ray CPUs" if executor is not None else ""),
                           allow_nonfinite=opts.allow_nonfinite, before_commit=commit, protect=inputs, notes=notes,
                           executor=executor, resume=opts.resume)
    if hessians is not None:
        notes.append(hessians.summary() if opts.log is None else f"peak RSS after encoding: {hessians.peak_rss_line()}")
    return paths


def write_header(p: Prepared, md: gguf.Metadata, vocab, plan: plans.Plan, w: gguf.GGUFWriter, im=None,
                 quantize_keys: Optional[dict] = None) -> None:
    """Every key before the tensors: model metadata, hparams, file type, imatrix and other
    ``quantize.*`` keys, vocabulary."""
    w.add_type(gguf.GGUFType.MODEL)
    md.set_gguf_meta_model(w)
    p.arch.write_hparams(w)
    w.add_file_type(int(plan.file_type))
    p.arch.write_arch_extras(w)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if im is not None:
        for key, val in im.metadata():
            (w.add_string if isinstance(val, str) else w.add_int32)(key, val)
    for key, val in (quantize_keys or {}).items():
        (w.add_string if isinstance(val, str) else w.add_uint64)(key, val)
    vocab.write(w)


def plan_has_quantized(plan: plans.Plan) -> bool:
    return any(e.qtype not in UNQUANTIZED for e in plan.entries)
