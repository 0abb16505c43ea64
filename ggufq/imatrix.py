"""llama.cpp importance matrices: the GGUF imatrix format and the legacy ``.dat``.

Values are normalised the way llama-quantize does before quantizing: GGUF files
hold per-column sums of squared activations (``<name>.in_sum2``) and token counts
(``<name>.counts``) -> sums / counts; legacy files hold ``(sum / count) * ncall``
and the call count -> divide by ncall. The result is one float32 weight per input
column of each matrix (times the expert count for expert tensors).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import GgufqError


@dataclass
class Imatrix:
    path: Path
    entries: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def for_tensor(self, name: str, row_len: int, n_expert: int = 1) -> Optional[np.ndarray]:
        """Importance per column of GGUF tensor ``name``, or None when the file has none for it."""
        v = self.entries.get(name)
        if v is None:
            return None
        if v.size != row_len * max(1, n_expert):
            raise GgufqError(f"{self.path.name}: imatrix for {name} has {v.size} values, "
                             f"the tensor's rows have {row_len} (wrong model?)")
        return v

    def metadata(self) -> list[tuple[str, object]]:
        """The quantize.imatrix.* keys llama-quantize writes."""
        out: list[tuple[str, object]] = [("quantize.imatrix.file", str(self.path)),  # as given, like llama-quantize
                                         ("quantize.imatrix.entries_count", len(self.entries))]
        if self.datasets:
            out.append(("quantize.imatrix.dataset", self.datasets[0]))
        if self.chunk_count:
            out.append(("quantize.imatrix.chunks_count", int(self.chunk_count)))
        return out


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    from .plan.gguf_header import check
    try:
        check(path)                     # every count against the file size before gguf-py allocates
        r = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise GgufqError(f"{path}: not a readable GGUF imatrix ({e})") from None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise GgufqError(f"{path}: a GGUF file without imatrix tensors (*.in_sum2)")
    entries = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None:
            raise GgufqError(f"{path}: imatrix entry {name} has sums but no counts")
        c = np.round(c)
        if c.size == 0 or s.size % c.size or not np.all(np.isfinite(c)):
            raise GgufqError(f"{path}: imatrix entry {name} has {s.size} sums for {c.size} counts")
        per = s.reshape(c.size, -1)
        out = np.where(c[:, None] > 0, per / np.maximum(c[:, None], 1), 1.0)
        entries[name] = out.reshape(-1).astype(np.float32)

    def field(key: str):
        f = r.fields.get(key)
        if f is None:
            return None
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        return f.parts[f.data[0]].tolist()[0]

    try:
        datasets, chunk_size, chunk_count = (field("imatrix.datasets"), field("imatrix.chunk_size"),
                                             field("imatrix.chunk_count"))
        if chunk_size is None or datasets is None:
            raise GgufqError(f"{path}: imatrix metadata missing (imatrix.datasets / imatrix.chunk_size)")
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise ValueError("imatrix.datasets is not a list of strings")
        return Imatrix(path, entries, datasets=datasets, chunk_count=int(chunk_count or 0),
                       chunk_size=int(chunk_size))
    except (ValueError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise GgufqError(f"{path}: malformed imatrix metadata ({e})") from None


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise GgufqError(f"{path}: truncated imatrix file")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise GgufqError(f"{path}: not an imatrix file (GGUF or legacy .dat)")
    entries = {}
    for _ in range(n):
        (ln,) = take("<i")
        if ln <= 0 or ln > 4096:
            raise GgufqError(f"{path}: corrupt imatrix entry name")
        name = data[pos:pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if ncall < 0:
            raise GgufqError(f"{path}: corrupt imatrix entry {name!r} (negative call count)")
        if nval < 1 or pos + 4 * nval > len(data):
            raise GgufqError(f"{path}: truncated imatrix file")
        v = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = v / ncall if ncall > 0 else v.copy()
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if ln > 0 and pos + ln <= len(data):
                datasets.append(data[pos:pos + ln].decode("utf-8", "replace"))
    return Imatrix(path, entries, datasets=datasets, chunk_count=chunks, legacy=True)


def load(path: os.PathLike | str) -> Imatrix:
    from .source import open_regular
    path = Path(path)
    if not os.path.lexists(path):
        raise GgufqError(f"{path}: imatrix file not found")
    with os.fdopen(open_regular(path, f"imatrix {path}"), "rb") as f:
        magic = f.read(4)
    im = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    bad = [k for k, v in im.entries.items() if not np.all(np.isfinite(v))]
    if bad:
        raise GgufqError(f"{path}: imatrix has non-finite values for {bad[0]}")
    return im
