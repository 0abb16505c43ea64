"""Streaming GGUF output on top of ``gguf.GGUFWriter``.

Header, metadata and every tensor info are written first (sizes are known from
shapes and target types), then each tensor's data chunk by chunk as it is
encoded, so memory holds a few chunks whatever the model size. Everything goes
to a temporary folder beside the target; files are flushed, fsynced and renamed
into place only when complete. On any error or interrupt the temporary folder
is removed and no partial output is left behind.

Whatever else belongs to the output (an Ollama Modelfile, a validation run) is
done by ``before_commit`` on the complete files while they are still in the
temporary folder; nothing is renamed into place unless it succeeds. No existing
file is replaced without ``force``, and never a file of ``protect`` (the inputs).

Every chunk is checked for NaN/Inf (and, for an F16 target, for values F16
cannot hold) in the worker before it is encoded, with one vectorised min/max;
such a tensor is an error naming it and the count unless ``allow_nonfinite``.
Encoder workers belong to a :class:`ggufq.procs.WorkerPool`: they die with the
parent, and any error or signal kills and reaps them before the temporary
folder goes.
"""
from __future__ import annotations

import errno
import hashlib
import multiprocessing as mp
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import GgufqError, blas, quant
from .arch import OutTensor
from .procs import WorkerPool, check as check_signals, deferred, finished, pending
from .progress import Progress
from .resume import Journal, partial_dir, verified

if TYPE_CHECKING:
    from .quant.gptq import Hessian

CHUNK_ELEMENTS = 1 << 22          # ~16 MiB of float32 per chunk
F16_INF = 65520.0                 # the smallest magnitude that rounds to inf in IEEE half (max finite 65504)
Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]
# The per-column importance of one matrix (one name, ``imatrix``, at every seam): float32 [row_len],
# llama-imatrix's convention (mean squared input per column; only ratios matter) -- from --imatrix,
# self-calibration's moment diagonals or the data-free estimate (ggufq.importance). With full input
# moments it is a quant.gptq.Hessian (its ``diag`` is the imatrix); a callable defers either to the
# moment the writer reaches the tensor (calib.SelfCalibration.lazy).
Imatrix = Union[np.ndarray, "Hessian"]
ImatrixSource = Union[Imatrix, Callable[[], Optional[Imatrix]], None]


@dataclass
class Job:
    """One tensor to write: where its rows come from and how to encode them."""
    tensor: OutTensor
    qtype: T
    imatrix: ImatrixSource = None

    @property
    def nbytes(self) -> int:
        return self.tensor.n_rows * quant.row_nbytes(self.qtype, self.tensor.row_len)

    @property
    def copies(self) -> bool:
        """The checkpoint already holds these rows in the target type: their bytes are copied."""
        return self.tensor.native is not None and self.qtype == self.tensor.native

    @property
    def n_elements(self) -> int:
        return self.tensor.n_rows * self.tensor.row_len


def chunk_rows(row_len: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, row_len))


def _encode(encoder: Encoder, qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]) -> bytes:
    return encoder(qtype, rows, imatrix).tobytes()


# byte offsets of the F16 scale fields (d, dmin/m) in each block of ggml's quantized types
# (block_q4_0 ... block_q6_K in ggml-common.h); every such field is at most max|w| in magnitude,
# so they can overflow only when a chunk holds values of 65504 or more
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
              T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _overflowed_blocks(qtype: T, data: bytes) -> int:
    """Blocks of ``data`` whose F16 scale fields are inf/NaN."""
    bsize = GGML_QUANT_SIZES[qtype][1]
    blocks = np.frombuffer(data, dtype=np.uint8).reshape(-1, bsize)
    bad = np.zeros(len(blocks), dtype=bool)
    for off in F16_FIELDS.get(qtype, ()):
        half = blocks[:, off].astype(np.uint16) | (blocks[:, off + 1].astype(np.uint16) << 8)
        bad |= (half & 0x7C00) == 0x7C00
    return int(np.count_nonzero(bad))


def _work(encoder: Encoder, qtype: T, rows: np.ndarray, imatrix, allow_nonfinite: bool) -> tuple[bytes, int, int]:
    """(encoded bytes, non-finite weights, values F16 cannot hold: weights for an F16 target,
    blocks whose F16 scale overflowed for a quantized one).

    The normal path costs one min and one max over the chunk; the counts are taken only when
    those say something is wrong. A bad chunk is not kept (b"") unless ``allow_nonfinite``.
    """
    lo, hi = (float(rows.min()), float(rows.max())) if rows.size else (0.0, 0.0)
    big = max(-lo, hi)
    if np.isfinite(lo) and np.isfinite(hi) and (big < 65504.0 or qtype in (T.F32, T.BF16)):
        return _encode(encoder, qtype, rows, imatrix), 0, 0
    finite = np.isfinite(rows)
    n_bad = int(rows.size - np.count_nonzero(finite))
    if n_bad and not allow_nonfinite:
        return b"", n_bad, 0
    if qtype == T.F16:
        n_over = int(np.count_nonzero(np.abs(np.where(finite, rows, 0)) >= F16_INF))
        if n_over and not allow_nonfinite:
            return b"", n_bad, n_over
    with np.errstate(all="ignore"):
        data = _encode(encoder, qtype, rows, imatrix)
    if qtype in F16_FIELDS and not n_bad:
        n_over = _overflowed_blocks(qtype, data)
        if n_over and not allow_nonfinite:
            return b"", n_bad, n_over
    elif qtype != T.F16:
        n_over = 0
    return data, n_bad, n_over


def _ranges(job: Job) -> Iterator[tuple[int, int]]:
    t = job.tensor
    step = chunk_rows(t.row_len)
    # a stacked expert tensor [n_expert, rows, cols]: chunks never span two experts, so each chunk
    # takes its own expert's importance (llama-quantize's imatrix + i03 * n_per_row)
    per = t.shape[-2] if len(t.shape) == 3 and t.shape[-2] > 0 else max(1, t.n_rows)
    for base in range(0, t.n_rows, per):
        for lo in range(base, base + per, step):
            yield lo, min(base + per, lo + step)


def _chunk_weights(job: Job, wts, lo: int):
    """The importance for the chunk starting at row ``lo``: an expert tensor's per-expert vector
    ``[n_expert * row_len]`` is cut to the chunk's expert."""
    t = job.tensor
    if isinstance(wts, np.ndarray) and len(t.shape) == 3 and wts.size == t.shape[0] * t.row_len > t.row_len:
        e = lo // t.shape[1]
        return wts[e * t.row_len:(e + 1) * t.row_len]
    return wts


def _read(job: Job, lo: int, hi: int) -> np.ndarray:
    rows = job.tensor.read(lo, hi)
    if rows.shape != (hi - lo, job.tensor.row_len):
        raise GgufqError(f"{job.tensor.name}: read rows {lo}.. gave shape {rows.shape}")
    return rows


# Forked workers find the jobs here (inherited from the parent at fork time) and read their own
# rows: the parent then neither reads nor pickles float32 chunks, it only writes bytes in order.
_FORKED_JOBS: Sequence[Job] = ()


def _copy(job: Job, lo: int, hi: int) -> tuple[bytes, int, int]:
    """A chunk of a tensor kept in its checkpoint's block type: its block bytes as they are."""
    data = np.ascontiguousarray(job.tensor.raw(lo, hi), dtype=np.uint8)
    want = (hi - lo) * quant.row_nbytes(job.qtype, job.tensor.row_len)
    if data.size != want:
        raise GgufqError(f"{job.tensor.name}: raw rows {lo}.. gave {data.size} bytes, expected {want}")
    return data.tobytes(), 0, 0


def encode_chunk(encoder: Encoder, job: Job, lo: int, hi: int, weights, allow_nonfinite: bool):
    """The job function of every executor: rows ``[lo, hi)`` of ``job`` read here and encoded (or
    their block bytes copied); ``(bytes, non-finite, beyond F16)`` as :func:`_work`. A pure function
    of the model files and its arguments, so a retried chunk gives the same bytes."""
    if job.copies:
        return _copy(job, lo, hi)
    return _work(encoder, job.qtype, _read(job, lo, hi), weights, allow_nonfinite)


def _read_and_encode(encoder: Encoder, i: int, lo: int, hi: int, weights, allow_nonfinite: bool):
    return encode_chunk(encoder, _FORKED_JOBS[i], lo, hi, weights, allow_nonfinite)


def _weights(job: Job):
    """A job's importance; a callable is computed here, in file order, in the parent process
    (self-calibration's moments are made layer by layer as the writer reaches them)."""
    return job.imatrix() if callable(job.imatrix) else job.imatrix


def _prefetch_next(jobs: Sequence[Job], i: int, ahead: int = 8) -> None:
    """Start the next different factorization among the ``ahead`` jobs after ``i`` (calib.LazyWeights),
    so that the parent factors it while the encoders work through job ``i``'s chunks."""
    key = getattr(jobs[i].imatrix, "factor_key", None)
    for job in jobs[i + 1:i + 1 + ahead]:
        k = getattr(job.imatrix, "factor_key", None)
        if k is not None and k != key:
            job.imatrix.prefetch()
            return


def _pool(n_jobs: int, jobs: Sequence[Job]) -> tuple[Optional[WorkerPool], bool]:
    """(pool, whether its workers read rows themselves)."""
    global _FORKED_JOBS
    if n_jobs <= 1:
        return None, False
    if "fork" in mp.get_all_start_methods():
        _FORKED_JOBS = jobs
        pool = WorkerPool(n_jobs, mp_context=mp.get_context("fork"), initializer=blas.one_thread)
        try:
            pool.start()        # every fork before _encoded's first prefetch thread (WorkerPool.start)
        except BaseException:
            pool.close(ok=False)
            raise
        return pool, True
    return WorkerPool(n_jobs, mp_context=mp.get_context("spawn"), initializer=blas.one_thread), False


def _encoded(jobs: Sequence[Job], encoder: Encoder, pool: Optional[Executor],
             workers_read: bool = False, allow_nonfinite: bool = False,
             start: int = 0) -> Iterator[tuple[int, int, tuple]]:
    """(job index, elements, (bytes, non-finite, beyond F16)) per chunk, in file order, from job
    ``start`` on; a bounded window of chunks in flight."""
    if pool is None:
        for i, job in enumerate(jobs):
            if i < start:
                continue
            wts = None if job.copies else _weights(job)
            for lo, hi in _ranges(job):
                if job.copies:
                    yield i, (hi - lo) * job.tensor.row_len, _copy(job, lo, hi)
                    continue
                rows = _read(job, lo, hi)
                yield i, rows.size, _work(encoder, job.qtype, rows, _chunk_weights(job, wts, lo), allow_nonfinite)
        return
    window: deque[tuple[int, int, Future]] = deque()
    # a cluster executor (ggufq.cluster.RayExecutor) has its own window and its workers read by path
    remote = getattr(pool, "submit_chunk", None)
    limit = getattr(pool, "window", None) or 2 * getattr(pool, "_max_workers", 2)
    for i, job in enumerate(jobs):
        if i < start:
            continue
        wts = None if job.copies else _weights(job)
        _prefetch_next(jobs, i)
        for lo, hi in _ranges(job):
            n = (hi - lo) * job.tensor.row_len
            cw = _chunk_weights(job, wts, lo)
            if remote is not None:
                fut = remote(encoder, job, lo, hi, cw, allow_nonfinite)
            elif job.copies and not workers_read:      # a plain read: no need to ship it to a worker
                fut = Future()
                fut.set_result(_copy(job, lo, hi))
            elif workers_read:
                fut = pool.submit(_read_and_encode, encoder, i, lo, hi, cw, allow_nonfinite)
            else:
                fut = pool.submit(_work, encoder, job.qtype, _read(job, lo, hi), cw, allow_nonfinite)
            window.append((i, n, fut))
            while len(window) >= limit:
                j, n, fut = window.popleft()
                yield j, n, fut.result()
    while window:
        j, n, fut = window.popleft()
        yield j, n, fut.result()


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None], jobs: Sequence[Job], *,
               encoder: Encoder = quant.encode, n_jobs: int = 1, force: bool = False,
               split_max_tensors: int = 0, split_max_size: int = 0,
               progress: bool = True, label: str = "writing", allow_nonfinite: bool = False,
               before_commit: Optional[Callable[[list[Path], list[Path]], list[tuple[Path, Path]]]] = None,
               protect: Sequence[Path] = (), notes: Optional[list] = None, final: bool = True,
               executor=None, resume: bool = False) -> list[Path]:
    """Write a complete GGUF (or its shards) atomically; returns the final paths.

    ``executor``: encode on it instead of ``n_jobs`` local processes (a :class:`ggufq.cluster.RayExecutor`:
    ``submit_chunk``, ``window``, ``close``); the caller made it and closes it, this closes it early
    (its tasks cancelled) when the write fails.

    ``resume``: the temporary folder is :func:`ggufq.resume.partial_dir` and outlives a failed or
    interrupted run; a partial file found there continues after its last tensor that verifies
    (:mod:`ggufq.resume`). One file only (no splits).

    ``final``: this file is the run's output, so once it is in place a signal changes nothing
    (:func:`ggufq.procs.finished`); ``False`` for intermediate files (the calibration model).

    ``before_commit(tmp_paths, final_paths)`` runs on the complete files before anything is
    renamed into place and returns further ``(tmp file, final path)`` pairs to place with them.
    ``protect``: files never replaced, even with ``force`` (the conversion's inputs).

    Long because the header-first streaming writer, the atomic placement and the signal/cleanup
    discipline share one try/finally over the temporary files; splitting it would spread that invariant.
    """
    global _FORKED_JOBS
    path = Path(path)
    check_target(path, force, protect)
    # what before_commit will place, known from the target's name: refused now, not after the work
    for extra in getattr(before_commit, "targets", lambda p: [])(path):
        check_target(extra, force, protect)
    if not path.parent.is_dir():
        raise GgufqError(f"{path.parent}: no such directory")
    if resume and (split_max_tensors or split_max_size):
        raise GgufqError("--resume writes one file: leave out --split-max-size/--split-max-tensors "
                         "(llama-gguf-split can split the result)")
    w = None
    pool = None
    ok = False
    journal = None
    with deferred():                    # the folder exists only with the try that removes it
        if resume:
            tmpdir = partial_dir(path)
            tmpdir.mkdir(exist_ok=True)
            old = tmpdir / (path.name + ".old")
            if not old.exists() and (tmpdir / path.name).exists():
                os.replace(tmpdir / path.name, old)      # the writer's new header goes to the name
        else:
            tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            if final and notes is not None and partial_dir(path).is_dir():
                notes.append(f"note: {partial_dir(path)} holds the partial file of an interrupted --resume run "
                             "(unused now: pass --resume to continue it, or remove it)")
    try:
        w = gguf.GGUFWriter(tmpdir / path.name, arch, split_max_tensors=split_max_tensors,
                            split_max_size=split_max_size)
        add_metadata(w)
        for job in jobs:
            w.add_tensor_info(job.tensor.name, job.tensor.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        # which file each tensor goes to, in GGUFWriter's own split decision
        where = {name: k for k, shard in enumerate(w.tensors) for name in shard}
        fouts = [w.fout[where[j.tensor.name]] for j in jobs]
        for fout in w.fout:
            w.write_padding(fout, fout.tell())
        start, offsets, hashes = 0, [], None
        if resume:
            start, offsets, journal = _resume(w, tmpdir / path.name, old, jobs, notes)
            fouts = [w.fout[0]] * len(jobs)
            hashes = hashlib.sha256()
        pool, workers_read = (executor, True) if executor is not None else _pool(n_jobs, jobs)
        total = sum(j.n_elements for j in jobs)
        allowed: list[str] = []
        with Progress(total, label, n_items=len(jobs), enabled=progress) as bar:
            written = [0] * len(jobs)
            bad = [[0, 0] for _ in jobs]
            last = -1
            if start:
                bar.advance(sum(j.n_elements for j in jobs[:start]), items=start)

            def finish(k: int) -> None:
                if any(bad[k]):
                    msg = _bad_values(jobs[k], *bad[k])
                    if not allow_nonfinite:
                        raise GgufqError(msg + "; fix the weights, or pass --allow-nonfinite to write them anyway")
                    allowed.append(msg)
                _finish(w, fouts[k], jobs[k], written[k])
                if journal is not None:              # the tensor's bytes first, then its journal line
                    fouts[k].flush()
                    journal.done(k, jobs[k].tensor.name, offsets[k], jobs[k].nbytes, hashes.hexdigest())
                bar.advance(items=1)

            for i, n, (data, n_bad, n_over) in _encoded(jobs, encoder, pool, workers_read, allow_nonfinite, start):
                if i != last:
                    if last >= 0:
                        finish(last)
                    last = i
                    if hashes is not None:
                        hashes = hashlib.sha256()
                check_signals()
                bad[i][0] += n_bad
                bad[i][1] += n_over
                if hashes is not None:
                    hashes.update(data)
                fouts[i].write(data)
                written[i] += len(data)
                bar.advance(n, nbytes=len(data), item=jobs[i].tensor.name)
            if last >= 0:
                finish(last)
        if notes is not None:
            notes += [f"warning: {m} (written anyway: --allow-nonfinite)" for m in allowed]
        for fout in w.fout:
            fout.flush()
            os.fsync(fout.fileno())
        names = [Path(f.name) for f in w.fout]
        w.close()
        if journal is not None:
            journal.close()
        if pool is not None and pool is not executor:
            pool.close(ok=True)
        pool = None
        finals = [path.parent / src.name for src in names]
        moves = list(zip(names, finals))
        if before_commit is not None:
            moves += before_commit(names, finals)
        for _, dst in moves:
            check_target(dst, force, protect)
        _commit(moves, final)
        ok = True
        return finals
    except BrokenProcessPool:
        raise GgufqError("an encoder process died (killed, or out of memory?); nothing was written -- "
                         "try fewer --jobs") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise GgufqError(f"disk full while writing {path} (nothing was left behind)") from None
        raise
    finally:
        with deferred(raise_at_exit=False):
            _FORKED_JOBS = ()
            if pool is not None:
                pool.close(ok=ok)
            if w is not None:
                w.close()
            if journal is not None:
                journal.close()
            if ok or not resume:
                shutil.rmtree(tmpdir, ignore_errors=True)


def _resume(w: gguf.GGUFWriter, new: Path, old: Path, jobs: Sequence[Job], notes: Optional[list]):
    """Put the verified part of a partial file (``old``) in place of the header just written to ``new``
    (when it is the same header), positioned after its last good tensor; start the journal.
    Returns (tensors kept, every tensor's offset, the journal)."""
    fout = w.fout[0]
    fout.flush()
    data_start = fout.tell()
    with open(new, "rb") as f:
        header = f.read(data_start)
    offsets, off = [], data_start
    for j in jobs:
        offsets.append(off)
        off += gguf.GGUFWriter.ggml_pad(j.nbytes, w.data_alignment)
    journal = Journal(new.parent)
    kept = verified(old, journal, header, [j.tensor.name for j in jobs], offsets,
                    [j.nbytes for j in jobs]) if old.exists() else []
    if kept:
        k = len(kept)
        end = offsets[k] if k < len(jobs) else off
        fout.close()
        os.replace(old, new)
        f = open(new, "r+b")
        w.fout[0] = f
        f.truncate(end)
        f.seek(end)
        if notes is not None:
            notes.append(f"resumed {new.name} from {new.parent.name}: {k} of {len(jobs)} tensors verified "
                         f"(sha256) and kept, {len(jobs) - k} to encode")
    elif old.exists():
        os.unlink(old)
        if notes is not None:
            notes.append(f"{new.parent.name}: the partial file does not match this conversion (or its first tensor "
                         "does not verify); started over")
    journal.begin(hashlib.sha256(header).hexdigest(), len(jobs), kept)
    return len(kept), offsets, journal


def _bad_values(job: Job, n_bad: int, n_over: int) -> str:
    what = []
    if n_bad:
        what.append(f"{n_bad} non-finite (NaN/Inf) weights")
    if n_over and job.qtype == T.F16:
        what.append(f"{n_over} weights beyond F16's range (|x| >= 65520 become inf)")
    elif n_over:
        what.append(f"weights too large for {job.qtype.name}: {n_over} blocks whose F16 scale overflows")
    return f"tensor {job.tensor.name} has {' and '.join(what)}"


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_target(dst: Path, force: bool, protect: Sequence[Path] = ()) -> None:
    """Refuse an existing ``dst`` without ``force``, and any of ``protect`` (inputs) always."""
    if not os.path.lexists(dst):
        return
    for p in protect:
        if same_file(dst, p):
            raise GgufqError(f"{dst} is one of the conversion's inputs; choose another output")
    if not force:
        raise GgufqError(f"{dst} exists; pass --force to overwrite")
    if os.path.isdir(dst) and not os.path.islink(dst):
        raise GgufqError(f"{dst} is a directory")


def _commit(moves: Sequence[tuple[Path, Path]], final: bool = True) -> None:
    """Rename every file into place with SIGINT/SIGTERM/SIGHUP deferred; if one rename
    fails, the files already placed are removed again. A signal during the renames is
    raised after them, the files placed removed again: interrupted means nothing written."""
    with deferred():
        placed: list[Path] = []
        err: Optional[BaseException] = None
        try:
            for src, dst in moves:
                os.replace(src, dst)
                placed.append(dst)
        except BaseException as e:
            err = e
        if err is not None or pending():
            for dst in placed:
                try:
                    os.unlink(dst)
                except OSError:
                    pass
        if err is not None:
            raise err
        if final and not pending():
            finished()              # placed: the run is done, a signal from here on changes nothing


def _finish(w: gguf.GGUFWriter, fout, job: Job, written: int) -> None:
    """Check a tensor's byte count and pad its file to the data alignment."""
    if written != job.nbytes:
        raise GgufqError(f"{job.tensor.name}: wrote {written} bytes, expected {job.nbytes}")
    w.write_padding(fout, fout.tell())
