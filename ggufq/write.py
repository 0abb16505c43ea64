"""Streaming GGUF output on top of ``gguf.GGUFWriter``.

Header, metadata and every tensor info are written first (sizes are known from
shapes and target types), then each tensor's data chunk by chunk as it is
encoded, so memory holds a few chunks whatever the model size. Everything goes
to a temporary folder beside the target; files are flushed, fsynced and renamed
into place only when complete. On any error or interrupt the temporary folder
is removed and no partial output is left behind.
"""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from . import GgufqError, quant
from .arch import OutTensor
from .progress import Progress

CHUNK_ELEMENTS = 1 << 22          # ~16 MiB of float32 per chunk
Encoder = Callable[[T, np.ndarray, Optional[np.ndarray]], np.ndarray]


@dataclass
class Job:
    """One tensor to write: where its rows come from and how to encode them."""
    tensor: OutTensor
    qtype: T
    imatrix: object = None    # ndarray [row_len], a quant.gptq.Hessian, or a callable returning either

    @property
    def nbytes(self) -> int:
        return self.tensor.n_rows * quant.row_nbytes(self.qtype, self.tensor.row_len)

    @property
    def n_elements(self) -> int:
        return self.tensor.n_rows * self.tensor.row_len


def chunk_rows(row_len: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, row_len))


def _encode(encoder: Encoder, qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]) -> bytes:
    return encoder(qtype, rows, imatrix).tobytes()


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


def _read_and_encode(encoder: Encoder, i: int, lo: int, hi: int, weights) -> bytes:
    job = _FORKED_JOBS[i]
    return _encode(encoder, job.qtype, _read(job, lo, hi), weights)


def _weights(job: Job):
    """A job's importance; a callable is computed here, in file order, in the parent process
    (self-calibration's moments are made layer by layer as the writer reaches them)."""
    return job.imatrix() if callable(job.imatrix) else job.imatrix


def _pool(n_jobs: int, jobs: Sequence[Job]) -> tuple[Optional[Executor], bool]:
    """(pool, whether its workers read rows themselves)."""
    global _FORKED_JOBS
    if n_jobs <= 1:
        return None, False
    if "fork" in mp.get_all_start_methods():
        _FORKED_JOBS = jobs
        return ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("fork")), True
    return ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")), False


def _encoded(jobs: Sequence[Job], encoder: Encoder, pool: Optional[Executor],
             workers_read: bool = False) -> Iterator[tuple[int, int, bytes]]:
    """(job index, elements, bytes) per chunk, in file order; a bounded window of chunks in flight."""
    if pool is None:
        for i, job in enumerate(jobs):
            wts = _weights(job)
            for lo, hi in _ranges(job):
                rows = _read(job, lo, hi)
                yield i, rows.size, _encode(encoder, job.qtype, rows, _chunk_weights(job, wts, lo))
        return
    window: deque[tuple[int, int, Future]] = deque()
    limit = 2 * getattr(pool, "_max_workers", 2)
    for i, job in enumerate(jobs):
        wts = _weights(job)
        for lo, hi in _ranges(job):
            n = (hi - lo) * job.tensor.row_len
            cw = _chunk_weights(job, wts, lo)
            if workers_read:
                fut = pool.submit(_read_and_encode, encoder, i, lo, hi, cw)
            else:
                fut = pool.submit(_encode, encoder, job.qtype, _read(job, lo, hi), cw)
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
               progress: bool = True, label: str = "writing") -> list[Path]:
    """Write a complete GGUF (or its shards) atomically; returns the final paths."""
    global _FORKED_JOBS
    path = Path(path)
    if path.exists() and not force:
        raise GgufqError(f"{path} exists; pass --force to overwrite")
    if not path.parent.is_dir():
        raise GgufqError(f"{path.parent}: no such directory")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    w = gguf.GGUFWriter(tmpdir / path.name, arch, split_max_tensors=split_max_tensors,
                        split_max_size=split_max_size)
    pool = None
    try:
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
        pool, workers_read = _pool(n_jobs, jobs)
        total = sum(j.n_elements for j in jobs)
        with Progress(total, label, n_items=len(jobs), enabled=progress) as bar:
            written = [0] * len(jobs)
            last = -1
            for i, n, data in _encoded(jobs, encoder, pool, workers_read):
                if i != last:
                    if last >= 0:
                        _finish(w, fouts[last], jobs[last], written[last])
                        bar.advance(items=1)
                    last = i
                fouts[i].write(data)
                written[i] += len(data)
                bar.advance(n, nbytes=len(data), item=jobs[i].tensor.name)
            if last >= 0:
                _finish(w, fouts[last], jobs[last], written[last])
                bar.advance(items=1)
        finals = []
        for fout in w.fout:
            fout.flush()
            os.fsync(fout.fileno())
        names = [Path(f.name) for f in w.fout]
        w.close()
        for src in names:
            dst = path.parent / src.name
            if dst.exists() and not force:
                raise GgufqError(f"{dst} exists; pass --force to overwrite")
            finals.append(dst)
        for src, dst in zip(names, finals):
            os.replace(src, dst)
        if pool is not None:
            pool.shutdown(wait=True)
            pool = None
        return finals
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise GgufqError(f"disk full while writing {path} (nothing was left behind)") from None
        raise
    finally:
        _FORKED_JOBS = ()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        w.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _finish(w: gguf.GGUFWriter, fout, job: Job, written: int) -> None:
    """Check a tensor's byte count and pad its file to the data alignment."""
    if written != job.nbytes:
        raise GgufqError(f"{job.tensor.name}: wrote {written} bytes, expected {job.nbytes}")
    w.write_padding(fout, fout.tell())
