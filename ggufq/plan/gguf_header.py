"""A quick read of a GGUF file's header: scalar metadata and tensor infos, no data.

gguf-py's GGUFReader builds numpy views for every element of every array (a
49152-token vocabulary takes seconds); the plan only needs the
hyperparameters and the tensor names, shapes and types, so arrays are skipped.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterable

from gguf import GGMLQuantizationType as T

# GGUFValueType -> struct format of a scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _read(f: BinaryIO, fmt: str):
    n = struct.calcsize("<" + fmt)
    b = f.read(n)
    if len(b) != n:
        raise ValueError("truncated GGUF header")
    return struct.unpack("<" + fmt, b)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "Q")
    return f.read(n).decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype == _STRING:
        f.seek(_read(f, "Q"), 1)
    elif vtype == _ARRAY:
        etype, n = _read(f, "I"), _read(f, "Q")
        if etype in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[etype]), 1)
        else:
            for _ in range(n):
                _skip_value(f, etype)
    elif vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), 1)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def _array(f: BinaryIO) -> list:
    etype, n = _read(f, "I"), _read(f, "Q")
    if etype in _SCALARS:
        fmt = _SCALARS[etype]
        size = struct.calcsize("<" + fmt) * n
        b = f.read(size)
        if len(b) != size:
            raise ValueError("truncated GGUF header")
        return list(struct.unpack(f"<{n}{fmt}", b))
    if etype == _STRING:
        return [_string(f) for _ in range(n)]
    return [_array(f) for _ in range(n)]


def read_header(path, arrays: Iterable[str] = ()) -> tuple[dict, list[tuple[str, tuple[int, ...], T]]]:
    """(scalar and string metadata, plus the arrays named in ``arrays``,
    [(tensor name, shape in numpy order, type)]) of a GGUF file."""
    arrays = set(arrays)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = _read(f, "I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        n_tensors, n_kv = _read(f, "Q"), _read(f, "Q")
        kv: dict = {}
        for _ in range(n_kv):
            key, vtype = _string(f), _read(f, "I")
            if vtype == _STRING:
                kv[key] = _string(f)
            elif vtype in _SCALARS:
                kv[key] = _read(f, _SCALARS[vtype])
            elif vtype == _ARRAY and key in arrays:
                kv[key] = _array(f)
            else:
                _skip_value(f, vtype)
        tensors = []
        for _ in range(n_tensors):
            name, n_dims = _string(f), _read(f, "I")
            ne = [_read(f, "Q") for _ in range(n_dims)]
            ttype = _read(f, "I")
            _read(f, "Q")                                   # offset
            tensors.append((name, tuple(reversed(ne)), T(ttype)))
    return kv, tensors
