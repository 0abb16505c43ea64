"""Hugging Face model folders: config, safetensors headers and lazy row reads.

Nothing here loads a whole tensor: :meth:`SourceTensor.rows` reads a row range
with ``os.pread`` straight from the shard, so memory holds one chunk at a time.
Only BF16, F16 and F32 weights are read; anything else is a clear error.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from . import GgufqError

# safetensors dtype -> (bytes per element, numpy dtype of the stored bits)
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "BF16": (2, np.dtype("<u2")),
    "F16": (2, np.dtype("<f2")),
    "F32": (4, np.dtype("<f4")),
}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    path: Path
    offset: int            # absolute byte offset of the data in the file
    nbytes: int
    _fd: Optional[int] = field(default=None, repr=False, compare=False)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def row_len(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.row_len if self.row_len else 0

    def _check_dtype(self) -> tuple[int, np.dtype]:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise GgufqError(
                f"{self.path.name}: tensor {self.name} has dtype {self.dtype}; "
                f"ggufq reads {', '.join(DTYPES)} weights") from None

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` of the tensor viewed as ``[n_rows, row_len]``, as float32."""
        esize, bits = self._check_dtype()
        lo, hi = max(0, lo), min(hi, self.n_rows)
        n = (hi - lo) * self.row_len
        want = n * esize
        start = self.offset + lo * self.row_len * esize
        fd = self._fd if self._fd is not None else os.open(self.path, os.O_RDONLY)
        try:
            buf = bytearray(want)
            view = memoryview(buf)
            got = 0
            while got < want:
                k = os.preadv(fd, [view[got:]], start + got)
                if k <= 0:
                    raise GgufqError(f"{self.path.name}: file ends inside tensor {self.name} (truncated shard?)")
                got += k
        finally:
            if self._fd is None:
                os.close(fd)
        raw = np.frombuffer(buf, dtype=bits)
        out = bf16_to_f32(raw) if self.dtype == "BF16" else raw.astype(np.float32)
        return out.reshape(hi - lo, self.row_len)

    def read_all(self) -> np.ndarray:
        """The whole tensor as float32 in its own shape (for small tensors and tests)."""
        return self.rows(0, self.n_rows).reshape(self.shape)


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    """Parse one safetensors file's header; validate every tensor's extent against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise GgufqError(f"{path.name}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise GgufqError(f"{path.name}: corrupt safetensors header (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise GgufqError(f"{path}: file not found") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise GgufqError(f"{path.name}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out: dict[str, SourceTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise GgufqError(f"{path.name}: corrupt safetensors header entry for {name!r}") from None
        if begin < 0 or end < begin or base + end > size:
            raise GgufqError(f"{path.name}: tensor {name} lies outside the file (truncated shard?)")
        if dtype in DTYPES:
            want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][0]
            if want != end - begin:
                raise GgufqError(f"{path.name}: tensor {name} has {end - begin} bytes, shape {list(shape)} "
                                 f"of {dtype} needs {want}")
        out[name] = SourceTensor(name, shape, dtype, path, base + begin, end - begin)
    return out


class Model:
    """A Hugging Face model folder: ``config`` plus lazily readable ``tensors``."""

    def __init__(self, path: Path, config: dict, tensors: dict[str, SourceTensor]):
        self.path = path
        self.config = config
        self.tensors = tensors
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> "Model":
        for t in self.tensors.values():
            if t.path not in self._fds:
                self._fds[t.path] = os.open(t.path, os.O_RDONLY)
            t._fd = self._fds[t.path]
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for t in self.tensors.values():
            t._fd = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> SourceTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GgufqError(f"{self.path.name}: tensor {name} is missing from the safetensors files") from None

    def json(self, name: str) -> Optional[dict]:
        """A JSON file of the folder (tokenizer_config.json, ...) or None when absent."""
        return read_json(self.path / name, required=False)

    def __iter__(self) -> Iterator[SourceTensor]:
        return iter(self.tensors.values())


def read_json(path: Path, required: bool = True) -> Optional[dict]:
    if not path.is_file():
        if required:
            raise GgufqError(f"{path.parent}: no {path.name} (is this a Hugging Face model folder?)")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise GgufqError(f"{path}: not valid JSON ({e})") from None


def open_model(path: os.PathLike | str) -> Model:
    """Read config.json and every safetensors header of a folder (no weights are read)."""
    path = Path(path)
    if not path.is_dir():
        raise GgufqError(f"{path}: not a directory")
    config = read_json(path / "config.json")
    # multimodal wrappers keep the language model's hyperparameters under text_config
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}

    index_path = path / "model.safetensors.index.json"
    tensors: dict[str, SourceTensor] = {}
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GgufqError(f"{index_path.name}: no weight_map")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise GgufqError(f"{path}: shard {shard} named in {index_path.name} is missing")
        headers = {shard: read_safetensors_header(path / shard) for shard in shards}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise GgufqError(f"{shard}: tensor {name} named in {index_path.name} is not in the shard")
            tensors[name] = headers[shard][name]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise GgufqError(f"{path}: no model.safetensors or model.safetensors.index.json")
        for f in files:
            tensors.update(read_safetensors_header(f))
    from .source_fp8 import dequantizing   # FP8 weights x block scales; other quant_methods: one error line
    return Model(path, config, dequantizing(config, tensors))


def write_safetensors(path: os.PathLike | str, tensors: dict[str, tuple[np.ndarray, str]],
                      metadata: Optional[dict] = None) -> None:
    """Write a safetensors file from ``name -> (float array, dtype)``, dtype in BF16/F16/F32.

    For tools and tests that build model folders (synthetic models, SmolLM2);
    safetensors' own numpy API cannot write bf16.
    """
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    blobs = []
    off = 0
    for name, (arr, dtype) in tensors.items():
        a = np.asarray(arr, dtype=np.float32)
        if dtype == "BF16":
            from .quant.floats import f32_to_bf16_bits
            raw = f32_to_bf16_bits(a).tobytes()
        elif dtype in DTYPES:
            raw = a.astype(DTYPES[dtype][1]).tobytes()
        else:
            raise ValueError(f"cannot write dtype {dtype}")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
