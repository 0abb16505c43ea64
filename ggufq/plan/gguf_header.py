"""A quick, bounded read of a GGUF file's header: scalar metadata and tensor infos, no data.

gguf-py's GGUFReader builds numpy views for every element of every array (a
49152-token vocabulary takes seconds); the plan only needs the
hyperparameters and the tensor names, shapes and types, so arrays are skipped.

A GGUF may come from anywhere, so every count and length is checked against the
bytes left in the file *before* anything is allocated or looped over (a header
claiming 2^62 array elements is an error, not gigabytes of memory), and so are
the GGUF version (2 or 3), key and tensor names (unique), dimensions (at most 4,
each >= 0, rows a multiple of the type's block), tensor types and every
tensor's data extent. :func:`check` runs the same walk before gguf-py's
GGUFReader is let at a file (``inspect``, imatrix files). Problems raise
:class:`GgufFormatError` (a ``ValueError``) with one line.
"""
from __future__ import annotations

import os
import stat
import struct
from typing import BinaryIO, Iterable

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

# GGUFValueType -> struct format of a scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
VERSIONS = (2, 3)
MAX_DIMS = 4                         # GGML_MAX_DIMS
MAX_NAME = 64 * 1024                 # key/tensor name length (llama.cpp's GGML_MAX_NAME is 64 for tensors)
MAX_DEPTH = 4                        # nested arrays


class GgufFormatError(ValueError):
    """A malformed GGUF file (one line)."""


class _Bounded:
    """A binary file whose every read and skip is checked against its size first."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    @property
    def left(self) -> int:
        return self.size - self.f.tell()

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise GgufFormatError(f"{what} claims {n} bytes, only {self.left} are left in the file")

    def read(self, fmt: str, what: str = "header"):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        return struct.unpack("<" + fmt, self.f.read(n))[0]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, 1)

    def string(self, what: str = "string", limit: int = 0) -> str:
        n = self.read("Q", what)
        if limit and n > limit:
            raise GgufFormatError(f"{what} is {n} bytes long (at most {limit})")
        self.need(n, what)
        return self.f.read(n).decode("utf-8", errors="replace")

    def count(self, n: int, min_each: int, what: str) -> int:
        """``n`` items of at least ``min_each`` bytes each must fit in what is left."""
        if n * max(1, min_each) > self.left:
            raise GgufFormatError(f"{what}: {n} items cannot fit in the {self.left} bytes left")
        return n


def _min_size(vtype: int) -> int:
    if vtype in _SCALARS:
        return struct.calcsize(_SCALARS[vtype])
    if vtype == _STRING:
        return 8
    if vtype == _ARRAY:
        return 12
    raise GgufFormatError(f"unknown GGUF value type {vtype}")


def _skip_value(r: _Bounded, vtype: int, depth: int = 0) -> None:
    if vtype == _STRING:
        r.skip(r.read("Q", "string length"), "string")
    elif vtype == _ARRAY:
        if depth >= MAX_DEPTH:
            raise GgufFormatError("arrays nested too deeply")
        etype, n = r.read("I", "array type"), r.read("Q", "array length")
        each = _min_size(etype)
        r.count(n, each, "array")
        if etype in _SCALARS:
            r.skip(n * each, "array")
        else:
            for _ in range(n):
                _skip_value(r, etype, depth + 1)
    elif vtype in _SCALARS:
        r.skip(struct.calcsize(_SCALARS[vtype]), "value")
    else:
        raise GgufFormatError(f"unknown GGUF value type {vtype}")


def _array(r: _Bounded, depth: int = 0) -> list:
    if depth >= MAX_DEPTH:
        raise GgufFormatError("arrays nested too deeply")
    etype, n = r.read("I", "array type"), r.read("Q", "array length")
    r.count(n, _min_size(etype), "array")
    if etype in _SCALARS:
        fmt = _SCALARS[etype]
        size = struct.calcsize("<" + fmt) * n
        r.need(size, "array")
        return list(struct.unpack(f"<{n}{fmt}", r.f.read(size)))
    if etype == _STRING:
        return [r.string() for _ in range(n)]
    return [_array(r, depth + 1) for _ in range(n)]


def _open_regular(path) -> tuple[BinaryIO, int]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GgufFormatError("not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), st.st_size


def read_header(path, arrays: Iterable[str] = (), *, check_data: bool = False
                ) -> tuple[dict, list[tuple[str, tuple[int, ...], T]]]:
    """(scalar and string metadata, plus the arrays named in ``arrays``,
    [(tensor name, shape in numpy order, type)]) of a GGUF file.

    ``check_data``: also check that every tensor's data lies inside the file (the
    alignment, offsets and sizes gguf-py's reader will trust).

    Long because it is a line-by-line transcription of the GGUF header layout with a bounds check per field."""
    arrays = set(arrays)
    f, size = _open_regular(path)
    with f:
        r = _Bounded(f, size)
        if size < 4 or f.read(4) != b"GGUF":
            raise GgufFormatError("not a GGUF file")
        version = r.read("I", "version")
        if version not in VERSIONS:
            raise GgufFormatError(f"GGUF version {version} is not supported (ggufq reads versions 2 and 3)")
        n_tensors, n_kv = r.read("Q", "tensor count"), r.read("Q", "key count")
        r.count(n_kv, 8 + 4 + 1, "metadata keys")
        r.count(n_tensors, 8 + 4 + 8 + 4 + 8, "tensor infos")
        kv: dict = {}
        seen = set()
        for _ in range(n_kv):
            key, vtype = r.string("key", MAX_NAME), r.read("I", "value type")
            if key in seen:
                raise GgufFormatError(f"duplicate key {key!r}")
            seen.add(key)
            if vtype == _STRING:
                kv[key] = r.string()
            elif vtype in _SCALARS:
                kv[key] = r.read(_SCALARS[vtype])
            elif vtype == _ARRAY and key in arrays:
                kv[key] = _array(r)
            else:
                _skip_value(r, vtype)
        tensors = []
        names = set()
        extents = []
        for _ in range(n_tensors):
            name, n_dims = r.string("tensor name", MAX_NAME), r.read("I", "dimension count")
            if name in names:
                raise GgufFormatError(f"duplicate tensor name {name!r}")
            names.add(name)
            if n_dims > MAX_DIMS:
                raise GgufFormatError(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            ne = [r.read("Q", "dimension") for _ in range(n_dims)]
            ttype = r.read("I", "tensor type")
            try:
                qt = T(ttype)
                block, tsize = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise GgufFormatError(f"tensor {name!r} has unknown type {ttype}") from None
            offset = r.read("Q", "offset")
            n = 1
            for d in ne:
                n *= d
            if ne and ne[0] % block:
                raise GgufFormatError(f"tensor {name!r}: row length {ne[0]} is not a multiple of "
                                      f"{qt.name}'s block of {block}")
            extents.append((name, offset, n // block * tsize))
            tensors.append((name, tuple(reversed(ne)), qt))
        if check_data:
            align = kv.get("general.alignment", 32)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise GgufFormatError(f"general.alignment {align!r} is not a power of two")
            start = -(-f.tell() // align) * align
            for name, offset, nbytes in extents:
                if offset % align or start + offset + nbytes > size:
                    raise GgufFormatError(f"tensor {name!r}'s data ({nbytes} bytes at offset {offset}) "
                                          "lies outside the file or off its alignment (truncated file?)")
    return kv, tensors


def check(path) -> None:
    """Walk the whole header with bounds (and every tensor's data extent); GgufFormatError if malformed."""
    read_header(path, check_data=True)
